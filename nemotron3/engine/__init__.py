"""The inference engine: continuous batching over a HybridCache, MTP self-speculative decoding, prefix
caching of hybrid (Mamba + KV) state, reasoning budgets, and vLLM-style sync/async APIs.

    from nemotron3.engine import LLM, SamplingParams
    llm = LLM("models/pico", num_speculative_tokens=2)
    print(llm.generate("def fib(n):", SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text)
"""
from .async_engine import AsyncLLMEngine
from .engine import LLMEngine, RequestError
from .llm import LLM, load_model
from .outputs import CompletionOutput, EngineSnapshot, EngineStats, RequestMetrics, RequestOutput
from .prefix_cache import PrefixCache
from .reasoning import MEDIUM_THINKING_BUDGET, ReasoningTokens, ThinkingBudget
from .grammar import StructuredOutputs
from .sampling import Logprob, SamplingParams

__all__ = ["LLM", "LLMEngine", "StructuredOutputs", "AsyncLLMEngine", "RequestError", "load_model", "EngineStats", "EngineSnapshot",
           "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "Logprob", "PrefixCache",
           "ReasoningTokens", "ThinkingBudget", "MEDIUM_THINKING_BUDGET"]
