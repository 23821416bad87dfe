"""Nano-width batch-1 decode on CPU from lazily loaded (file-mapped) checkpoints (issue 21).

    python bench/nano_width.py --dir /work/tmp-lazy/nano [--pattern 'MEM*E'] [--threads 1 2] [--tokens 24]
    python bench/nano_width.py --dir /work/tmp-lazy/nano --full [--threads 2] [--tokens 4]

Default: a random-weight model of Nemotron 3 Nano's widths (the `nano` preset: d 2688, Mamba 64 heads x 64, state
128, 8 groups, attention 32 q / 2 kv heads x 128, 128 routed experts x 1856 top-6, shared expert 3712, no latent,
vocab 131072) with a short pattern (`MEM*E`, ~3.4 B parameters), written once to DIR/bf16 (`init_weights`, bf16)
and DIR/nvfp4 (`quant.quantize_model(model, "nvfp4")`, Nano's NVFP4 recipe, saved in the ModelOpt layout).
`--full`: the 52-layer Nano pattern in NVFP4 to DIR/full, one shard per layer, each layer built, filled and written
alone (random E2M1 codes and E4M3 block scales in the recipe's layout: the quantize path runs at ~4 M elements/s
here, ~2 h for Nano's 29 B expert weights), so writing never holds more than one layer in memory.

Each checkpoint is measured in a fresh process (`--measure DIR`): `LLM(path, weight_dtype="bfloat16")` (every bf16
/ NVFP4 tensor a view of the file; fp32 activations), RSS (VmRSS = RssAnon + RssFile) before and after loading
and after decoding, batch-1 greedy decode tokens/s per thread count (after a warm-up request), the weight bytes
one token reads (every dense weight + top-k/E of each MoE layer's routed experts + lm_head + one embedding row),
the GB/s that makes, and its fraction of the C streaming read (`bandwidth.py`) on as many threads, measured just
before and just after each timed run (the machine may be shared; the larger of the two is the reference).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemotron3.presets import PRESETS  # noqa: E402

PATTERN = "MEM*E"


def rss() -> dict:
    """This process's resident memory in bytes: VmRSS, RssAnon, RssFile (/proc/self/status)."""
    out = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(line.split()[1]) * 1024
    return out


def config(pattern: str):
    return PRESETS["nano"].replace(pattern=pattern)


