"""Prefix caching of hybrid state (Mamba conv/SSM + K/V + MTP K/V): reuse across turns, identical results,
fewer prefilled tokens, chunk-boundary entries, byte budget with LRU eviction."""
import pytest
import torch

from engine_utils import assert_logprobs_match, one_thread, tiny_model  # noqa: F401
from nemotron3.engine import LLM, PrefixCache, SamplingParams
from nemotron3.model.cache import SlotState

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(1)


def ids(n, seed):
    return torch.randint(12, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [0, 2])
def test_multi_turn_conversation_reuses_history(model, k):
    """Turn n+1 resends turn n's prompt + answer + a new message. With caching the answers are the same
    tokens (logprobs equal to a full forward), and only the new part is prefilled."""
    cached = LLM(model, num_speculative_tokens=k, block_size=4)
    plain = LLM(model, num_speculative_tokens=k, enable_prefix_caching=False)
    history = ids(13, 0)
    for turn in range(3):
        before = cached.stats()["prefill_tokens"]
        a = cached.generate([history], SP)[0]
        b = plain.generate([history], SP)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert_logprobs_match(model, history, a.outputs[0])
        prefilled = cached.stats()["prefill_tokens"] - before
        if turn:
            # everything but the new message and the last answer token (never fed) came from the cache
            assert a.metrics.num_cached_tokens == len(history) - 6
            assert prefilled == 6
        history = history + a.outputs[0].token_ids + ids(5, turn + 1)
    st = cached.stats()
    assert st["prefill_tokens"] < plain.stats()["prefill_tokens"] / 2
    assert st["prefix_cache"]["hits"] >= 2 and st["prefix_cache"]["hit_tokens"] > 0


def test_identical_prompt_is_not_prefilled_again(model):
    llm = LLM(model, block_size=4)
    p = ids(21, 3)
    first = llm.generate([p], SP)[0]
    n = llm.stats()["prefill_tokens"]
    again = llm.generate([p], SP)[0]
    assert llm.stats()["prefill_tokens"] == n                  # logits come from the saved last hidden
    assert again.metrics.num_cached_tokens == 21
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_chunk_boundary_entries_serve_a_diverging_prompt(model):
    """A 40-token prompt prefilled in 16-token chunks (block-aligned) leaves entries at 16, 32 and 40; a
    prompt sharing its first 21 tokens restores 16 of them and prefills the rest."""
    llm = LLM(model, max_num_seqs=2, block_size=4, max_num_batched_tokens=16)
    a = ids(40, 4)
    llm.generate([a], SP)
    lengths = sorted(llm.engine.prefix_cache.lengths)
    assert {16, 32, 40}.issubset(lengths)
    b = a[:21] + ids(9, 5)
    out = llm.generate([b], SP)[0]
    assert out.metrics.num_cached_tokens == 16
    ref = LLM(model, enable_prefix_caching=False).generate([b], SP)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert_logprobs_match(model, b, out.outputs[0])


def test_byte_budget_and_lru_eviction(model):
    llm = LLM(model, block_size=64)                            # entries only at prompt / request ends
    per_entry = None
    prompts = [ids(20, 10 + i) for i in range(4)]
    llm.generate([prompts[0]], SP)
    per_entry = llm.engine.prefix_cache.bytes / len(llm.engine.prefix_cache)
    small = LLM(model, block_size=64, prefix_cache_bytes=int(3.5 * per_entry))
    for p in prompts:
        small.generate([p], SP)                               # 2 entries per request (prompt end, request end)
    pc = small.engine.prefix_cache
    assert pc.bytes <= pc.max_bytes and len(pc) <= 3 and pc.stats.evicted >= 5
    before = small.stats()["prefill_tokens"]
    small.generate([prompts[3]], SP)                          # most recent: still cached
    assert small.stats()["prefill_tokens"] == before
    small.generate([prompts[0]], SP)                          # evicted long ago: prefilled again
    assert small.stats()["prefill_tokens"] == before + 20


def _state(nbytes_kv):
    st = SlotState(length=4, mtp_length=0)
    st.k[0] = torch.zeros(nbytes_kv // 4, dtype=torch.float32)
    return st


def test_prefix_cache_lru_order_and_rejection():
    pc = PrefixCache(max_bytes=3000, block_size=4)
    h = torch.zeros(2)
    for i, key in enumerate(([1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9])):
        assert pc.save(key, _state(800), h)
    assert pc.lookup([1, 2, 3, 4, 77]).length == 4              # touch the oldest
    pc.save([4, 4, 4, 4], _state(800), h)                       # evicts [5, 6, 7, 8], the least recent
    assert pc.lookup([5, 6, 7, 8]) is None and pc.lookup([1, 2, 3, 4]) is not None
    assert pc.bytes <= 3000 and pc.stats.evicted == 1
    assert not pc.save([3, 3, 3, 3], _state(4000), h) and pc.stats.rejected == 1
    assert pc.lookup([9, 9, 9]) is None                        # shorter than every entry
    assert pc.stats.hit_tokens == 8
