"""MTP boosting (Nemotron 3 Ultra's last post-training stage): `python -m nemotron3.train.mtp_boost RECIPE.json
[--resume] [--max-steps N] [--set boost.lr=3e-4]`.

Recipe: {"init": MODEL_DIR, "out_dir": DIR, "boost": {...} (BOOST_DEFAULTS), "data": {...} (DATA_DEFAULTS),
"acceptance": {...} (ACCEPT_DEFAULTS)}.

Design decisions (sources: /work/shared/reference/recipes.md §1.2):

* **Backbone frozen**: every parameter outside `model.mtp` has requires_grad False and is not in the optimizer
  (the shared embeddings and lm_head included), so the exported backbone is bit-identical to `init`.
* **Self-distillation target**: the backbone's own next-token distribution, not the data's tokens (gold CE off).
  Depth k's MTP logits at position t predict token t+k+1 (`NemotronHForCausalLM.forward_mtp`); the backbone logits
  at position t+k predict the same token, so loss_k = T^2 * KL(softmax(z_{t+k}/T) || softmax(z^mtp_{t,k}/T)), T = 2
  (Hinton scaling), averaged over positions whose predicted token t+k+1 is a policy (assistant) token, then over
  depths k = 1..D. Depths are recursive with teacher forcing (depth k consumes depth k-1's hidden states, as at
  inference); the Ultra TR's "inputs sampled from steps 1..k-1" noise is not reproduced.
* **Data**: by default the model's own rollouts on env train tasks (temperature 1, as the TR's on-policy rollouts
  of the MOPD checkpoint), loss on the sampled tokens only; or an `.npy` token stream (+ optional 0/1 mask `.npy`)
  such as the SFT token file, cut into `seq_len` rows.
* **Acceptance** (`acceptance`) is measured with the engine's self-speculative decoding (num_speculative_tokens=k,
  greedy) before and after training; printed, logged, and written to OUT_DIR/acceptance.json.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import checkpoint
from ..engine import LLM, SamplingParams
from .optim import set_lr, warmup_lr
from .recipe import Schema, stage_parser, train_stage
from .rollout import prompt_tokens, rollout
from .state import RunLog, export, load_checkpoint, resumable_checkpoint, save_checkpoint, seed_everything

BOOST_DEFAULTS = dict(depths=3, steps=200, lr=3e-4, warmup_steps=10, batch_size=8, temperature=2.0,
                      weight_decay=0.0, betas=[0.9, 0.95], grad_clip=1.0, seed=0, threads=1, save_every=50,
                      log_every=1)
DATA_DEFAULTS = dict(source="rollouts", envs=["calc", "code", "format"], tasks_per_env=64, samples=1,
                     temperature=1.0, max_tokens=256, max_total_tokens=1024, thinking_fraction=0.5,
                     tokens=None, mask=None, seq_len=512)
ACCEPT_DEFAULTS = dict(k=3, tasks_per_env=8, max_tokens=128, ignore_eos=False)
RECIPE = Schema(top={"init": None, "out_dir": "runs/mtp-boost"},
                sections={"boost": BOOST_DEFAULTS, "data": DATA_DEFAULTS, "acceptance": ACCEPT_DEFAULTS},
                required=("init",))


def boost_loss(model, ids: torch.Tensor, mask: torch.Tensor, depths: int, T: float = 2.0):
    """ids [B, L], mask [B, L] (1 = train on predicting this token) -> (mean over depths, per-depth [D] detached).
    The backbone runs without grad; only the MTP steps build a graph."""
    with torch.no_grad():
        h = model.hidden_states(ids)
        z = model.logits(h)                                          # z[:, p] predicts token p+1
    L, terms = ids.shape[1], []
    for k in range(1, depths + 1):
        if L - k - 1 <= 0:
            break
        logits, h = model.mtp_step(h[:, :L - k], ids[:, k:], k)     # position t predicts token t+k+1
        w = mask[:, k + 1:].float()                                  # predicted token t+k+1 exists for t < L-k-1
        tgt = F.log_softmax(z[:, k:L - 1] / T, -1)
        kl = (tgt.exp() * (tgt - F.log_softmax(logits[:, :L - k - 1] / T, -1))).sum(-1) * T * T
        terms.append((kl * w).sum() / w.sum().clamp(min=1))
    t = torch.stack(terms)
    return t.mean(), t.detach()


def freeze_backbone(model) -> list:
    model.requires_grad_(False)
    if model.mtp is None:
        raise ValueError("the model has no MTP block (num_nextn_predict_layers = 0)")
    model.mtp.requires_grad_(True)
    return [p for p in model.mtp.parameters()]


def acceptance(model_or_dir, prompts, k: int, max_tokens: int = 128, tokenizer=None, max_num_seqs: int = 16,
               ignore_eos: bool = False) -> dict:
    """Self-speculative decoding with the MTP head (num_speculative_tokens=k, greedy) over `prompts` (texts or
    token-id lists): the engine's draft acceptance rate and mean accepted length (tokens per verify step);
    None when nothing was drafted (every reply ended at once)."""
    llm = LLM(model_or_dir, tokenizer, num_speculative_tokens=k, max_num_seqs=max_num_seqs)
    prompts = [{"prompt_token_ids": list(p)} if not isinstance(p, str) else p for p in prompts]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos))
    s = llm.stats()
    return {"k": k, "acceptance_rate": s["spec_acceptance_rate"], "mean_accepted_length": s["spec_mean_accepted_length"],
            "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def build_data(model, tok, d: dict, seed: int) -> list[tuple[list[int], list[int]]]:
    """Rows of (ids, mask): the model's own rollouts on env train tasks, or an .npy token stream cut into rows."""
    if d["source"] == "npy":
        toks = np.load(d["tokens"]).astype(np.int64)
        mask = np.load(d["mask"]).astype(np.int64) if d.get("mask") else np.ones_like(toks)
        L = d["seq_len"]
        return [(toks[i:i + L].tolist(), mask[i:i + L].tolist()) for i in range(0, len(toks) - L + 1, L)]
    if d["source"] != "rollouts":
        raise ValueError(f"data.source must be 'rollouts' or 'npy', got {d['source']!r}")
    from .envs import get_env
    envs = {n: get_env(n) for n in d["envs"]}
    tasks = [t for e in envs.values() for t in e.tasks("train", d["tasks_per_env"])]
    flags = [random.Random(f"{seed}:{i}").random() < d["thinking_fraction"] for i in range(len(tasks))]
    llm = LLM(model, tok, max_num_seqs=32, seed=seed)
    rolls = rollout(llm, envs, tasks, d["samples"], SamplingParams(temperature=d["temperature"],
                    max_tokens=d["max_tokens"], seed=seed), flags, d["max_total_tokens"])
    return [(x.tokens, x.mask) for x in rolls]


