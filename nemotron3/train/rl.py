"""Reinforcement learning from verifiable rewards (GRPO) and multi-teacher on-policy distillation (MOPD):
`python -m nemotron3.train.rl RECIPE.json [--resume] [--max-steps N] [--set rl.lr=1e-5]`.

Recipe: {"init": MODEL_DIR, "out_dir": DIR, "mode": "grpo" | "mopd", "envs": ["calc", "code", "format"],
"teachers": {"calc": DIR, ...} (mopd), "rl": {...} (RL_DEFAULTS), "warmup_sft": {...} (mopd, WARMUP_DEFAULTS)}.

Design decisions (sources: /work/shared/reference/recipes.md §4.3-4.4):

* **Rollouts** come from the inference engine (`rollout.py`, token-exact, multi-turn with tool calls) sharing the
  trained model's weights: the engine is the "vLLM" of NeMo-RL, the training forward the "Megatron". After every
  optimizer update the engine's prefix cache is cleared (its states belong to the old weights).
* **GRPO (RLVR as in Nemotron 3 / NeMo-RL)**: `group_size` samples per prompt; advantage of sample i =
  (r_i - mean_{j != i} r_j) / (std_group + 1e-4) (leave-one-out baseline, std-normalised; unbiased std). Groups
  whose rewards are all equal have zero advantage and are dropped from the batch (DAPO's dynamic sampling: they
  would only dilute the token normaliser). Loss = PPO clipped surrogate with asymmetric "clip-higher"
  (1 - clip_low, 1 + clip_high) = (0.8, 1.28), per-token ratio exp(logp - logp_old) on policy tokens, averaged
  over all policy tokens of the minibatch (token-level, DAPO), no KL term, no entropy bonus.
  logp_old = the trained model's own log-probs from a no-grad forward before the updates (not the engine's, so
  the first minibatch has ratio exactly 1 and engine/trainer numeric mismatch never enters the ratio).
  `updates_per_batch` minibatches (x `epochs`) per rollout batch make the later updates off-policy, which is
  where the clip acts.
* **MOPD (Nemotron 3 Ultra, after MiMo / Thinking Machines' on-policy distillation)**: the student samples on
  every domain; the teacher of the rollout's env scores the sampled tokens with one forward over the same ids;
  per-token advantage A_t = log pi_teacher(y_t) - log pi_old(y_t) (detached: a per-token reverse-KL estimate on
  the sampled token, discount 0) in the same clipped loss. A short SFT warm-up on correct teacher rollouts
  (`warmup_sft`) precedes it (Ultra TR §3.3.3: it removes the teacher/student distribution mismatch).
* Rewards come from `Env.score` (penalties for malformed tool calls / unclosed thinking included).
* MoE routers are frozen and the correction bias is never updated (NeMo-RL `freeze_moe_router`,
  `moe_router_load_balancing_type: none`); the MTP block is not trained here (see mtp_boost.py).
* Checkpoints, resume, log.jsonl and export are state.py's, as for every trainer (atomic safetensors
  checkpoints; the batch of a step is a pure function of (seed, step, weights), so `--resume` replays the
  uninterrupted run).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..engine import LLM, SamplingParams
from .optim import adamw, set_lr, warmup_lr
from .recipe import Schema, stage_parser, train_stage
from .rollout import Rollout, rollout
from .state import RunLog, export, load_checkpoint, resumable_checkpoint, save_checkpoint, seed_everything

RL_DEFAULTS = dict(
    prompts_per_step=8, group_size=4, lr=1e-5, warmup_steps=0, steps=100, temperature=1.0, top_p=1.0,
    max_tokens=256, max_total_tokens=1024, clip_low=0.2, clip_high=0.28, updates_per_batch=2, epochs=1,
    thinking_fraction=0.5, seed=0, threads=1, save_every=10, eval_every=25, eval_tasks=20, eval_max_tokens=256,
    weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0, micro_batch=8, max_num_seqs=32,
    freeze_router=True)
WARMUP_DEFAULTS = dict(steps=0, tasks_per_env=32, samples=2, temperature=0.7, batch_size=8, lr=1e-5)
ENVS_DEFAULT = ["calc", "code", "format"]
RECIPE = Schema(top={"init": None, "out_dir": "runs/rl", "mode": "grpo", "envs": ENVS_DEFAULT, "teachers": {}},
                sections={"rl": RL_DEFAULTS, "warmup_sft": WARMUP_DEFAULTS}, required=("init",),
                choices={"mode": ("grpo", "mopd")})


# ----------------------------------------------------------------------------------------------------
# advantages and losses
# ----------------------------------------------------------------------------------------------------

def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [G, n] -> advantages [G, n]: (r_i - mean_{j != i} r_j) / (std_group + eps); 0 where std = 0."""
    n = rewards.shape[1]
    if n < 2:
        return torch.zeros_like(rewards)
    loo = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    std = rewards.std(1, keepdim=True)
    return torch.where(std > 0, (rewards - loo) / (std + eps), torch.zeros_like(rewards))


