"""logit_bias and presence / frequency / repetition penalties (vLLM's SamplingParams fields): checked
against a written-out formula, through plain decode, the batch-1 plan, speculation (greedy identity and
exact rejection sampling) and validation."""
import pytest
import torch

from engine_utils import agreeing_model, one_thread, tiny_model  # noqa: F401
from nemotron3.engine import LLM, SamplingParams
from nemotron3.engine.sampling import Penalties
from test_engine_spec import chi_square_pvalue


def penalize(row, prompt, out, rep=1.0, freq=0.0, pres=0.0, bias=None):
    """vLLM's processing, one token at a time: bias, repetition over prompt + output, then frequency and
    presence over the output."""
    row = row.clone()
    for t, b in (bias or {}).items():
        row[t] += b
    for t in set(prompt) | set(out):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    for t in set(out):
        row[t] -= freq * out.count(t) + pres
    return row


def test_penalties_apply_matches_formula():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(50, generator=g) * 3
    prompt, out = [3, 7, 7, 9], [7, 11, 11, 11, 2]
    sp = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7,
                        logit_bias={2: 5.0, 49: -200.0})
    got = row.clone()
    Penalties(sp, torch.tensor(prompt).unique(), out).apply(got)
    want = penalize(row, prompt, out, 1.3, 0.4, -0.7, {2: 5.0, 49: -100.0})    # bias clamped to [-100, 100]
    torch.testing.assert_close(got, want)


def reference_penalized_greedy(model, prompt, n, **kw):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            row = penalize(model(torch.tensor([ids]))[0, -1], prompt, ids[len(prompt):], **kw)
            ids.append(int(row.argmax()))
    return ids[len(prompt):]


PEN = dict(rep=1.5, freq=0.6, pres=0.3)


def params(**kw):
    return SamplingParams(repetition_penalty=PEN["rep"], frequency_penalty=PEN["freq"], presence_penalty=PEN["pres"],
                          **kw)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("fast", [True, False])
def test_penalized_greedy_equals_reference(k, fast):
    """A model that repeats itself: penalties change its output, and every path gives the formula's tokens
    (batch 1 through the decode plan, the batched forward, MTP speculation with drafts in the history)."""
    model = agreeing_model(vocab=64)
    prompts = [[5, 9, 13, 5, 9], [20, 21, 22], [33] * 6]
    sp = params(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(model, max_num_seqs=2, num_speculative_tokens=k, fast_decode=fast)
    outs = llm.generate(prompts, sp)
    for p, o in zip(prompts, outs):
        ref = reference_penalized_greedy(model, p, 16, **PEN)
        assert o.outputs[0].token_ids == ref
    plain = LLM(model, max_num_seqs=2).generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs, plain))
    alone = LLM(model, max_num_seqs=1).generate(prompts[2:], sp)[0].outputs[0].token_ids
    assert alone == outs[2].outputs[0].token_ids


def test_logit_bias_forces_and_bans():
    model = tiny_model(1)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={17: 100.0})
    assert LLM(model).generate([[4, 5, 6]], sp)[0].outputs[0].token_ids == [17] * 5
    free = LLM(model).generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    first = free[0].outputs[0].token_ids[0]
    banned = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={first: -100.0})
    assert LLM(model).generate([[4, 5, 6]], banned)[0].outputs[0].token_ids[0] != first
    with pytest.raises(ValueError, match="logit_bias: token id out of range"):
        LLM(model).generate([[4, 5, 6]], SamplingParams(logit_bias={10 ** 6: 1.0}))


@pytest.mark.parametrize("kw, field", [
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={5: float("inf")}), "logit_bias"),
    (dict(logit_bias=[5]), "logit_bias")])
def test_bad_penalty_values(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def exact_penalized_joint(model, prompt, V):
    """P(x1, x2, x3 | prompt) at temperature 1 under PEN, from full forwards and the written-out formula."""
    def dist(seqs):
        with torch.no_grad():
            rows = model(torch.tensor([prompt + s for s in seqs]))[:, -1]
        return torch.stack([torch.softmax(penalize(r, prompt, s, **PEN), -1) for r, s in zip(rows, seqs)])
    p1 = dist([[]])[0]
    p2 = dist([[a] for a in range(V)])
    p3 = dist([[a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def test_penalized_speculative_sampling_is_lossless():
    """Rejection sampling with penalties that depend on the drafts before each position: 2500 samples of
    three tokens (k = 2) follow the exact penalized distribution (chi-square)."""
    V, N, prompt = 16, 2500, [3, 9, 4, 11, 7]
    model = agreeing_model(vocab=V, mixer_scale=0.08)
    llm = LLM(model, max_num_seqs=64, num_speculative_tokens=2, block_size=4, max_model_len=32)
    out = llm.generate([prompt], params(n=N, temperature=1.0, seed=0, max_tokens=3, ignore_eos=True))[0]
    counts = torch.zeros(V, V, V)
    for c in out.outputs:
        counts[tuple(c.token_ids)] += 1
    assert 0.2 < out.metrics.spec_acceptance_rate < 0.9
    pvalue, dof = chi_square_pvalue(counts.flatten(), exact_penalized_joint(model, prompt, V).flatten() * N)
    assert dof >= 10 and pvalue > 1e-3, (pvalue, dof)


def test_generate_cli_repetition_penalty(server_model_dir, capsys):
    """`nemotron3 generate --repetition-penalty`: the CLI's text equals the engine's with the same params; a
    bad value is a clean error."""
    from nemotron3.checkpoint import load
    from nemotron3.cli import main as cli_main
    from nemotron3.tokenizer import load_tokenizer
    tok = load_tokenizer(server_model_dir)
    model = load(server_model_dir)
    ids = tok.encode("def f(x):")
    stop = [tok.eos_id] + [i for i in (tok.token_to_id("<|im_end|>"),) if i is not None]
    for rp in (1.0, 3.0):
        cli_main(["generate", "--model", str(server_model_dir), "--max-tokens", "12", "--repetition-penalty", str(rp),
                  "def f(x):"])
        out = LLM(model).generate([ids], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=rp,
                                                        stop_token_ids=stop, ignore_eos=True))[0].outputs[0]
        assert capsys.readouterr().out == tok.decode(out.token_ids) + "\n"
    with pytest.raises(SystemExit, match="repetition_penalty must be > 0"):
        cli_main(["generate", "--model", str(server_model_dir), "--repetition-penalty", "0", "hi"])
