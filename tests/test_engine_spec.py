"""MTP self-speculative decoding: greedy identity, state rollback exactness, acceptance accounting, and
statistical losslessness of speculative rejection sampling."""
import pytest
import torch

from engine_utils import (agreeing_model, assert_logprobs_match, one_thread, reference_greedy,  # noqa: F401
                          tiny_model)
from nemotron3.engine import LLM, SamplingParams
from nemotron3.engine import speculative as spec_mod
from nemotron3.engine.speculative import accept_greedy, accept_sampled

PROMPTS = [[5, 9, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 17], [33] * 9, [12, 60, 61, 62, 14]]


@pytest.fixture(scope="module")
def random_mtp():
    return tiny_model(0)


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model(vocab=64)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_speculative_equals_plain_greedy(random_mtp, agreeing, k):
    """Identical tokens for k = 1..4, on a random MTP (low acceptance) and an agreeing one (high); every
    logprob equals a full forward's, so the rolled-back Mamba/KV/MTP states are exact."""
    for model, prompts in ((random_mtp, PROMPTS), (agreeing, [[p % 64 for p in q] for q in PROMPTS])):
        sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=0)
        llm = LLM(model, max_num_seqs=3, num_speculative_tokens=k, block_size=4, max_num_batched_tokens=20)
        outs = llm.generate(prompts, sp)
        plain = LLM(model, max_num_seqs=3, block_size=4).generate(prompts, sp)
        for p, o, r in zip(prompts, outs, plain):
            assert o.outputs[0].token_ids == r.outputs[0].token_ids == reference_greedy(model, p, 14)
            assert_logprobs_match(model, p, o.outputs[0])
        st = llm.stats()
        assert st["spec_draft_tokens"] == k * st["spec_verify_steps"]
        assert st["decode_tokens"] == len(prompts) * 13          # the first token comes from the prefill
        if model is agreeing:
            assert st["spec_acceptance_rate"] > 0.3 and st["spec_mean_accepted_length"] > 1.3


def test_acceptance_accounting_per_request(agreeing):
    out = LLM(agreeing, num_speculative_tokens=3).generate(
        [[5, 9, 13]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    m = out.metrics
    assert m.spec_draft_tokens == 3 * m.spec_verify_steps
    # every verify round emits accepted + 1 tokens (the last round may be cut short by max_tokens)
    assert m.spec_verify_steps + m.spec_accepted_tokens >= 29 >= m.spec_verify_steps
    assert m.spec_mean_accepted_length == pytest.approx(1 + m.spec_accepted_tokens / m.spec_verify_steps)
    assert len(out.outputs[0].token_ids) == 30


def test_accept_greedy_constructed():
    drafts = torch.tensor([[4, 5, 6], [4, 5, 6], [1, 2, 3], [7, 7, 7]])
    target = torch.tensor([[4, 5, 6, 9], [4, 8, 6, 9], [0, 2, 3, 9], [7, 7, 7, 1]])
    a, nxt = accept_greedy(drafts, target)
    assert a.tolist() == [3, 1, 0, 3] and nxt.tolist() == [9, 8, 0, 1]


def test_accept_sampled_constructed():
    k = 2
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * (k + 1))[None]
    drafts = torch.tensor([[0, 1]])
    u = torch.tensor([[0.999, 0.999, 0.3]], dtype=torch.float64)
    # q == p: always accepted, bonus drawn from p[k] with u_k = 0.3 -> token 0
    a, nxt = accept_sampled(drafts, p, p[:, :k], u)
    assert a.tolist() == [2] and nxt.tolist() == [0]
    # a draft the target never produces is always rejected; the residual max(p - q, 0) = p here
    q = torch.tensor([[[0.0, 0.0, 1.0, 0.0]] * k])
    a, nxt = accept_sampled(torch.tensor([[2, 2]]), p, q, torch.tensor([[0.0, 0.0, 0.7]], dtype=torch.float64))
    assert a.tolist() == [0] and nxt.tolist() == [1]
    # p(d)/q(d) = 0.5: accepted iff u < 0.5
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0]] * k])
    zeros = torch.tensor([[0, 0]])
    a, nxt = accept_sampled(zeros, p, q, torch.tensor([[0.49, 0.51, 0.0]], dtype=torch.float64))
    assert a.tolist() == [1] and nxt.tolist() == [1]        # residual (0, 0.5, 0, 0) -> token 1
    a, nxt = accept_sampled(zeros, p, q, torch.tensor([[0.51, 0.0, 0.0]], dtype=torch.float64))
    assert a.tolist() == [0] and nxt.tolist() == [1]


def test_stop_inside_accepted_drafts(agreeing):
    """A stop token in the middle of an accepted run ends the request there, with consistent state."""
    prompt = [5, 9, 13]
    free = reference_greedy(agreeing, prompt, 20)
    stop = free[6]
    upto = free.index(stop) + 1
    llm = LLM(agreeing, num_speculative_tokens=4)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop],
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free[:upto] and out.finish_reason == "stop"
    # the end-of-request snapshot is reusable: a follow-up request continues exactly
    follow = prompt + free[:upto] + [7, 8]
    again = llm.generate([follow], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))[0]
    assert again.metrics.num_cached_tokens == len(prompt) + upto - 1
    assert again.outputs[0].token_ids == reference_greedy(agreeing, follow, 6)
    assert_logprobs_match(agreeing, follow, again.outputs[0])


