"""AsyncLLMEngine: streaming deltas, concurrency, abort, a responsive event loop, errors."""
import asyncio
import sysconfig
from pathlib import Path

import pytest

from engine_utils import one_thread, tiny_model  # noqa: F401
from nemotron3.engine import LLM, AsyncLLMEngine, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def tok():
    from nemotron3.tokenizer import Tokenizer, train_tokenizer
    src = Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py"
    return Tokenizer(train_tokenizer([src.read_text()] * 2, 300))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(5, vocab_size=len(tok))


def make(model, tok, **kw):
    return AsyncLLMEngine(LLMEngine(model, tok, max_num_seqs=4, block_size=4, **kw))


async def collect(engine, prompt, params, rid):
    outs = []
    async for o in engine.generate(prompt, params, rid):
        outs.append(o)
    return outs


@pytest.mark.parametrize("k", [0, 2])
def test_streaming_deltas_add_up_and_match_sync(model, tok, k):
    prompts = ["def rgb(r, g, b):", "import math\n", "class HLS:"]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=10 + 3 * i, ignore_eos=True,
                             stop=["zz"] if i == 1 else None) for i in range(3)]

    async def main():
        eng = make(model, tok, num_speculative_tokens=k)
        res = await asyncio.gather(*(collect(eng, p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))))
        await eng.shutdown()
        return res

    streams = asyncio.run(main())
    sync = LLM(model, tokenizer=tok, max_num_seqs=1, num_speculative_tokens=k).generate(prompts, params)
    for stream, ref in zip(streams, sync):
        final = stream[-1].outputs[0]
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert sum((o.outputs[0].delta_token_ids for o in stream), []) == final.token_ids
        assert "".join(o.outputs[0].delta_text for o in stream) == final.text
        assert final.token_ids == ref.outputs[0].token_ids and final.text == ref.outputs[0].text
        assert len(stream) >= 2


def test_abort_and_early_exit(model, tok):
    async def main():
        eng = make(model, tok)
        sp = SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0, seed=1)
        got = []
        async for o in eng.generate([5, 6, 7], sp, "a"):
            got.append(o)
            if len(got) == 3:
                await eng.abort("a")
        async for o in eng.generate([5, 6, 7], sp, "b"):
            break                                           # leaving early aborts the request
        for _ in range(100):
            if not eng.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        free = sorted(eng.engine.scheduler.free_slots)
        await eng.shutdown()
        return got, free

    got, free = asyncio.run(main())
    assert got[-1].finished and got[-1].outputs[0].finish_reason == "abort"
    assert len(got[-1].outputs[0].token_ids) < 200 and free == [0, 1, 2, 3]


def test_event_loop_stays_responsive(model, tok):
    async def main():
        eng = make(model, tok)
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        await asyncio.gather(*(collect(eng, [5 + i, 9], SamplingParams(max_tokens=40, ignore_eos=True), f"x{i}")
                               for i in range(4)))
        done.set()
        await t
        steps = eng.engine.stats.steps
        await eng.shutdown()
        return ticks, steps

    ticks, steps = asyncio.run(main())
    assert ticks >= steps // 2 > 5             # the loop kept ticking while the model ran in the worker


def test_errors_surface_in_the_stream(model, tok):
    async def main():
        eng = make(model, tok, max_model_len=16)
        with pytest.raises(ValueError, match="empty"):
            await collect(eng, [], SamplingParams(), "e1")
        with pytest.raises(ValueError, match="max_tokens=50 does not fit"):
            await collect(eng, [5, 6, 7], SamplingParams(max_tokens=50), "e2")
        ok = await collect(eng, [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), "e3")
        await eng.shutdown()
        return ok

    assert len(asyncio.run(main())[-1].outputs[0].token_ids) == 3
