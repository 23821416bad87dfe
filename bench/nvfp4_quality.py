"""NVFP4 post-training quantization quality, memory and speed on a trained model; every number measured here.

    python bench/nvfp4_quality.py [--model DIR] [--tokenizer DIR] [--corpus DIR] [--max-batches 16] [--calib 8]

For BF16 (the unquantized weights, run in fp32 on CPU like the quantized models' activations), `nvfp4` (Nano
recipe) and `nvfp4-mixed` (Super/Ultra recipe), quantized in memory with `quant.quantize_model` (input_scale
calibrated on --calib batches of the corpus TRAIN split; W4A16 compute ignores it): held-out loss / perplexity on
the VAL split (`nemotron3.eval.lm.evaluate_lm`, MTP off), relative loss gap vs BF16 (issue 5 target: within 2%
for nvfp4-mixed), checkpoint bytes (quantized tensors at their size, other floating tensors at 2 bytes), and
forward ms for one [batch, seq_len] batch (median of 5 interleaved rounds; CPU W4A16 dequantizes in every forward,
so it is expected to be slower than the dense matmul: the win on CPU is memory, not speed).
Model: --model, else models/pico, else runs/pico/checkpoint.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemotron3.checkpoint import load  # noqa: E402
from nemotron3.eval.lm import evaluate_lm  # noqa: E402
from nemotron3.quant.quantize import calibration_batches, quant_state_names, quantize_model  # noqa: E402
from nemotron3.train.corpus import iter_documents  # noqa: E402
from nemotron3.train.data import PackedDataset  # noqa: E402
from nemotron3.tokenizer import load_tokenizer  # noqa: E402


def held_bytes(model) -> int:
    """Bytes of the model as a checkpoint would hold it: quantized tensors at their size, every other floating
    tensor in bf16 (the router bias in fp32), tied tensors once."""
    quant = quant_state_names(model)
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        keep = name in quant or not t.is_floating_point() or name.endswith("e_score_correction_bias")
        total += t.numel() * (t.element_size() if keep else 2)
    return total


def forward_ms(models: dict, batch, rounds=5) -> dict:
    """Median forward ms per model, rounds interleaved across the models (a shared machine drifts)."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(batch)
        for _ in range(rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m(batch)
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models" / "pico" if (ROOT / "models" / "pico" / "config.json").exists() else \
        ROOT / "runs" / "pico" / "checkpoint"
    p.add_argument("--model", default=str(default))
    p.add_argument("--tokenizer", default=None,
                   help="default: the model dir if it has tokenizer.json, else runs/tokenizer")
    p.add_argument("--corpus", default=str(ROOT / "runs" / "corpus"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=16)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok_dir = args.tokenizer or (args.model if (Path(args.model) / "tokenizer.json").exists()
                                 else ROOT / "runs" / "tokenizer")
    tok = load_tokenizer(tok_dir)
    base = load(args.model, dtype="float32")
    val = PackedDataset.from_corpus(args.corpus, tok, args.seq_len, "val", shuffle=False)
    docs = (d["text"] for d in iter_documents(Path(args.corpus) / "train.jsonl"))
    calib = calibration_batches(docs, tok, args.calib, args.seq_len, batch_size=1)
    batch = next(iter(val.eval_batches(args.batch_size)))[0]
    rows, models = {}, {}
    for name in ("bf16", "nvfp4", "nvfp4-mixed"):
        model = models[name] = base if name == "bf16" else quantize_model(copy.deepcopy(base), name, calib)
        with torch.no_grad():
            ev = evaluate_lm(model, val, args.batch_size, args.max_batches, mtp_depths=0)
        rows[name] = {"loss": ev["loss"], "perplexity": ev["perplexity"], "tokens": ev["tokens"],
                      "bytes": held_bytes(model)}
    for name, ms in forward_ms(models, batch).items():
        rows[name]["forward_ms"] = ms
    ref = rows["bf16"]
    print(f"model {args.model}; val {ref['tokens']} tokens; forward batch {tuple(batch.shape)}; "
          f"{args.threads} thread(s); calibration {len(calib)} x {args.seq_len} train tokens")
    print(f"{'':<12}{'loss':>8}{'ppl':>9}{'rel gap':>9}{'MiB':>9}{'x bf16':>8}{'fwd ms':>9}{'x bf16':>8}")
    for name, r in rows.items():
        r["rel_loss_gap"] = r["loss"] / ref["loss"] - 1
        print(f"{name:<12}{r['loss']:>8.4f}{r['perplexity']:>9.3f}{r['rel_loss_gap']:>+9.2%}"
              f"{r['bytes'] / 2**20:>9.1f}{r['bytes'] / ref['bytes']:>8.3f}{r['forward_ms']:>9.1f}"
              f"{r['forward_ms'] / ref['forward_ms']:>8.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
