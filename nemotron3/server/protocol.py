"""Request and response models of the OpenAI (chat completions, completions, models) and Anthropic
(messages) APIs, and their error bodies.

Design decisions:

* **Strict types** (`ConfigDict(strict=True)`): `"temperature": "0.5"`, `"stream": "yes"` or
  `"max_tokens": 1.5` are 400s, not silently coerced; an int is still accepted where a float is expected,
  and an integral float (`5.0`: JSON does not tell it from `5`) where an int is.
* **`null` means "not given"** (as in OpenAI's and vLLM's schemas, where these fields are nullable):
  `"stream": null`, `"n": null`, `"logprobs": null` take the field's default; a required field that
  is null is reported as missing.
* **Unknown fields are ignored** (vLLM's behaviour): clients send newer parameters (`store`, `metadata`,
  `service_tier`, ...) that do not change generation here. Fields that would change it and are not
  supported (`suffix`, images) are declared so they can be refused with a
  400 instead of being dropped.
* Only shapes and ranges are checked here; checks that need the model (context length, tool names,
  tokenizer) live in `app.py`. Everything a client gets wrong becomes a 4xx with the API's own error body
  (`openai_error` / `anthropic_error`).
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_STOP = 16            # stop strings per request
MAX_STOP_LEN = 512       # characters per stop string
MAX_TOP_LOGPROBS = 20


def integral(v):
    """An integral float (5.0) as an int; anything else unchanged (left to the field's own validation)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(integral)]       # 5 or 5.0; not 5.5, "5" or true


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict) and any(v is None for v in data.values()):
            return {k: v for k, v in data.items() if v is not None}
        return data


# ====================================================================== errors

class APIError(Exception):
    """A client mistake (or an overloaded server): rendered as the endpoint's error body."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _OPENAI_TYPES.get(status, "invalid_request_error")


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def openai_error(status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _OPENAI_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "invalid_request_error"),
                                       "message": message}}


# ====================================================================== OpenAI: shared pieces

class StreamOptions(_Model):
    include_usage: bool = False


class FunctionDef(_Model):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDef(_Model):
    type: str = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCallIn(_Model):
    name: str
    arguments: Union[str, dict[str, Any], None] = None


class ToolCallIn(_Model):
    id: Optional[str] = None
    type: str = "function"
    function: FunctionCallIn


class ContentPart(_Model):
    type: str
    text: Optional[str] = None


class ChatMessage(_Model):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None


class JsonSchemaFormat(_Model):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Model):
    type: str
    json_schema: Optional[JsonSchemaFormat] = None


class _SamplingFields(_Model):
    """Sampling fields shared by /v1/chat/completions and /v1/completions (OpenAI + vLLM extras)."""
    model: str
    n: Int = Field(1, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[Int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[Annotated[int, Field(ge=0, lt=2 ** 63), BeforeValidator(integral)]] = None  # (bound printed exactly)
    max_tokens: Optional[Int] = Field(None, ge=1)
    min_tokens: Int = Field(0, ge=0)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[Int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[Int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    reasoning_effort: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    thinking_budget: Optional[Int] = Field(None, ge=0)
    skip_special_tokens: bool = False


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[Int], list[list[Int]]]
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[Int] = None
    skip_special_tokens: bool = True


# ====================================================================== OpenAI: responses

def _now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "nemotron3"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str              # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: str = "function"
    function: FunctionCallOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    completion_tokens_details: Optional[CompletionTokensDetails] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ====================================================================== Anthropic messages

class AnthropicBlock(_Model):
    """One content block of a request message (text, tool_use, tool_result, thinking, ...)."""
    type: str
    text: Optional[str] = None
    id: Optional[str] = None
    name: Optional[str] = None
    input: Optional[dict[str, Any]] = None
    tool_use_id: Optional[str] = None
    content: Union[str, list[dict[str, Any]], None] = None
    is_error: Optional[bool] = None
    thinking: Optional[str] = None
    signature: Optional[str] = None


class AnthropicMessage(_Model):
    role: str
    content: Union[str, list[AnthropicBlock]]


class AnthropicTool(_Model):
    name: str
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None
    type: Optional[str] = None
    strict: Optional[bool] = None


class AnthropicOutputFormat(_Model):
    """Structured outputs (beta `structured-outputs-2025-11-13`): `{"type": "json_schema", "schema": {...}}`."""
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    type: str
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")


class AnthropicToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False


class AnthropicThinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[Int] = Field(None, ge=0)


class AnthropicTextBlock(_Model):
    type: Literal["text"] = "text"
    text: str


class AnthropicOutputConfig(_Model):
    effort: Optional[str] = None


class MessagesRequest(_Model):
    model: str
    max_tokens: Int = Field(ge=1)
    messages: list[AnthropicMessage]
    system: Union[str, list[AnthropicTextBlock], None] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[Int] = Field(None, ge=0)
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None
    thinking: Optional[AnthropicThinking] = None
    output_config: Optional[AnthropicOutputConfig] = None
    context_management: Optional[dict[str, Any]] = None       # accepted, no effect (nothing is cleared)
    stream: bool = False
    metadata: Optional[dict[str, Any]] = None
    output_format: Optional[AnthropicOutputFormat] = None


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessagesResponse(BaseModel):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[dict[str, Any]]          # thinking / text / tool_use blocks
    stop_reason: Optional[str] = None
    stop_sequence: Optional[str] = None
    usage: AnthropicUsage


class CountTokensRequest(_Model):
    model: str
    messages: list[AnthropicMessage]
    system: Union[str, list[AnthropicTextBlock], None] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None
    thinking: Optional[AnthropicThinking] = None
    output_config: Optional[AnthropicOutputConfig] = None
