"""MTP: no reference library runs it, so check it against the formula written out with plain tensor ops."""
import math

import torch
import torch.nn.functional as F

from helpers import randomize, small_config
from nemotron3 import HybridCache, NemotronHForCausalLM


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def attention_ref(x, p, cfg):
    """Causal GQA, no positional encoding, explicit softmax."""
    T = x.shape[0]
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = (x @ p["q_proj.weight"].T).view(T, nq, hd)
    k = (x @ p["k_proj.weight"].T).view(T, nkv, hd)
    v = (x @ p["v_proj.weight"].T).view(T, nkv, hd)
    out = torch.zeros(T, nq, hd)
    for h in range(nq):
        kv = h // (nq // nkv)
        s = q[:, h] @ k[:, kv].T / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, kv]
    return out.reshape(T, -1) @ p["o_proj.weight"].T


def moe_ref(x, p, cfg):
    """Token by token, expert by expert: sigmoid router, biased selection, normalised unbiased weights."""
    out = torch.zeros_like(x)
    relu2 = lambda t: F.relu(t) ** 2  # noqa: E731
    for t in range(x.shape[0]):
        s = torch.sigmoid(p["gate.weight"] @ x[t])
        chosen = torch.topk(s + p["gate.e_score_correction_bias"], cfg.num_experts_per_tok).indices
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        z = p["fc1_latent_proj.weight"] @ x[t]
        r = sum(w[i] * (p["experts.down_proj"][e] @ relu2(p["experts.up_proj"][e] @ z)) for i, e in enumerate(chosen))
        out[t] = p["fc2_latent_proj.weight"] @ r + p["shared_experts.down_proj.weight"] @ relu2(
            p["shared_experts.up_proj.weight"] @ x[t])
    return out


def mtp_ref(model, ids, depths):
    """Written-out MTP: h^0 = backbone output (after norm_f); depth k at position t reads h^{k-1}_t and emb(x_{t+k})."""
    cfg, eps = model.config, model.config.layer_norm_epsilon
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    l0, l1 = sub("mtp.layers.0."), sub("mtp.layers.1.")
    emb, head = sd["backbone.embeddings.weight"], sd["lm_head.weight"]
    with torch.no_grad():
        h = model.hidden_states(ids)[0]
    x_ids, T, outs = ids[0], ids.shape[1], []
    for k in range(1, depths + 1):
        e = emb[x_ids[k:]]
        hk = h[: T - k]
        u = torch.cat([rms(e, l0["enorm.weight"], eps), rms(hk, l0["hnorm.weight"], eps)], -1) @ l0["eh_proj.weight"].T
        u = u + attention_ref(rms(u, l0["norm.weight"], eps), sub("mtp.layers.0.mixer."), cfg)
        u = u + moe_ref(rms(u, l1["norm.weight"], eps), sub("mtp.layers.1.mixer."), cfg)
        h = rms(u, l1["final_layernorm.weight"], eps)
        outs.append(h @ head.T)
    return outs


def make():
    torch.manual_seed(0)
    cfg = small_config("M*E", moe_latent_size=16, num_nextn_predict_layers=1, mtp_pattern="*E")
    return randomize(NemotronHForCausalLM(cfg).eval())


def test_mtp_matches_written_out_formula():
    model = make()
    ids = torch.randint(0, model.config.vocab_size, (1, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        main, mtp = model.forward_mtp(ids, depths=3)
    ref = mtp_ref(model, ids, 3)
    assert main.shape == (1, 15, model.config.vocab_size)
    assert [m.shape[1] for m in mtp] == [14, 13, 12]
    for ours, want in zip(mtp, ref):
        torch.testing.assert_close(ours[0], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mtp_step_with_cache_equals_full():
    """Drafting path: the MTP block fed one position at a time over its own KV cache slot."""
    model = make()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.hidden_states(ids)
        full, _ = model.mtp_step(h[:, :-1], ids[:, 1:])
        cache = HybridCache(model.config, num_slots=2)
        steps = [model.mtp_step(h[:, :5], ids[:, 1:6], cache=cache)[0]]
        for t in range(5, 11):
            steps.append(model.mtp_step(h[:, t:t + 1], ids[:, t + 1:t + 2], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.mtp_lengths.tolist() == [11, 11] and cache.lengths.tolist() == [0, 0]


def test_mtp_gradient_reaches_shared_head_and_embedding():
    model = make().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    _, mtp = model.forward_mtp(ids, depths=2)
    sum(m.sum() for m in mtp).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.backbone.embeddings.weight.grad.abs().sum() > 0
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
