"""Helpers for the engine tests: tiny random models (with MTP), references computed by full forwards."""
import pytest
import torch

from helpers import randomize, small_config
from nemotron3 import NemotronHForCausalLM


@pytest.fixture(autouse=True)
def one_thread():
    """The engine tests run many tiny ops: one intra-op thread avoids OpenMP spin-wait stalls when the
    machine is shared (two threads on a busy 2-core box were 60x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, pattern="M*EM-E", mtp=True, lm_scale=1.0, **overrides):
    torch.manual_seed(seed)
    cfg = small_config(pattern, moe_latent_size=16, num_nextn_predict_layers=1 if mtp else 0, **overrides)
    model = randomize(NemotronHForCausalLM(cfg).eval(), seed)
    if lm_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_scale)
    return model


def agreeing_model(seed=0, noise=0.0, mixer_scale=0.05, vocab=64):
    """A model whose MTP block mostly predicts what the backbone will: the mixers' outputs are scaled
    down (the backbone's next token depends mostly on the current token, still a little on the Mamba and
    attention state), and the MTP step passes the next token's embedding through (eh_proj = [I | noise])
    so its prediction for t+2 is the backbone's rule applied to token t+1."""
    model = tiny_model(seed, vocab_size=vocab, lm_scale=20.0)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(mixer_scale)
        for layer in model.mtp.layers:
            for name, p in layer.mixer.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                    p.zero_()
        first = model.mtp.layers[0]
        first.enorm.weight.copy_(model.backbone.norm_f.weight)
        model.mtp.layers[-1].final_layernorm.weight.fill_(1.0)
        w = torch.zeros(d, 2 * d)
        w[:, :d] = torch.eye(d)
        w[:, d:] = noise * torch.randn(d, d, generator=g)
        first.eh_proj.weight.copy_(w)
        model.backbone.norm_f.weight.fill_(1.0)
        first.enorm.weight.fill_(1.0)
    return model


@torch.no_grad()
def full_logprobs(model, prompt, output):
    """log_softmax of one full forward over prompt + output at the positions that produced `output`."""
    ids = torch.tensor([list(prompt) + list(output)])
    lp = torch.log_softmax(model(ids)[0].float(), -1)
    P = len(prompt)
    return lp[P - 1:P - 1 + len(output)]


@torch.no_grad()
def reference_greedy(model, prompt, n, stop=()):
    ids = list(prompt)
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(t)
        if t in stop:
            break
    return ids[len(prompt):]


def assert_logprobs_match(model, prompt, completion, rtol=1e-4):
    """The engine's logprob of every generated token equals the full forward's (relative 1e-4 of the
    largest magnitude, the model parity tests' tolerance)."""
    ref = full_logprobs(model, prompt, completion.token_ids)
    got = torch.tensor([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)])
    want = ref[torch.arange(len(completion.token_ids)), torch.tensor(completion.token_ids)]
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(1.0, float(want.abs().max())))
