"""What the engine returns: vLLM-shaped `RequestOutput` / `CompletionOutput`, plus per-request metrics.

Every output carries the cumulative `text` / `token_ids` and, for streaming, the `delta_text` /
`delta_token_ids` produced since the previous output of the same request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None        # 'stop' | 'length' | 'abort' | None while running
    stop_reason: int | str | None = None    # the stop string or stop token id that ended it (None for EOS)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SpecAcceptance:
    """Speculative-decoding ratios from the `spec_verify_steps` / `spec_draft_tokens` / `spec_accepted_tokens`
    counters of the class it is mixed into (per request or engine-wide)."""

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens emitted per verify forward (accepted drafts + the target's own token), vLLM's definition."""
        return 1 + self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else None


@dataclass
class RequestMetrics(SpecAcceptance):
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0             # prompt tokens restored from the prefix cache
    num_generated_tokens: int = 0
    reasoning_tokens: int = 0              # tokens generated inside <think> (all completions)
    spec_verify_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass
class EngineStats(SpecAcceptance):
    """Engine-wide counters since start (`LLMEngine.stats`)."""
    steps: int = 0
    prefill_tokens: int = 0          # prompt tokens run through the backbone (cached ones excluded)
    cached_tokens: int = 0           # prompt tokens restored from the prefix cache
    decode_tokens: int = 0           # tokens emitted by decode steps
    decode_forwards: int = 0
    spec_verify_steps: int = 0       # (sequence, round) pairs
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one moment (`LLMEngine.snapshot()`), what monitoring reads: metrics never
    reach into the scheduler or the caches themselves."""
    running: int                     # sequences holding a cache slot
    waiting: int                     # sequences waiting for one
    max_num_seqs: int
    cache_bytes: dict[str, int]      # hybrid cache: Mamba state, K/V buffers, total
    prefix_cache_bytes: int | None   # None: prefix caching off
    prefix_cache_hit_rate: float | None
    steps: int
    spec_draft_tokens: int
    spec_accepted_tokens: int
    spec_acceptance_rate: float | None
