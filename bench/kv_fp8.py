"""FP8 E4M3 KV cache vs bf16 (and fp32) K/V on a trained model at long context.

For each context length T the same real text (Python stdlib sources, sorted, tokenized) is prefilled in chunks
through four caches in lockstep (`HybridCache.for_model` with kv_cache_dtype auto = fp32 on CPU, bfloat16, fp8
with scales 1.0 (what ModelOpt writes without calibration), and fp8 with calibrated scales (amax/448 from
`quantize_model(..., kv_cache_dtype="fp8")` over 8 x 512 other stdlib tokens); chunked prefill reads every earlier
chunk back from the cache, so later positions attend over quantized K/V), and per position we compare each fp8
run with the bf16 run: top-1 (greedy) agreement of the next-token prediction and the mean / max |difference| of
the log-probability given to the actual next token (all positions, and the last 1024 where the context is
longest). bf16 vs fp32 is printed alongside as the scale of bf16's own rounding. Then each cache decodes `--gen`
tokens greedily from the end of the context and we report how many agree with bf16's.

    python bench/kv_fp8.py [--model models/pico] [--contexts 4096,32768] [--gen 64] [--chunk 2048]
                           [--kinds auto,bfloat16,fp8,fp8calib]   (a subset costs less: bfloat16,fp8 = half)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sysconfig
import time
from pathlib import Path

import torch

from nemotron3.checkpoint import load
from nemotron3.model.cache import HybridCache
from nemotron3.quant.quantize import quantize_model
from nemotron3.tokenizer import load_tokenizer

PAIRS = {"fp8_vs_bf16": ("fp8", "bfloat16"), "fp8calib_vs_bf16": ("fp8calib", "bfloat16"),
         "bf16_vs_fp32": ("bfloat16", "auto")}


def stdlib_tokens(tok, n: int) -> list[int]:
    ids: list[int] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")) + [tok.eos_id]
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the stdlib holds fewer than {n} tokens")


def _cmp(a: torch.Tensor, b: torch.Tensor, nxt: torch.Tensor) -> dict:
    """Per-position stats of log-probs a vs b [T, V] on next tokens nxt [T]."""
    d = (a.gather(1, nxt[:, None]) - b.gather(1, nxt[:, None])).abs()[:, 0]
    return {"agree": (a.argmax(-1) == b.argmax(-1)).double().sum().item(), "abs_dlogp": d.double().sum().item(),
            "max_dlogp": d.max().item(), "n": len(nxt)}


@torch.no_grad()
def run(model, calibrated, ids: list[int], chunk: int, gen: int, kinds: list[str]) -> dict:
    T = len(ids) - 1                                   # last token only as the target of position T-1
    x = torch.tensor([ids])
    caches = {k: HybridCache.for_model(calibrated, 1, 256, "auto") if k == "fp8calib" else
              HybridCache.for_model(model, 1, 256, k) for k in kinds}
    pairs = {name: ab for name, ab in PAIRS.items() if set(ab) <= set(kinds)}
    stats = {p: {"all": [], "tail": []} for p in pairs}
    t0 = time.time()
    last = {}
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        lp = {k: torch.log_softmax(model(x[:, s:e], c)[0], -1) for k, c in caches.items()}
        last = {k: v[-1] for k, v in lp.items()}
        nxt = x[0, s + 1:e + 1]
        tail = max(0, T - 1024 - s)                  # first index of this chunk inside the last 1024 positions
        for name, (a, b) in pairs.items():
            stats[name]["all"].append(_cmp(lp[a], lp[b], nxt))
            if tail < e - s:
                stats[name]["tail"].append(_cmp(lp[a][tail:], lp[b][tail:], nxt[tail:]))
    out = {"context": T, "caches": kinds, "prefill_s": round(time.time() - t0, 1)}
    for name, parts in stats.items():
        for where, rows in parts.items():
            n = sum(r["n"] for r in rows)
            out[f"{name}_{where}"] = {"positions": n, "top1_agreement": sum(r["agree"] for r in rows) / n,
                                      "mean_abs_dlogp": sum(r["abs_dlogp"] for r in rows) / n,
                                      "max_abs_dlogp": max(r["max_dlogp"] for r in rows)}
    # greedy continuation from the end of the context, each cache on its own
    seqs = {}
    for k, c in caches.items():
        tok, toks = int(last[k].argmax()), []
        for _ in range(gen):
            toks.append(tok)
            tok = int(model(torch.tensor([[tok]]), c)[0, -1].argmax())
        seqs[k] = toks
    out["greedy"] = {"tokens": gen}
    for name, (a, b) in pairs.items():
        same = [u == v for u, v in zip(seqs[a], seqs[b])]
        out["greedy"][name] = {"identical_prefix": same.index(False) if False in same else gen,
                               "same_tokens": sum(same)}
    out["kv_bytes_per_token"] = {k: c.slot_nbytes(1)["kv"] for k, c in caches.items()}
    if "fp8calib" in caches:
        out["k_scales_calibrated"] = dict(caches["fp8calib"].kv_scales)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/pico")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", default="auto,bfloat16,fp8,fp8calib",
                    help="caches to run: auto (fp32 on CPU), bfloat16, fp8 (scales 1.0), fp8calib")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load(a.model, dtype="float32")
    tok = load_tokenizer(a.model)
    contexts = [int(c) for c in a.contexts.split(",")]
    ids = stdlib_tokens(tok, max(contexts) + 1 + 8 * 512)
    calib = torch.tensor(ids[-8 * 512:]).view(8, 512)
    calibrated = quantize_model(copy.deepcopy(model), lambda cfg, name: "bf16", [calib[i:i + 1] for i in range(8)],
                                kv_cache_dtype="fp8") if "fp8calib" in a.kinds.split(",") else None
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"), "model": a.model,
               "results": []}
    for T in contexts:
        r = run(model, calibrated, ids[:T + 1], a.chunk, a.gen, a.kinds.split(","))
        results["results"].append(r)
        print(json.dumps(r, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
