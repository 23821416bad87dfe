"""CPU training-step speed: our trainer's step vs a transformers NemotronHForCausalLM step, same config and weights.

    python bench/train_speed.py [--recipe recipes/pico.json] [--batch 8] [--seq 512] [--repeats 3]

A step is forward + backward + AdamW update on one [batch, seq] batch. Ours runs through the trainer's
`TrainLoss` (LM loss + seq-aux loss + router-bias bookkeeping), transformers runs `model(ids, labels=ids)`
(LM loss only; it has no MTP), so the ratio is taken with mtp_depths = 0; ours with the recipe's MTP
depths is reported too. Prints median seconds per step, tokens/s and the ratio (> 1: we are faster).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import to_hf_state  # noqa: E402
from nemotron3.model import NemotronHForCausalLM  # noqa: E402
from nemotron3.eval.lm import mtp_labels  # noqa: E402
from nemotron3.train.loss import TrainLoss  # noqa: E402
from nemotron3.train.recipe import load_recipe, model_config  # noqa: E402


def timeit(steps: dict, repeats: int) -> dict:
    """Seconds per step for each named step function: warm-up once, then `repeats` rounds run
    interleaved (a busy machine slows every candidate alike); min and median per candidate."""
    for step in steps.values():
        step()                                               # warm-up (allocator, optimizer state)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


def ours_step(model, t, depths, ids, labels, bf16=False):
    """One trainer step; `bf16` runs the forward under bf16 autocast as `train.precision: bf16` does."""
    from contextlib import nullcontext
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)) if bf16 else nullcontext
    lm = TrainLoss(model, {**t, "mtp_depths": depths})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    D = lm.depths
    norm = torch.tensor([float((labels != -100).sum())] + [float((mtp_labels(labels, k) != -100).sum())
                                                           for k in range(1, D + 1)]
                        + [ids.shape[0] * (model.config.pattern.count("E") + D * model.config.mtp_pattern.count("E"))])

    def step():
        lm.record(True)
        with amp():
            loss, _ = lm(ids, labels, norm, 1)
        loss.backward()
        lm.record(False)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm.update_bias(1e-3, False)
    return step


def hf_step(hf, ids):
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step():
        hf(ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "pico.json"))
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's batch_size")
    ap.add_argument("--seq", type=int, default=None, help="default: the recipe's seq_len")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-experts", default="eager", help="transformers experts_implementation")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also time our step under bf16 autocast (fast on CPUs "
                    "with AVX512_BF16/AMX, ~20x slower without)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    r = load_recipe(a.recipe)
    t = r["train"]
    B, T = a.batch or t["batch_size"], a.seq or r["data"]["seq_len"]
    ours = NemotronHForCausalLM(model_config(r)).train()
    init = {k: v.clone() for k, v in ours.state_dict().items()}
    ids = torch.randint(0, ours.config.vocab_size, (B, T))
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    n = B * T
    print(f"config: {ours.config.pattern} d={ours.config.hidden_size} params={ours.num_parameters():,}; "
          f"batch {B} x seq {T}; threads {a.threads}; fp32")
    models, steps = {}, {}
    for depths in sorted({0, t["mtp_depths"]}):
        m = models[depths] = NemotronHForCausalLM(model_config(r)).train()
        m.load_state_dict(init)
        steps[f"ours (mtp_depths={depths})"] = ours_step(m, t, depths, ids, labels)
        if a.bf16:
            mb = NemotronHForCausalLM(model_config(r)).train()
            mb.load_state_dict(init)
            steps[f"ours bf16 (mtp_depths={depths})"] = ours_step(mb, t, depths, ids, labels, bf16=True)
    if not a.skip_hf:
        import transformers
        cfg = transformers.NemotronHConfig(**ours.config.to_dict(), experts_implementation=a.hf_experts,
                                           attn_implementation="sdpa")
        hf = transformers.NemotronHForCausalLM(cfg)
        missing, unexpected = hf.load_state_dict(to_hf_state(ours), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        hf.train()
        with torch.no_grad():                                # same weights -> same loss
            ref = F.cross_entropy(ours(ids)[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            diff = abs(hf(ids, labels=ids, use_cache=False).loss.item() - ref.item())
        print(f"same weights: |loss(ours) - loss(transformers)| = {diff:.1e}")
        steps[f"transformers ({a.hf_experts} experts)"] = hf_step(hf, ids)
    res = timeit(steps, a.repeats)
    for name, (best, med) in res.items():
        print(f"{name:30s} min {best:6.2f} s/step {n / best:7.0f} tok/s | median {med:6.2f} s {n / med:7.0f} tok/s")
    if not a.skip_hf:
        hf_t, ours_t = res[f"transformers ({a.hf_experts} experts)"][0], res["ours (mtp_depths=0)"][0]
        print(f"speedup, same work (transformers / ours at mtp_depths=0, min times): {hf_t / ours_t:.2f}x")
    if a.bf16:
        print(f"bf16 autocast vs fp32 (ours, mtp_depths=0, min times): "
              f"{res['ours (mtp_depths=0)'][0] / res['ours bf16 (mtp_depths=0)'][0]:.2f}x; "
              f"cpu capability {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
