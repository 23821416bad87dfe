"""Engine core: cached prefill/decode exactness, continuous batching, seeded sampling, stops, errors."""
import pytest
import torch

from engine_utils import assert_logprobs_match, full_logprobs, one_thread, reference_greedy, tiny_model  # noqa: F401
from nemotron3 import HybridCache
from nemotron3.engine import LLM, LLMEngine, RequestError, SamplingParams
from nemotron3.engine.sampling import probabilities

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def prompts_for(n, seed=0, lo=3, hi=30, vocab=96):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(12, vocab, (L,), generator=g).tolist() for L in lens]


def run_staggered(llm, arrivals, params):
    """arrivals: {step: [(request_id, prompt)]}; steps the engine, adding requests on their step."""
    eng, outs, step = llm.engine, {}, 0
    while step <= max(arrivals) or eng.has_unfinished_requests():
        for rid, prompt in arrivals.get(step, []):
            eng.add_request(rid, prompt, params[rid] if isinstance(params, dict) else params)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        step += 1
    return outs


# ---- exactness of the cached paths ----

def test_record_and_rollback_equal_full_forward(model):
    """Verify-style forward (record_states) + keep_recorded at different indices per row == full forward."""
    ids = torch.randint(12, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 3)
        model(ids[:, :9], cache, slots=[2, 0])
        out = model.logits(model.hidden_states(ids[:, 9:14], cache, slots=[2, 0], record_states=True))
        torch.testing.assert_close(out, full[:, 9:14], rtol=1e-4, atol=1e-4)
        cache.keep_recorded([2, 0], [1, 3])              # row 0 keeps tokens 9..10, row 1 keeps 9..12
        cache.lengths[2], cache.lengths[0] = 11, 13
        a = model(ids[0:1, 11:16], cache, slots=[2])
        b = model(ids[1:2, 13:17], cache, slots=[0])
        snap = cache.snapshot(0)
        cache.restore(1, snap)
        c = model(ids[1:2, 17:20], cache, slots=[1])
    torch.testing.assert_close(a[0], full[0, 11:16], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b[0], full[1, 13:17], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c[0], full[1, 17:20], rtol=1e-4, atol=1e-4)


# fast_decode: decode steps of <= PLAN_MAX_ROWS sequences run the decode plan's C kernel, all rows at once;
# False keeps them in the generic batched forward, which larger batches use

@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("budget", [5, 9, 64])
def test_chunked_prefill_and_decode_logprobs_equal_full_forward(model, budget, fast):
    """Prefill in chunks (token budget), decode N steps: every logprob == one full forward's."""
    llm = LLM(model, max_num_seqs=2, max_num_batched_tokens=budget, block_size=4, max_model_len=128,
              fast_decode=fast)
    prompts = prompts_for(3, seed=2, lo=10, hi=40)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert len(o.outputs[0].token_ids) == 10
        assert_logprobs_match(model, p, o.outputs[0])
    assert llm.stats()["prefill_tokens"] + llm.stats()["cached_tokens"] == sum(map(len, prompts))


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_reference_loop(model, fast):
    prompts = prompts_for(4, seed=3)
    outs = LLM(model, max_num_seqs=4, block_size=4, fast_decode=fast).generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference_greedy(model, p, 10)
        assert o.outputs[0].finish_reason == "length"


