"""Long-context benchmark: prefill tokens/s, decode ms/token and peak resident memory against context length,
for the hybrid pico model vs an attention-only model of the same width; ratios are measured in this run.

    python bench/long_context.py [--lengths 1024,4096,16384,65536,131072] [--models hybrid,attention]
                                 [--attn-max-length 16384] [--decode-tokens 16] [--chunk 2048] [--threads 1]

hybrid     models/pico (pattern MEM*EMEM*EME: 4 Mamba-2, 2 attention, 6 MoE layers; trained weights, or
           --model DIR).
attention  the same config with every Mamba layer replaced by attention (*E**E*E**E*E: 6 attention layers,
           the same MoE layers, d_model 256, 4 q / 2 kv heads of 64), random weights -- a nemotron3 model, so
           both run through the same engine, kernels and chunked prefill. Lengths above --attn-max-length
           are skipped for it (its prefill is quadratic: ~3x the hybrid's attention work).

Each (model, length) runs in a fresh subprocess (so peak RSS, VmHWM, is that point's alone) at
--threads intra-op threads: an `LLMEngine` with one slot, max_model_len = length + decode tokens, prefix
caching off, prefill in --chunk-token chunks; the prompt is `length` random token ids. prefill = time
from submitting the request to its first token (chunked prefill + one lm_head row); decode = median time
of the following --decode-tokens steps (the first of them also builds the engine's decode plan). RSS columns: peak resident MiB of the whole process, and the
growth over the process's resident size after loading the model (the context's own memory: K/V of the
attention layers, prefill activations of one chunk). The MTP block is not run (no speculation).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    import warnings
    from nemotron3 import NemotronHForCausalLM, load
    from nemotron3.engine import LLMEngine, SamplingParams
    torch.manual_seed(0)
    model = load(args.model, dtype="float32")
    if args.worker_kind == "attention":
        cfg = model.config
        pattern = "".join("*" if c == "M" else c for c in cfg.pattern)
        import dataclasses
        model = NemotronHForCausalLM(dataclasses.replace(cfg, pattern=pattern)).eval()
    n, new = args.worker_length, args.decode_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = LLMEngine(model, None, max_num_seqs=1, max_model_len=n + new + 8, enable_prefix_caching=False,
                        max_num_batched_tokens=args.chunk)
    g = torch.Generator().manual_seed(n)
    prompt = torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
    base = _rss_kib("VmRSS")
    with torch.inference_mode():
        t0 = time.perf_counter()
        eng.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=new + 1, ignore_eos=True))
        t_first, steps = None, []
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter()
            if t_first is None and outs and outs[0].outputs[0].token_ids:
                t_first = now
            elif t_first is not None:
                steps.append(now)
    prefill = t_first - t0
    times = [b - a for a, b in zip([t_first] + steps, steps)]
    decode = statistics.median(times) if times else float("nan")   # the first step also builds the decode plan
    print(json.dumps({"kind": args.worker_kind, "length": n, "prefill_s": prefill, "prefill_tok_s": n / prefill,
                      "decode_ms": decode * 1e3, "peak_rss_mib": _rss_kib("VmHWM") / 1024,
                      "base_rss_mib": base / 1024, "kv_mib": eng.cache.nbytes()["kv"] / 2**20,
                      "params": model.num_parameters(), "pattern": model.config.pattern}))


def run_point(args, kind: str, n: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker-kind", kind, "--worker-length", str(n), "--model", args.model,
           "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens), "--chunk", str(args.chunk)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {kind} {n}: timed out after {args.timeout}s", file=sys.stderr, flush=True)
        return None
    if r.returncode != 0:
        print(f"  {kind} {n}: failed\n{r.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {kind:9s} {n:>7d}: prefill {res['prefill_s']:.1f}s ({res['prefill_tok_s']:.0f} tok/s), decode "
          f"{res['decode_ms']:.2f} ms/tok, peak RSS {res['peak_rss_mib']:.0f} MiB "
          f"(+{res['peak_rss_mib'] - res['base_rss_mib']:.0f} over the loaded model), K/V {res['kv_mib']:.0f} MiB",
          file=sys.stderr, flush=True)
    return res


def fmt(v, spec):
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384,65536,131072")
    ap.add_argument("--models", default="hybrid,attention")
    ap.add_argument("--attn-max-length", type=int, default=16384,
                    help="skip the attention-only model above this length (quadratic prefill)")
    ap.add_argument("--model", default=str(ROOT / "models" / "pico"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per point")
    ap.add_argument("--json", default=None, help="write the points here")
    ap.add_argument("--worker-kind", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-length", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_kind:
        return worker(args)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    kinds = [k for k in args.models.split(",") if k]
    for k in kinds:
        if k not in ("hybrid", "attention"):
            ap.error(f"unknown model kind {k!r} (hybrid, attention)")
    print(f"threads {args.threads}, prefill chunk {args.chunk}, decode {args.decode_tokens} tokens, "
          f"model {args.model}", file=sys.stderr, flush=True)
    res: dict = {}
    for n in lengths:
        for k in kinds:
            if k == "attention" and n > args.attn_max_length:
                continue
            res[(k, n)] = run_point(args, k, n)
    h = "length  | hybrid prefill tok/s  attn prefill tok/s  ratio | hybrid decode ms  attn decode ms  ratio " \
        "| hybrid peak RSS MiB (+ctx)  attn peak RSS MiB (+ctx)"
    print(h)
    print("-" * len(h))
    for n in lengths:
        a, b = res.get(("hybrid", n)), res.get(("attention", n))
        pr = a["prefill_tok_s"] / b["prefill_tok_s"] if a and b else None
        dr = b["decode_ms"] / a["decode_ms"] if a and b else None
        ra = f"{a['peak_rss_mib']:.0f} (+{a['peak_rss_mib'] - a['base_rss_mib']:.0f})" if a else "-"
        rb = f"{b['peak_rss_mib']:.0f} (+{b['peak_rss_mib'] - b['base_rss_mib']:.0f})" if b else "-"
        print(f"{n:>7d} | {fmt(a and a['prefill_tok_s'], '20.0f')} {fmt(b and b['prefill_tok_s'], '19.0f')} "
              f"{fmt(pr, '5.2f')}x | {fmt(a and a['decode_ms'], '16.2f')} {fmt(b and b['decode_ms'], '14.2f')} "
              f"{fmt(dr, '5.2f')}x | {ra:>26s}  {rb:>24s}")
    print("ratios: prefill = hybrid tok/s / attention tok/s, decode = attention ms / hybrid ms (>1: hybrid faster)")
    if args.json:
        Path(args.json).write_text(json.dumps([v for v in res.values() if v], indent=2))


if __name__ == "__main__":
    main()