def clipped_pg_loss(logp, logp_old, adv, mask, clip_low: float = 0.2, clip_high: float = 0.28, denom=None):
    """PPO clipped surrogate, token-level: -sum_t m_t min(r_t A_t, clip(r_t, 1-lo, 1+hi) A_t) / denom with
    r_t = exp(logp_t - logp_old_t). All tensors [B, T]; denom defaults to sum(mask).
    Returns (loss, number of masked tokens where the clipped term was the active one)."""
    ratio = torch.exp(logp - logp_old)
    s1 = ratio * adv
    s2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    surr = torch.minimum(s1, s2)
    denom = mask.sum().clamp(min=1) if denom is None else denom
    loss = -(surr * mask).sum() / denom
    clipped = ((s2 < s1) & (mask > 0)).sum()
    return loss, clipped


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for t < T-1: [B, T-1] (fp32)."""
    logits = model(ids)[:, :-1]
    tgt = ids[:, 1:]
    return logits.gather(-1, tgt[..., None])[..., 0] - torch.logsumexp(logits, -1)


def pad_batch(rolls: list[Rollout], pad_id: int = 0):
    """-> ids [B, T] (right-padded; the model is causal, so padding never reaches real positions) and the
    target mask [B, T-1] (1 where token t+1 was sampled by the policy)."""
    T = max(len(r.tokens) for r in rolls)
    ids = torch.full((len(rolls), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rolls), T)
    for i, r in enumerate(rolls):
        ids[i, :len(r.tokens)] = torch.tensor(r.tokens)
        mask[i, :len(r.mask)] = torch.tensor(r.mask, dtype=torch.float32)
    return ids, mask[:, 1:]


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------

def _mode_params(mode: str | None, thinking: bool, max_tokens: int) -> tuple[bool, SamplingParams]:
    """'off' | 'regular' | 'medium' | 'budget=N' -> (enable_thinking, greedy SamplingParams)."""
    mode = mode or ("regular" if thinking else "off")
    if mode == "off":
        return False, SamplingParams(temperature=0.0, max_tokens=max_tokens, reasoning_mode="off")
    if mode in ("regular", "medium"):
        return True, SamplingParams(temperature=0.0, max_tokens=max_tokens, reasoning_mode=mode)
    if mode.startswith("budget="):
        return True, SamplingParams(temperature=0.0, max_tokens=max_tokens, thinking_budget=int(mode[7:]))
    raise ValueError(f"mode must be off, regular, medium or budget=N, got {mode!r}")


def summarize(rolls: list[Rollout]) -> dict:
    """Per-env accuracy, mean reward, format-error rate (any error), per-error rates, token counts."""
    out = {}
    for name in sorted({r.task.env for r in rolls}):
        rs = [r for r in rolls if r.task.env == name]
        errs = {}
        for r in rs:
            for e in r.episode.format_errors:
                errs[e] = errs.get(e, 0) + 1 / len(rs)
        out[name] = dict(n=len(rs), accuracy=float(np.mean([r.episode.correct for r in rs])),
                         reward=float(np.mean([r.episode.reward for r in rs])),
                         format_error_rate=float(np.mean([bool(r.episode.format_errors) for r in rs])),
                         errors={k: round(v, 4) for k, v in sorted(errs.items())},
                         mean_thinking_tokens=float(np.mean([r.reasoning_tokens for r in rs])),
                         mean_generated_tokens=float(np.mean([r.response_tokens for r in rs])),
                         mean_turns=float(np.mean([r.episode.turns for r in rs])))
    return out


def evaluate(llm_or_model_dir, envs=ENVS_DEFAULT, n_per_env: int = 50, split: str = "test", thinking: bool = True,
             mode: str | None = None, max_tokens: int = 512, max_total_tokens: int | None = None,
             max_num_seqs: int = 32) -> dict:
    """Greedy accuracy on the first `n_per_env` tasks of `split` of each env. `mode` ('off' | 'regular' |
    'medium' | 'budget=N') overrides `thinking`; 'off' renders prompts with enable_thinking=False.
    Returns {"mode", "split", "n_per_env", "envs": {env: summarize(...)}, "mean_accuracy"}."""
    from .envs import get_env
    llm = llm_or_model_dir if isinstance(llm_or_model_dir, LLM) else LLM(llm_or_model_dir, max_num_seqs=max_num_seqs)
    envs = envs if isinstance(envs, dict) else {e: get_env(e) for e in envs}
    think, params = _mode_params(mode, thinking, max_tokens)
    tasks = [t for env in envs.values() for t in env.tasks(split, n_per_env)]
    rolls = rollout(llm, envs, tasks, 1, params, think, max_total_tokens)
    per = summarize(rolls)
    return {"mode": mode or ("regular" if thinking else "off"), "split": split, "n_per_env": n_per_env, "envs": per,
            "mean_accuracy": float(np.mean([v["accuracy"] for v in per.values()])) if per else 0.0}


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------

def plot(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    tr = [r for r in recs if r.get("phase") == "rl"]
    ev = [r for r in recs if r.get("phase") == "eval"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for key, ax in zip(("reward", "accuracy"), axes):
        for env in sorted({e for r in tr for e in r.get(key, {})}):
            pts = [(r["step"], r[key][env]) for r in tr if env in r.get(key, {})]
            s, v = map(np.array, zip(*pts))
            sm = np.convolve(v, np.ones(min(5, len(v))) / min(5, len(v)), mode="valid")
            ax.plot(s[len(s) - len(sm):], sm, label=f"train {env}")
        if key == "accuracy":
            for env in sorted({e for r in ev for e in r.get("accuracy", {})}):
                ax.plot(*zip(*[(r["step"], r["accuracy"][env]) for r in ev]), "o--", label=f"eval {env}")
        ax.set_ylabel(key + (" (moving avg 5)" if key == "reward" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].plot([r["step"] for r in tr], [r["response_tokens"] for r in tr], label="response tokens")
    axes[2].set_ylabel("mean response tokens")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    png.with_suffix(".tmp.png").replace(png)


def _step_tasks(envs: dict, names: list[str], step: int, P: int, rng: random.Random, frac: float):
    """Prompts of a step: round-robin over envs, train tasks walked in order; thinking on with prob. frac."""
    tasks, flags = [], []
    for j in range(P):
        g = step * P + j
        name = names[g % len(names)]
        tasks.append(envs[name].task("train", g // len(names)))
        flags.append(rng.random() < frac)
    return tasks, flags


def _update(model, opt, rolls, adv_tok, old, r: dict, rng: random.Random) -> dict:
    """`updates_per_batch` optimizer steps (x `epochs`) over shuffled minibatches of `rolls`; `adv_tok` / `old`
    are per-rollout [len(tokens) - 1] tensors. Returns mean loss, clip fraction and grad norm."""
    items = list(zip(rolls, adv_tok, old))
    U = max(1, min(r["updates_per_batch"], len(items)))
    params = [p for p in model.parameters() if p.requires_grad]
    st = dict(loss=0.0, clipped=0, tokens=0, grad_norm=0.0, updates=0)
    for _ in range(r["epochs"]):
        rng.shuffle(items)
        for mb in (items[i::U] for i in range(U)):
            denom = float(sum(sum(x.mask[1:]) for x, _, _ in mb)) or 1.0
            for c in range(0, len(mb), r["micro_batch"]):
                part = mb[c:c + r["micro_batch"]]
                ids, m = pad_batch([x for x, _, _ in part])
                A, O = torch.zeros_like(m), torch.zeros_like(m)
                for b, (_, a, o) in enumerate(part):
                    A[b, :len(a)], O[b, :len(o)] = a, o
                loss, clipped = clipped_pg_loss(token_logprobs(model, ids), O, A, m, r["clip_low"], r["clip_high"],
                                                denom)
                loss.backward()
                st["loss"] += loss.item()
                st["clipped"] += int(clipped)
                st["tokens"] += int(m.sum())
            st["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, r["grad_clip"]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            st["updates"] += 1
    n = max(st["updates"], 1)
    return dict(loss=st["loss"] / n, clip_frac=st["clipped"] / max(st["tokens"], 1), grad_norm=st["grad_norm"] / n,
                updates=st["updates"])


@torch.no_grad()
def _per_rollout_logprobs(model, rolls, micro: int) -> list[torch.Tensor]:
    out = []
    for c in range(0, len(rolls), micro):
        part = rolls[c:c + micro]
        lp = token_logprobs(model, pad_batch(part)[0])
        out += [lp[b, :len(x.tokens) - 1].clone() for b, x in enumerate(part)]
    return out


def warmup_sft(model, opt, tok, envs: dict, teachers: dict, w: dict, r: dict, log) -> None:
    """MOPD warm-up: each teacher generates on its env's train tasks (rollout, temperature w.temperature);
    correct episodes become SFT data (cross-entropy on the teacher's sampled tokens, mask 1); w.steps steps."""
    data = []
    for name, teacher in teachers.items():
        llm = LLM(teacher, tok, max_num_seqs=r["max_num_seqs"], seed=r["seed"])
        tasks = envs[name].tasks("train", w["tasks_per_env"], start=10**6)   # away from the RL walk
        params = SamplingParams(temperature=w["temperature"], max_tokens=r["max_tokens"], seed=r["seed"])
        flags = [random.Random(f"{r['seed']}:{name}:{i}").random() < r["thinking_fraction"] for i in range(len(tasks))]
        rolls = rollout(llm, {name: envs[name]}, tasks, w["samples"], params, flags, r["max_total_tokens"])
        kept = [x for x in rolls if x.episode.correct]
        log({"phase": "warmup_data", "env": name, "episodes": len(rolls), "correct": len(kept)})
        data += kept
    if not data:
        print("warmup_sft: no correct teacher episodes, skipping", file=sys.stderr)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for s in range(w["steps"]):
        rng = random.Random(f"{r['seed']}:warmup:{s}")
        batch = [data[rng.randrange(len(data))] for _ in range(w["batch_size"])]
        set_lr(opt, w["lr"])
        ids, m = pad_batch(batch)
        lp = token_logprobs(model, ids)
        loss = -(lp * m).sum() / m.sum().clamp(min=1)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        log({"phase": "warmup", "warmup_step": s + 1, "loss": loss.item(), "grad_norm": float(gn)})


def train(recipe: dict, resume: bool = False, max_steps: int | None = None) -> dict:
    from .envs import get_env
    from ..tokenizer import load_tokenizer
    r, mode = recipe["rl"], recipe["mode"]
    torch.set_num_threads(r["threads"])
    out_dir = Path(recipe["out_dir"])
    ckpt = resumable_checkpoint(out_dir, resume)
    seed_everything(r["seed"])
    model = checkpoint.load(ckpt or recipe["init"], dtype=torch.float32)
    tok = load_tokenizer(recipe["init"])
    if model.mtp is not None:
        model.mtp.requires_grad_(False)
    if r["freeze_router"]:
        for m in model.moe_layers():
            m.gate.requires_grad_(False)
    opt = adamw(model, r)
    state = {"step": 0, "elapsed": 0.0, "tokens": 0, "warmup_done": False}
    if ckpt is not None:
        load_checkpoint(ckpt, model, opt, state)
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    names = list(recipe["envs"])
    envs = {n: get_env(n) for n in names}
    teachers = {}
    if mode == "mopd":
        missing = [n for n in names if n not in recipe["teachers"]]
        if missing:
            raise ValueError(f"mode mopd: no teacher for env(s) {missing}")
        loaded = {}
        for n in names:                               # identical checkpoints are loaded once
            path = str(recipe["teachers"][n])
            if path not in loaded:
                loaded[path] = checkpoint.load(path, dtype=torch.float32).eval().requires_grad_(False)
            teachers[n] = loaded[path]
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, recipe, state, resumed=ckpt is not None)
    if mode == "mopd" and not state["warmup_done"]:
        if recipe["warmup_sft"]["steps"] > 0:
            warmup_sft(model, opt, tok, envs, teachers, recipe["warmup_sft"], r, log)
        state["warmup_done"] = True
        save_checkpoint(out_dir, model, opt, state)
    llm = LLM(model, tok, max_num_seqs=r["max_num_seqs"], seed=r["seed"])
    end = r["steps"] if max_steps is None else min(max_steps, r["steps"])
    step = state["step"]
    while step < end:
        t0 = time.perf_counter()
        rng = random.Random(f"{r['seed']}:{step}")
        tasks, flags = _step_tasks(envs, names, step, r["prompts_per_step"], rng, r["thinking_fraction"])
        n = r["group_size"]
        params = SamplingParams(temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                                seed=(r["seed"] * 1_000_003 + step * 7_919_019) % (1 << 62))
        rolls = rollout(llm, envs, tasks, n, params, flags, r["max_total_tokens"])
        t_roll = time.perf_counter() - t0
        extra = {}
        if mode == "grpo":
            rewards = torch.tensor([x.episode.reward for x in rolls]).view(len(tasks), n)
            adv = grpo_advantages(rewards).view(-1)
            train_rolls = [x for x, a in zip(rolls, adv) if a != 0]
            adv_of = {id(x): float(a) for x, a in zip(rolls, adv)}
            old = _per_rollout_logprobs(model, train_rolls, r["micro_batch"])
            adv_tok = [torch.full_like(o, adv_of[id(x)]) for x, o in zip(train_rolls, old)]
            extra["groups_used"] = int((rewards.std(1) > 0).sum()) if n > 1 else 0
        else:
            train_rolls = rolls
            old = _per_rollout_logprobs(model, rolls, r["micro_batch"])
            adv_tok = []
            with torch.no_grad():
                for x, o in zip(rolls, old):
                    t_lp = token_logprobs(teachers[x.task.env], torch.tensor([x.tokens]))[0]
                    adv_tok.append(t_lp - o)
            m = [torch.tensor(x.mask[1:], dtype=torch.float32) for x in rolls]
            kl = sum(float((-a * mm).sum()) for a, mm in zip(adv_tok, m)) / max(sum(float(mm.sum()) for mm in m), 1)
            extra["reverse_kl"] = kl
            extra["reverse_kl_env"] = {}
            for env in names:
                idx = [i for i, x in enumerate(rolls) if x.task.env == env]
                tok_n = sum(float(m[i].sum()) for i in idx)
                if tok_n:
                    extra["reverse_kl_env"][env] = sum(float((-adv_tok[i] * m[i]).sum()) for i in idx) / tok_n
        lr = warmup_lr(step, r["lr"], r["warmup_steps"])
        set_lr(opt, lr)
        upd = dict(loss=0.0, clip_frac=0.0, grad_norm=0.0, updates=0)
        if train_rolls:
            model.train()
            upd = _update(model, opt, train_rolls, adv_tok, old, r, rng)
            model.eval()
            if llm.engine.prefix_cache is not None:
                llm.engine.prefix_cache.clear()
        step += 1
        dt = time.perf_counter() - t0
        step_tokens = sum(len(x.tokens) for x in rolls)
        state.update(step=step, elapsed=state["elapsed"] + dt, tokens=state["tokens"] + step_tokens)
        per = summarize(rolls)
        rec = {"phase": "rl", "mode": mode, "lr": lr, **upd, **extra,
               "reward_mean": float(np.mean([x.episode.reward for x in rolls])),
               "reward": {e: v["reward"] for e, v in per.items()},
               "accuracy": {e: v["accuracy"] for e, v in per.items()},
               "format_error_rate": {e: v["format_error_rate"] for e, v in per.items()},
               "errors": {e: v["errors"] for e, v in per.items()},
               "response_tokens": float(np.mean([x.response_tokens for x in rolls])),
               "thinking_share": float(np.mean(flags)), "tokens": state["tokens"],
               "rollout_s": round(t_roll, 2), "step_s": round(dt, 2), "time": round(state["elapsed"], 2)}
        log(rec)
        print(f"step {step}/{r['steps']} | reward {rec['reward_mean']:.3f} | acc " +
              " ".join(f"{e} {a:.2f}" for e, a in rec["accuracy"].items()) +
              f" | loss {upd['loss']:.4f} clip {upd['clip_frac']:.3f} | {rec['response_tokens']:.0f} tok | {dt:.1f}s",
              file=sys.stderr, flush=True)
        if r["eval_every"] and (step % r["eval_every"] == 0 or step == r["steps"]):
            ev = evaluate(llm, envs, r["eval_tasks"], "test", thinking=True, max_tokens=r["eval_max_tokens"],
                          max_total_tokens=r["max_total_tokens"])
            log({"phase": "eval", "accuracy": {e: v["accuracy"] for e, v in ev["envs"].items()},
                 "format_error_rate": {e: v["format_error_rate"] for e, v in ev["envs"].items()},
                 "mean_accuracy": ev["mean_accuracy"], "envs": ev["envs"]})
            print(f"eval step {step}: " + " ".join(f"{e} {v['accuracy']:.2f}" for e, v in ev["envs"].items()),
                  file=sys.stderr, flush=True)
        if step % r["save_every"] == 0 or step == end:
            save_checkpoint(out_dir, model, opt, state)
            plot(log.path, out_dir / "rl.png")
    if step >= r["steps"]:
        print(f"exported {export(out_dir, recipe['init'])}", file=sys.stderr)
    return {"step": step}


def main(argv=None):
    ap = stage_parser("python -m nemotron3.train.rl", __doc__, progress=False)
    train_stage(ap, ap.parse_args(argv), RECIPE, train)


if __name__ == "__main__":
    main()