def poison_stale_cache(llm, scale=50.0):
    """Large random values wherever the cache holds nothing live: K/V past every slot's length (backbone and
    MTP), the Mamba conv/SSM states of free slots. Correct code never reads them (a masked key gets weight
    exactly 0); a path that does changes the tokens."""
    c, g = llm.engine.cache, torch.Generator().manual_seed(3)
    for store in (c.k, c.v):
        for i, buf in store.items():
            lengths = c.mtp_lengths if c.is_mtp_layer(i) else c.lengths
            for s in range(c.num_slots):
                stale = buf[s, :, int(lengths[s]):]
                stale.copy_(scale * torch.randn(stale.shape, generator=g))
    for t in (*c.conv.values(), *c.ssm.values()):
        for s in llm.engine.scheduler.free_slots:
            t[s] = scale * torch.randn(t[s].shape, generator=g)


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_repeated_greedy_generate_is_identical(model, fast, prefix):
    """One LLM, greedy, called again and again: prompts of different lengths (1 token to past a prefix-cache
    block and several SSD chunks) together (3 slots for 5 prompts, finishing at different steps: slots are
    reused and compacted mid-call), one at a time, in another order, with the stale cache poisoned before
    every call. Every call gives every prompt the argmax tokens of full forwards, so nothing a finished
    sequence leaves in a reused slot (Mamba conv/SSM state, K/V past the length, lengths) or in the engine
    reaches the next one."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(12, 96, (n,), generator=g).tolist() for n in (1, 70, 5, 17, 40)]
    n_tok = [12, 7, 12, 4, 9]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in n_tok]
    refs = [reference_greedy(model, p, n) for p, n in zip(prompts, n_tok)]
    llm = LLM(model, max_num_seqs=3, block_size=16, fast_decode=fast, enable_prefix_caching=prefix)

    def tokens(idx):
        poison_stale_cache(llm)
        return [o.outputs[0].token_ids for o in llm.generate([prompts[i] for i in idx], [params[i] for i in idx])]

    for _ in range(2):
        assert tokens(range(5)) == refs                                    # concurrently
    for i in (0, 3, 1, 1, 4, 2, 0):                                        # one at a time
        assert tokens([i]) == [refs[i]], i
    assert tokens([4, 2, 0, 3, 1]) == [refs[i] for i in (4, 2, 0, 3, 1)]
    sch = llm.engine.scheduler
    assert not sch.running and not sch.waiting and sch.free_slots == [0, 1, 2]


# ---- continuous batching ----

@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_staggered_arrivals_match_running_alone(model, temperature, fast):
    """Requests arrive at different steps, finish at different times, share a 3-slot batch: each gets
    exactly the tokens it gets alone (greedy, and seeded sampling)."""
    prompts = prompts_for(6, seed=4)
    params = {f"r{i}": SamplingParams(temperature=temperature, top_p=0.9, seed=100 + i, max_tokens=4 + 2 * i,
                                      ignore_eos=True) for i in range(6)}
    arrivals = {0: [("r0", prompts[0]), ("r1", prompts[1])], 2: [("r2", prompts[2])],
                3: [("r3", prompts[3]), ("r4", prompts[4])], 7: [("r5", prompts[5])]}
    llm = LLM(model, max_num_seqs=3, max_num_batched_tokens=16, block_size=4, fast_decode=fast)
    batched = run_staggered(llm, arrivals, params)
    for i in range(6):
        alone = LLM(model, max_num_seqs=1, enable_prefix_caching=False).generate([prompts[i]], params[f"r{i}"])[0]
        assert batched[f"r{i}"].outputs[0].token_ids == alone.outputs[0].token_ids, i
        assert len(alone.outputs[0].token_ids) == 4 + 2 * i


def test_slots_are_reused_and_compacted(model):
    llm = LLM(model, max_num_seqs=2, block_size=4)
    prompts = prompts_for(5, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=2 + 3 * (i % 3), ignore_eos=True) for i in range(5)]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    sch = llm.engine.scheduler
    assert not sch.running and not sch.waiting and sorted(sch.free_slots) == [0, 1]


def test_same_seed_same_output_any_batch(model):
    prompt = prompts_for(1, seed=6)[0]
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = LLM(model, max_num_seqs=1).generate([prompt], sp)[0].outputs[0].token_ids
    b = LLM(model, max_num_seqs=4).generate(prompts_for(3, seed=8) + [prompt], sp)[-1].outputs[0].token_ids
    c = LLM(model, max_num_seqs=4).generate([prompt], SamplingParams(temperature=1.0, seed=8, max_tokens=12,
                                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert a == b and a != c


def test_n_children_differ_and_are_reproducible(model):
    prompt = prompts_for(1, seed=9)[0]
    sp = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    llm = LLM(model, max_num_seqs=4, block_size=4)
    o1 = llm.generate([prompt], sp)[0]
    o2 = LLM(model, max_num_seqs=2, enable_prefix_caching=False).generate([prompt], sp)[0]
    ids1 = [c.token_ids for c in o1.outputs]
    assert ids1 == [c.token_ids for c in o2.outputs]
    assert len({tuple(x) for x in ids1}) == 3
    assert o1.metrics.num_cached_tokens == 2 * len(prompt)      # siblings restore the first one's prompt


# ---- sampling ----

def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = probabilities(logits, [SamplingParams(top_k=2)])
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = probabilities(logits, [SamplingParams(top_p=0.6)])             # 0.53 < 0.6: two tokens kept
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    p = probabilities(logits, [SamplingParams(min_p=0.3)])             # keep p >= 0.3 * p_max (e^-1 = 0.37)
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    p = probabilities(logits, [SamplingParams(temperature=0.0)])
    assert p[0].tolist() == [1.0, 0, 0, 0, 0]
    hot, cold = probabilities(logits, [SamplingParams(temperature=2.0), SamplingParams(temperature=0.5)])
    assert hot[0] < cold[0]


def test_top_k_one_is_greedy(model):
    prompt = prompts_for(1, seed=10)[0]
    out = LLM(model).generate([prompt], SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=8,
                                                       ignore_eos=True))[0]
    assert out.outputs[0].token_ids == reference_greedy(model, prompt, 8)


def test_logprobs_top_n_and_rank(model):
    prompt = prompts_for(1, seed=11)[0]
    out = LLM(model).generate([prompt], SamplingParams(temperature=1.0, seed=1, max_tokens=6, logprobs=3,
                                                       ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 6
    ref = full_logprobs(model, prompt, out.token_ids)
    for i, (lp, t) in enumerate(zip(out.logprobs, out.token_ids)):
        assert t in lp and 3 <= len(lp) <= 4                 # top-3, plus the sampled token if not among them
        assert sorted(v.rank for v in lp.values())[:3] == [1, 2, 3]
        assert lp[t].rank == int((ref[i] > ref[i, t]).sum()) + 1
        top3 = ref[i].topk(3).indices.tolist()
        assert all(tok in lp for tok in top3)
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)))
    assert_logprobs_match(model, prompt, out)


# ---- stopping ----

def test_stop_token_ids_and_eos(model):
    prompt = prompts_for(1, seed=12)[0]
    free = reference_greedy(model, prompt, 10)
    stop_at = free[4]
    first = free.index(stop_at)
    out = LLM(model).generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=[stop_at],
                                                       ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    model.config.eos_token_id = stop_at                      # as an EOS id: stop_reason None
    try:
        out = LLM(model).generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    finally:
        model.config.eos_token_id = 2
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None


def test_min_tokens_bans_stop(model):
    prompt = prompts_for(1, seed=12)[0]
    free = reference_greedy(model, prompt, 10)
    out = LLM(model).generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=6,
                                                       stop_token_ids=[free[0]], ignore_eos=True))[0].outputs[0]
    assert free[0] not in out.token_ids[:6]


# ---- errors ----

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2.0), "min_p"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(temperature=float("nan")), "temperature"),
    (dict(reasoning_mode="high"), "reasoning_mode"), (dict(stop=[""]), "stop"), (dict(stop=[1.5]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(thinking_budget=-1), "thinking_budget"),
    (dict(min_tokens=True), "min_tokens"), (dict(stop=5.5), "stop"), (dict(stop={"a": 1}), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(answer_prefix_ids=7), "answer_prefix_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"), (dict(skip_special_tokens=None), "skip_special_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_check_request_names_the_parameter(model):
    """Every request rule lives in LLMEngine.check_request; its RequestError names the parameter at fault
    (the server turns it into a 400 with that `param`), and add_request refuses the same requests."""
    eng = LLMEngine(model, max_model_len=32)
    V = model.config.vocab_size
    cases = [([], SamplingParams(), "prompt", None), ([5, V], SamplingParams(), "prompt", None),
             (list(range(3, 35)), SamplingParams(), "prompt", "context_length_exceeded"),
             ([5] * 20, SamplingParams(max_tokens=20), "max_tokens", "context_length_exceeded"),
             ([5], SamplingParams(stop=["x"]), "stop", None),
             ([5], SamplingParams(stop_token_ids=[V]), "stop_token_ids", None),
             ([5], SamplingParams(answer_prefix_ids=[V + 3]), "answer_prefix_ids", None),
             ([5], SamplingParams(logit_bias={V: 1.0}), "logit_bias", None)]
    for ids, params, param, code in cases:
        with pytest.raises(RequestError) as e:
            eng.check_request(ids, params)
        assert (e.value.param, e.value.code) == (param, code), (param, str(e.value))
        with pytest.raises(RequestError):
            eng.add_request("r", ids, params)
    assert not eng.requests and not eng.has_unfinished_requests()
    assert eng.check_request([5] * 20, SamplingParams(max_tokens=None)) == 12
    assert eng.check_request([5] * 20, SamplingParams(max_tokens=None), max_model_len=24) == 4   # a lower limit


def test_request_errors(model):
    llm = LLM(model, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(12, 44))])                  # 32 tokens: no room to generate
    with pytest.raises(ValueError, match="max_tokens=20 does not fit"):
        llm.generate([list(range(12, 32))], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 500]])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([[5, 6]], SamplingParams(stop=["x"]))
    assert not llm.engine.has_unfinished_requests()          # nothing half-queued
    out = llm.generate([list(range(12, 30))], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 32 - 18       # None: up to the context
    eng = llm.engine
    eng.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already running"):
        eng.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="MTP"):
        LLMEngine(tiny_model(0, mtp=False), num_speculative_tokens=2)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine(model, max_num_seqs=8, max_num_batched_tokens=8)


def test_chat_arguments_and_lone_surrogates(server_model_dir):
    llm = LLM(str(server_model_dir), max_model_len=256)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    with pytest.raises(ValueError, match="1 sampling params for 2 conversations"):
        llm.chat(convs, [SamplingParams(max_tokens=1)])       # used to drop the second conversation
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.chat(convs[0], {"max_tokens": 1})
    with pytest.raises(ValueError, match="messages must be a list"):
        llm.chat("hi")
    out = llm.generate("cut emoji \ud83d", SamplingParams(max_tokens=1))    # a lone surrogate: U+FFFD
    assert len(out[0].outputs[0].token_ids) == 1


def test_bad_prompts(model):
    llm = LLM(model, max_model_len=64)
    for prompt, match in ([True, False], "integers"), ({"prompt_token_ids": [5, 6.7]}, "integers"), \
            ({"prompt_token_ids": None}, "prompt_token_ids"), (None, "prompts must be"), (5, "prompts must be"), \
            (torch.tensor([5.0, 6.0]), "dtype"):
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, SamplingParams(max_tokens=1))
    assert len(llm.generate(torch.tensor([5, 6]), SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
    assert not llm.engine.has_unfinished_requests()


def test_abort_moves_a_grown_cache_slot(model):
    """Aborting a sequence moves the highest decoding one into its slot; after a long prompt the K/V buffers
    were regrown inside the step (inference tensors), and the copy outside inference mode used to raise."""
    eng = LLMEngine(model, max_num_seqs=2, max_model_len=1024)
    p = SamplingParams(max_tokens=20, ignore_eos=True)
    eng.add_request("a", [5] * 10, p)
    eng.add_request("b", [6] * 300, p)                       # > the initial 256-position buffers
    for _ in range(3):
        eng.step()
    assert [eng.requests[r].seqs[0].slot for r in "ab"] == [0, 1]
    eng.abort_request("a")
    assert eng.requests["b"].seqs[0].slot == 0
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs[-1].outputs[0].token_ids) == 20 and sorted(eng.scheduler.free_slots) == [0, 1]


def test_abort(model):
    llm = LLM(model, max_num_seqs=2)
    eng = llm.engine
    eng.add_request("x", prompts_for(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort_request("x")
    assert not eng.has_unfinished_requests() and sorted(eng.scheduler.free_slots) == [0, 1]


def test_engine_follows_in_place_weight_updates():
    """The engine's cached transposed lm_head is rebuilt when the weights change (RL rollouts reuse one
    engine between optimizer steps)."""
    m = tiny_model(7)
    llm = LLM(m)
    prompt = prompts_for(1, seed=13)[0]
    before = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)
    after = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert before == reference_greedy(tiny_model(7), prompt, 10)
    assert after == reference_greedy(m, prompt, 10) != before