def _batch(rows, idx):
    L = max(len(rows[i][0]) for i in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    mask = torch.zeros(len(idx), L)
    for b, i in enumerate(idx):
        t, m = rows[i]
        ids[b, :len(t)], mask[b, :len(m)] = torch.tensor(t), torch.tensor(m, dtype=torch.float32)
    return ids, mask


def _accept_prompts(tok, a: dict, envs: list[str]) -> list[list[int]]:
    from .envs import get_env
    return [prompt_tokens(tok, t, True) for n in envs for t in get_env(n).tasks("test", a["tasks_per_env"])]


def train(recipe: dict, resume: bool = False, max_steps: int | None = None) -> dict:
    from ..tokenizer import load_tokenizer
    b, d, a = recipe["boost"], recipe["data"], recipe["acceptance"]
    torch.set_num_threads(b["threads"])
    out_dir = Path(recipe["out_dir"])
    ckpt = resumable_checkpoint(out_dir, resume)
    seed_everything(b["seed"])
    tok = load_tokenizer(recipe["init"])
    model = checkpoint.load(ckpt or recipe["init"], dtype=torch.float32)
    params = freeze_backbone(model)
    opt = torch.optim.AdamW(params, lr=b["lr"], betas=tuple(b["betas"]), weight_decay=b["weight_decay"])
    state = {"step": 0, "elapsed": 0.0, "before": None}
    if ckpt is not None:
        load_checkpoint(ckpt, model, opt, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, recipe, state, resumed=ckpt is not None)

    envs = d["envs"]
    prompts = _accept_prompts(tok, a, envs) if a["k"] else []
    if prompts and state["before"] is None:
        state["before"] = acceptance(recipe["init"], prompts, a["k"], a["max_tokens"], ignore_eos=a["ignore_eos"])
        log({"phase": "acceptance", "when": "before", **state["before"]})
        print(f"acceptance before: {state['before']}", file=sys.stderr, flush=True)
    rows = build_data(model, tok, d, b["seed"])     # a pure function of the frozen backbone: same on resume
    if not rows:
        raise ValueError("mtp_boost: no training rows")
    model.eval()                                     # no dropout anywhere; eval keeps the engine's view too
    end = b["steps"] if max_steps is None else min(max_steps, b["steps"])
    step = state["step"]
    while step < end:
        t0 = time.perf_counter()
        rng = random.Random(f"{b['seed']}:{step}")
        ids, mask = _batch(rows, [rng.randrange(len(rows)) for _ in range(b["batch_size"])])
        lr = warmup_lr(step, b["lr"], b["warmup_steps"])
        set_lr(opt, lr)
        loss, per = boost_loss(model, ids, mask, b["depths"], b["temperature"])
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, b["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        state.update(step=step, elapsed=state["elapsed"] + dt)
        if step % b["log_every"] == 0 or step == end:
            log({"phase": "boost", "loss": loss.item(), "kl_per_depth": per.tolist(), "lr": lr,
                 "grad_norm": float(gn), "step_s": round(dt, 3), "time": round(state["elapsed"], 2)})
            print(f"step {step}/{b['steps']} | kl {loss.item():.4f} | " + " ".join(f"{x:.3f}" for x in per.tolist()),
                  file=sys.stderr, flush=True)
        if step % b["save_every"] == 0 or step == end:
            save_checkpoint(out_dir, model, opt, state)
    result = {"step": step, "before": state["before"]}
    if step >= b["steps"]:
        export(out_dir, recipe["init"])
        if prompts:
            result["after"] = acceptance(out_dir / "model", prompts, a["k"], a["max_tokens"], ignore_eos=a["ignore_eos"])
            log({"phase": "acceptance", "when": "after", **result["after"]})
        (out_dir / "acceptance.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    ap = stage_parser("python -m nemotron3.train.mtp_boost", __doc__, progress=False)
    train_stage(ap, ap.parse_args(argv), RECIPE, train)


if __name__ == "__main__":
    main()