def ckpt_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- writing
def write_short(out: Path, pattern: str) -> None:
    """DIR/bf16 and DIR/nvfp4 of the short pattern (each skipped if already there)."""
    import nemotron3
    from nemotron3.model import NemotronHForCausalLM
    from nemotron3.model.model import init_weights
    from nemotron3.quant.quantize import quantize_model
    if (out / "bf16/config.json").exists() and (out / "nvfp4/config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("meta"):
        model = NemotronHForCausalLM(config(pattern))
    model = model.to(torch.bfloat16).to_empty(device="cpu")        # [~3.4 B] bf16, filled below
    t0 = time.perf_counter()
    with torch.no_grad():
        init_weights(model)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_f.weight"):
                p.fill_(1.0)
    print(f"random bf16 weights: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not (out / "bf16/config.json").exists():
        t0 = time.perf_counter()
        nemotron3.save(model, out / "bf16", dtype="bfloat16")
        print(f"wrote {out / 'bf16'}: {ckpt_bytes(out / 'bf16') / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s",
              flush=True)
    if not (out / "nvfp4/config.json").exists():
        t0 = time.perf_counter()
        quantize_model(model, "nvfp4")
        nemotron3.save(model, out / "nvfp4", dtype="bfloat16")
        print(f"wrote {out / 'nvfp4'} (quantize_model 'nvfp4'): {ckpt_bytes(out / 'nvfp4') / 1e9:.2f} GB, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


@torch.no_grad()
def _random_nvfp4(mod) -> None:
    """Fill an NVFP4Linear / NVFP4Experts with random codes, E4M3 block scales in [64, 448] and a tensor scale
    putting weights at ~0.01-0.1 (random 4-bit weights; what decoding reads is the same bytes as real ones)."""
    for n, b in mod.named_buffers():
        if b.dtype == torch.uint8:
            b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8))
        elif b.dtype == torch.float8_e4m3fn:
            b.copy_(torch.empty(b.shape).uniform_(64, 448).to(torch.float8_e4m3fn))
        elif n.endswith("weight_scale_2"):
            b.fill_(2e-5)


def _empty(mod, device: str):
    """Every parameter / buffer of `mod` replaced by an uninitialised one on `device` (`to_empty` cannot: the
    quantized modules move their codes with `.to`, which a meta tensor refuses)."""
    for m in mod.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = torch.empty_like(b, device=device)
    return mod


def write_full(out: Path, pattern: str | None = None) -> None:
    """The 52-layer Nano pattern (or `pattern`), NVFP4 (Nano's recipe layout), written one layer per shard."""
    from nemotron3.checkpoint import checkpoint_state, expert_order
    from nemotron3.model import NemotronHForCausalLM
    from nemotron3.model.model import init_weights
    from nemotron3.quant.modelopt import config_block, hf_quant_config
    from nemotron3.quant.quantize import apply_layout, module_formats
    from nemotron3.safetensors_io import save_file
    if (out / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(pattern or PRESETS["nano"].pattern)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    formats = {n: f for n, f in module_formats(model, "nvfp4").items() if f != "bf16"}
    apply_layout(model, formats)                                   # still meta: only the layout
    n = len(cfg.pattern) + 1
    weight_map, total, t0 = {}, 0, time.perf_counter()
    torch.manual_seed(0)
    for i in range(n):
        if i < len(cfg.pattern):                                   # shard i: backbone layer i alone
            blk = _empty(model.backbone.layers[i], "cpu")
            holder = torch.nn.Module()                             # names as in the model: backbone.layers.{i}.*
            holder.backbone = torch.nn.Module()
            holder.backbone.layers = torch.nn.ModuleDict({str(i): blk})
            # (no rescaled kaiming init of out_proj: NVFP4 modules hold codes, filled by _random_nvfp4)
            init_weights(types.SimpleNamespace(config=cfg.replace(rescale_prenorm_residual=False), modules=blk.modules))
            for name, m in blk.named_modules():
                if type(m).__name__ in ("NVFP4Linear", "NVFP4Experts"):
                    _random_nvfp4(m)
            with torch.no_grad():
                for name, p in blk.named_parameters():
                    if name.endswith("norm.weight"):
                        p.fill_(1.0)
            state = checkpoint_state(holder, dtype="bfloat16")
        else:                                                      # last shard: embeddings, norm_f, lm_head
            d, v = cfg.hidden_size, cfg.vocab_size
            state = {"backbone.embeddings.weight": torch.empty(v, d, dtype=torch.bfloat16).normal_(0, 0.02),
                     "lm_head.weight": torch.empty(v, d, dtype=torch.bfloat16).normal_(0, 0.02),
                     "backbone.norm_f.weight": torch.ones(d, dtype=torch.bfloat16)}
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(state, out / fname, metadata={"format": "pt"}, order_key=expert_order)
        weight_map.update({k: fname for k in state})
        total += sum(t.numel() * t.element_size() for t in state.values())
        if i < len(cfg.pattern):
            _empty(blk, "meta")                                    # free the layer
        del state
        print(f"  shard {i + 1}/{n}: {total / 1e9:.1f} GB, {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = hf_quant_config(model)
    (out / "hf_quant_config.json").write_text(json.dumps(hf, indent=2))
    cfg.replace(torch_dtype="bfloat16", extra={**cfg.extra, "quantization_config": config_block(hf)}).save(out)


# ---------------------------------------------------------------------------------------------- measuring
def bytes_per_token(model) -> dict:
    """Weight bytes one batch-1 decode step reads: dense weights of every block, top_k / E of the routed experts,
    lm_head, one embedding row."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    dense = experts = 0
    for blk in model.backbone.layers:
        sd = blk.state_dict()
        ex = size(t for n, t in sd.items() if ".experts." in n)
        dense += size(t for n, t in sd.items() if ".experts." not in n)
        if ex:
            experts += ex * blk.mixer.gate.top_k / blk.mixer.gate.n_experts
    emb = model.backbone.embeddings.weight
    head = size(model.lm_head.state_dict().values()) + size([model.backbone.norm_f.weight])
    return {"dense": dense, "experts": int(experts), "lm_head": head, "emb_row": emb[0].numel() * emb.element_size(),
            "total": int(dense + experts + head + emb[0].numel() * emb.element_size())}


def measure(path: Path, threads: list[int], tokens: int, prompt: int) -> dict:
    from nemotron3.engine import LLM, SamplingParams
    res = {"path": str(path), "checkpoint_bytes": ckpt_bytes(path), "rss_before": rss()}
    t0 = time.perf_counter()
    llm = LLM(str(path), max_num_seqs=1, weight_dtype="bfloat16", enable_prefix_caching=False)
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load"] = rss()
    res["bytes_per_token"] = bytes_per_token(llm.model)
    ids = torch.randint(10, llm.model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    res["decode"] = {}
    for th in threads:
        llm.engine.threads = th
        if llm.engine._plan is not None:
            llm.engine._plan.threads = th
        llm.generate([ids.tolist()], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))    # warm-up
        bw = stream_bandwidth([th])[th]                  # the machine is shared: read bandwidth right around
        m = llm.generate([ids.tolist()], greedy)[0].metrics
        bw = [bw, stream_bandwidth([th])[th]]
        dt = m.finished_time - m.first_token_time
        res["decode"][th] = {"tok_s": (m.num_generated_tokens - 1) / dt, "ttft_s": m.ttft, "stream_gbs": bw,
                             "native": llm.engine._plan is not None and llm.engine._plan.native is not None}
        res[f"rss_after_decode_{th}"] = rss()           # (the stream buffer is freed: back to the OS)
    return res


_LIB = []


def stream_bandwidth(threads: list[int], repeats: int = 3) -> dict:
    """Median GB/s of bandwidth.py's C streaming read over a 1 GiB buffer, per thread count."""
    from bandwidth import stream_lib
    if not _LIB:
        _LIB.append(stream_lib())
    lib, buf = _LIB[0], torch.ones(1 << 27, dtype=torch.int64)      # 1 GiB
    out = {}
    for th in threads:
        r = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lib.stream_read(buf.data_ptr(), buf.numel(), th)
            r.append(buf.numel() * 8 / (time.perf_counter() - t0) / 1e9)
        out[th] = statistics.median(r)
    return out


def report(name: str, r: dict) -> None:
    G = 1e9
    c, b = r["checkpoint_bytes"], r["bytes_per_token"]
    base, load = r["rss_before"], r["rss_after_load"]
    print(f"\n== {name}: {r['path']}  checkpoint {c / G:.2f} GB, load {r['load_s']:.1f} s")
    print(f"   bytes/token {b['total'] / G:.3f} GB (dense {b['dense'] / G:.3f}, top-k experts {b['experts'] / G:.3f}, "
          f"lm_head {b['lm_head'] / G:.3f})")
    print(f"   RSS before load {base['VmRSS'] / G:.2f} GB; after load +{(load['VmRSS'] - base['VmRSS']) / G:.2f} GB "
          f"(anon +{(load['RssAnon'] - base['RssAnon']) / G:.2f}, file +{(load['RssFile'] - base['RssFile']) / G:.2f})"
          f" = {(load['VmRSS'] - base['VmRSS']) / c:.2f}x the checkpoint")
    for th, d in r["decode"].items():
        a = r[f"rss_after_decode_{th}"]
        gbs, bw = d["tok_s"] * b["total"] / G, max(d["stream_gbs"])
        print(f"   threads {th}: {d['tok_s']:.2f} tok/s ({'C kernel' if d['native'] else 'torch ops'}), "
              f"{gbs:.2f} GB/s = {gbs / bw:.0%} of the stream read (before / after: "
              f"{' / '.join(f'{g:.2f}' for g in d['stream_gbs'])} GB/s); "
              f"RSS after decoding +{(a['VmRSS'] - base['VmRSS']) / G:.2f} GB "
              f"(anon +{(a['RssAnon'] - base['RssAnon']) / G:.2f}, file +{(a['RssFile'] - base['RssFile']) / G:.2f})"
              f" = {(a['VmRSS'] - base['VmRSS']) / c:.2f}x the checkpoint")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/work/tmp-lazy/nano"))
    ap.add_argument("--pattern", default=PATTERN)
    ap.add_argument("--full", action="store_true", help="the 52-layer Nano pattern, NVFP4, written layer by layer")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=["bf16", "nvfp4"])
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)     # the child process: one checkpoint
    ap.add_argument("--full-pattern", help=argparse.SUPPRESS)            # --full with another pattern (smoke test)
    a = ap.parse_args()
    if a.measure:
        print("RESULT " + json.dumps(measure(a.measure, a.threads, a.tokens, a.prompt)), flush=True)
        return
    if a.full:
        write_full(a.dir / "full", a.full_pattern)
        runs = {f"nvfp4, {len(config(a.full_pattern or PRESETS['nano'].pattern).pattern)} layers": a.dir / "full"}
    else:
        write_short(a.dir, a.pattern)
        runs = {f"{f}, {a.pattern}": a.dir / f for f in a.formats}
    print(f"load average {open('/proc/loadavg').read().split()[:3]}", flush=True)
    for name, path in runs.items():
        cmd = [sys.executable, __file__, "--measure", str(path), "--threads", *map(str, a.threads),
               "--tokens", str(a.tokens), "--prompt", str(a.prompt)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: measurement failed\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        report(name, r)
        print("   raw: " + json.dumps(r), flush=True)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}", flush=True)


if __name__ == "__main__":
    main()