def test_seeded_speculative_sampling_is_batch_independent(random_mtp):
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    alone = LLM(random_mtp, max_num_seqs=1, num_speculative_tokens=2).generate([PROMPTS[0]], sp)[0]
    mixed = LLM(random_mtp, max_num_seqs=4, num_speculative_tokens=2).generate(
        PROMPTS[1:4] + [PROMPTS[0]], [SamplingParams(temperature=0.7, seed=i, max_tokens=5 + i, ignore_eos=True)
                                      for i in range(3)] + [sp])[-1]
    assert alone.outputs[0].token_ids == mixed.outputs[0].token_ids


# ---- statistical losslessness ----

def exact_joint(model, prompt, V):
    """P(x1, x2, x3 | prompt) at temperature 1, from full forwards over all V^2 two-token continuations."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)
        p2 = torch.softmax(model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], -1)
        ids3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(model(ids3)[:, -1], -1).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_pvalue(counts, expected, min_expected=5.0):
    """Pearson chi-square over the cells (cells expected < 5 are pooled); p-value from the chi2 survival
    function Q(dof/2, stat/2)."""
    big = expected >= min_expected
    c = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    e = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    keep = e > 0
    stat = ((c - e) ** 2 / e)[keep].sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2)), dof


def sample_first_tokens(model, prompt, k, n, V):
    llm = LLM(model, max_num_seqs=64, num_speculative_tokens=k, block_size=4, max_model_len=32)
    out = llm.generate([prompt], SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=3, ignore_eos=True))[0]
    counts = torch.zeros(V, V, V)
    for c in out.outputs:
        counts[tuple(c.token_ids)] += 1
    return counts.flatten(), out.metrics.spec_acceptance_rate


@pytest.mark.parametrize("case, k", [("random", 2), ("agreeing", 3)])
def test_speculative_sampling_is_lossless(case, k):
    """2500 samples of the first three tokens (the first from the prefill, the next two from verify rounds,
    through accepts, rejections+residuals and bonus tokens) follow the exact target distribution:
    chi-square against P(x1, x2, x3) computed from full forwards. Acceptance 0.2-0.8 exercises both paths."""
    V, N, prompt = 16, 2500, [3, 9, 4, 11, 7]
    model = tiny_model(3, vocab_size=V, lm_scale=4.0) if case == "random" else agreeing_model(vocab=V, mixer_scale=0.08)
    counts, acc = sample_first_tokens(model, prompt, k, N, V)
    assert 0.2 < acc < 0.8
    pvalue, dof = chi_square_pvalue(counts, exact_joint(model, prompt, V).flatten() * N)
    assert dof >= 10 and pvalue > 1e-3, (pvalue, dof)


def test_losslessness_test_has_power(monkeypatch):
    """Negative control: a verifier that accepts every draft samples from the MTP's distribution and the
    same chi-square test rejects it outright."""
    V, N, prompt = 16, 1000, [3, 9, 4, 11, 7]
    model = tiny_model(3, vocab_size=V, lm_scale=4.0)
    monkeypatch.setattr(spec_mod, "accept_sampled",
                        lambda d, p, q, u: (torch.full((d.shape[0],), d.shape[1]), p[:, -1].argmax(-1)))
    counts, acc = sample_first_tokens(model, prompt, 2, N, V)
    pvalue, _ = chi_square_pvalue(counts, exact_joint(model, prompt, V).flatten() * N)
    assert acc == 1.0 and pvalue < 1e-6


def test_mamba_layers_in_the_mtp_block_roll_back():
    """An MTP block with a Mamba layer (mtp_pattern 'M*E'): its recurrent state keeps the MTP invariant
    (entries < num_computed - 1) as its K/V length does; the pending last entry, the rejected entries and
    the draft entries are undone. So a seeded sampled request gives the same tokens when its prompt is
    restored from the prefix cache, and the state saved at a request's end equals a fresh prefill's."""
    model = tiny_model(0, pattern="M*EM", mtp_pattern="M*E")
    p = torch.randint(12, 96, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    sp = SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True)
    alone = LLM(model, num_speculative_tokens=2, enable_prefix_caching=False).generate([p], sp)[0]
    llm = LLM(model, num_speculative_tokens=2)
    assert llm.generate([p, [7, 8, 9]], sp)[0].outputs[0].token_ids == alone.outputs[0].token_ids
    again = llm.generate([p], sp)[0]
    assert again.metrics.num_cached_tokens == len(p)
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids
    seen = p + alone.outputs[0].token_ids[:-1]
    end = llm.engine.prefix_cache.lookup(seen)
    fresh = LLM(model, num_speculative_tokens=2)
    fresh.generate([seen], SamplingParams(temperature=0, max_tokens=1))
    ref = fresh.engine.prefix_cache.lookup(seen)
    assert end.length == ref.length == len(seen) and end.state.mtp_length == ref.state.mtp_length
    for i in ref.state.conv:
        torch.testing.assert_close(end.state.conv[i], ref.state.conv[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(end.state.ssm[i], ref.state.ssm[i], rtol=1e-4, atol=1e-5)
    for i in ref.state.k:
        torch.testing.assert_close(end.state.k[i], ref.state.k[i], rtol=1e-4, atol=1e-5)
