"""The `nemotron3` command. Subcommands follow vLLM's conventions (`nemotron3 serve MODEL --port 8000`).

    nemotron3 info PRESET|PATH [--json] [--context N] [--recipe R] [--kv-cache-dtype D]   parameter / memory accounting
    nemotron3 quantize SRC DST --recipe nvfp4|nvfp4-mixed|FILE.json [--calib N] [--kv-cache-dtype fp8]
                                                        ModelOpt-format NVFP4/FP8 checkpoint (+ FP8 KV cache)
    nemotron3 generate [--model PATH] "prompt"          generation (greedy, or --temperature/--seed; MTP drafts)
    nemotron3 eval lm|ruler [MODEL] [...]               held-out LM quality / RULER long-context retrieval
    nemotron3 eval envs [MODEL] [--envs calc,code,format] [--n 50] [--mode off|regular|medium|budget=N]
                                                        greedy accuracy on the post-training environments' test split
    nemotron3 train RECIPE.json [...]                   pretraining (see recipes/; --help lists the trainer's flags)
    nemotron3 serve [MODEL] [--port 8000] [...]         OpenAI/Anthropic-compatible server + web chat at /
    nemotron3 chat [MODEL]                              interactive terminal chat (/exit, /reset, /think on|off)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .sandbox import UNSAFE_ENV, SandboxUnavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "pico"


def default_model() -> str:
    """The embedded model shipped in the repo (override with $NEMOTRON3_MODEL)."""
    return os.environ.get("NEMOTRON3_MODEL", str(DEFAULT_MODEL))


def _config_for(target: str):
    """(config, display name, preset name or None). A model directory (or config file) wins over a preset of
    the same name, and reports its own config, never the preset's inferred fields."""
    from .config import NemotronConfig
    from .presets import PRESETS, get_preset
    path = Path(target)
    if path.is_file() or (path / "config.json").is_file():
        return NemotronConfig.from_json_file(path), path.resolve().name, None
    if target in PRESETS:
        return get_preset(target), target, target
    if path.exists():
        return NemotronConfig.from_json_file(path), path.resolve().name, None
    raise SystemExit(f"error: {target!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def _info_kv_dtype(args, cfg) -> str:
    """--kv-cache-dtype for `info`: auto = FP8 when the model directory declares it (kv_cache_quant_algo), else bf16."""
    if args.kv_cache_dtype != "auto":
        return args.kv_cache_dtype
    if Path(args.model).is_dir():
        from .quant.modelopt import declares_fp8_kv, read_quant_config
        if declares_fp8_kv(read_quant_config(Path(args.model), cfg.extra)):
            return "fp8"
    return "bfloat16"


def cmd_info(args) -> None:
    from .presets import format_report, report_dict
    cfg, name, preset = _config_for(args.model)
    recipes = [args.recipe] if args.recipe else []
    kv = _info_kv_dtype(args, cfg)
    if args.json:
        out = report_dict(cfg, args.context, preset, kv_cache_dtype=kv)
        if recipes:
            from .quant.recipe import bits_per_element
            out["quantization"] = bits_per_element(cfg, args.recipe)
        print(json.dumps(out, indent=2))
    else:
        print(format_report(cfg, name, args.context, preset, kv_cache_dtype=kv))
        if recipes:
            from .quant.recipe import format_bits_report
            print(format_bits_report(cfg, args.recipe))


def cmd_quantize(args) -> None:
    """Post-training quantization to a ModelOpt-format checkpoint (non-quantized tensors written in bf16)."""
    import shutil
    import torch
    from .checkpoint import load, save
    from .quant.quantize import calibration_batches, quantize_model
    from .quant.recipe import format_bits_report
    torch.manual_seed(0)
    model = load(args.src, dtype="float32")
    batches = None
    if args.calib:
        from .train.corpus import build_corpus, iter_documents
        from .tokenizer import load_tokenizer
        corpus = Path(args.corpus)
        if not (corpus / "train.jsonl").exists():
            build_corpus(corpus, sources=args.sources)
        tok = load_tokenizer(args.tokenizer or args.src)
        docs = (d["text"] for d in iter_documents(corpus / "train.jsonl"))
        batches = calibration_batches(docs, tok, args.calib, args.seq_len)
    quantize_model(model, args.recipe, batches, kv_cache_dtype=args.kv_cache_dtype)
    dst = Path(args.dst)
    save(model, dst, dtype="bfloat16")
    for f in Path(args.src).iterdir():         # tokenizer, chat template, generation config
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and f.name not in (
                "config.json", "hf_quant_config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    calib = f"calibrated on {len(batches)} batches" if batches else "no input_scale (W4A16)"
    kv = ", FP8 KV cache" if args.kv_cache_dtype == "fp8" else ""
    print(f"wrote {dst} ({args.recipe}, {calib}{kv}); "
          f"safetensors {size / 2**20:.1f} MiB")
    print(format_bits_report(model.config, args.recipe))


def cmd_generate(args) -> None:
    import torch
    from .generate import greedy_generate
    from .checkpoint import load
    from .tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = load(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("error: the prompt is empty")
    stop = {tok.eos_id} | {i for i in (tok.token_to_id("<|im_end|>"),) if i is not None}
    for piece in greedy_generate(model, ids, args.max_tokens, stop_ids=stop, decode=tok.decode,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 num_speculative_tokens=args.num_speculative_tokens,
                                 repetition_penalty=args.repetition_penalty):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _engine_kwargs(args) -> dict:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    return dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                num_speculative_tokens=args.num_speculative_tokens, dtype=args.dtype,
                kv_cache_dtype=args.kv_cache_dtype, threads=args.threads, weight_dtype=args.weight_dtype)


def _weight_formats(model) -> str:
    """The storage formats of the model's linear and expert weights, e.g. "bfloat16 + nvfp4" (startup line)."""
    from torch import nn
    from .model.moe import Experts
    from .quant.linear import BF16Linear, FP8Linear, NVFP4Linear
    from .quant.quantize import NVFP4Experts
    found = set()
    for m in model.modules():
        if isinstance(m, (NVFP4Linear, NVFP4Experts)):
            found.add("nvfp4")
        elif isinstance(m, FP8Linear):
            found.add("fp8")
        elif isinstance(m, (nn.Linear, BF16Linear, Experts)):
            found.add(str((m.up_proj if isinstance(m, Experts) else m.weight).dtype).replace("torch.", ""))
    return " + ".join(sorted(found)) or "none"


def cmd_serve(args) -> None:
    import logging
    import uvicorn
    from .engine import LLM
    from .server import create_app
    model = args.model or default_model()
    names = args.served_model_name or [Path(model).resolve().name]
    llm = LLM(model, **_engine_kwargs(args))
    app = create_app(llm, served_model_name=names, api_key=args.api_key, max_pending=args.max_pending,
                     max_body_bytes=args.max_request_bytes, metrics_public=args.metrics_public,
                     body_timeout=args.body_timeout, responses_store_size=args.responses_store_size)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"serving {names[0]} on http://{args.host}:{args.port} (chat page at /, API under /v1); "
          f"decode: {llm.engine.decode_path()}; weights {_weight_formats(llm.model)}, activations "
          f"{str(llm.model.dtype).replace('torch.', '')}; K/V cache {llm.engine.cache.kv_dtype}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def cmd_chat(args) -> None:
    from .terminal_chat import run_chat
    from .engine import LLM
    llm = LLM(args.model or default_model(), **_engine_kwargs(args))
    run_chat(llm.engine, system=args.system, thinking=not args.no_thinking, thinking_budget=args.thinking_budget,
             temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, tools=args.tools,
             yes=args.yes)


def _engine_args(s) -> None:
    s.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded pico model)")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (cache slots)")
    s.add_argument("--num-speculative-tokens", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for prefill and the C decode kernel (default: torch's thread count)")
    s.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight storage with fp32 activations on CPU: bfloat16 = W16A32 (half the bytes per decode "
                        "step), float32 = fp32 copies; auto = bfloat16 for bf16 checkpoints (default)")
    _kv_arg(s, "K/V cache storage (vLLM's flag): auto = the checkpoint's (FP8 when it declares "
               "kv_cache_quant_algo FP8) or the model dtype")


def _kv_arg(s, help_text: str) -> None:
    from .model.cache import KV_CACHE_DTYPES
    s.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=help_text)


def _sandbox_arg(s) -> None:
    s.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="where the sandbox (bubblewrap + user namespaces) cannot run, run model-written code "
                        "UNSANDBOXED with your user's rights (sets NEMOTRON3_UNSAFE_NO_SANDBOX=1)")


def cmd_eval(args) -> None:
    """Held-out LM quality on the offline corpus's validation split (built on first use)."""
    if args.task == "ruler":
        return cmd_eval_ruler(args)
    if args.task == "envs":
        return cmd_eval_envs(args)
    import torch
    from .checkpoint import load
    from .eval.lm import evaluate_lm, induction_score
    from .train.corpus import build_corpus
    from .train.data import PackedDataset
    from .tokenizer import load_tokenizer
    corpus = Path(args.corpus)
    if not (corpus / "val.jsonl").exists():
        build_corpus(corpus, sources=args.sources)
    torch.manual_seed(0)
    model = load(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    ds = PackedDataset.from_corpus(corpus, tok, args.seq_len, "val", shuffle=False)
    out = evaluate_lm(model, ds, args.batch_size, args.max_batches, args.mtp_depths)
    out["induction"] = induction_score(model, model.config.vocab_size, batch_size=args.batch_size,
                                       bos_id=tok.bos_id)
    out["model"] = str(args.model)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def cmd_eval_envs(args) -> None:
    """Greedy per-env accuracy / format-error rate / thinking tokens on the envs' test split (train/rl.evaluate)."""
    import torch
    from .engine import LLM
    from .train.rl import evaluate
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_num_seqs=args.batch if args.batch > 1 else 32, dtype=args.dtype)
    report = evaluate(llm, args.envs, args.n, split="test", mode=args.mode, max_tokens=args.max_tokens)
    report["model"] = str(args.model)
    print(f"{'env':<8} {'acc':>6} {'fmt_err':>8} {'think_tok':>10} {'gen_tok':>8}   (mode {report['mode']}, n={args.n})")
    for name, v in report["envs"].items():
        print(f"{name:<8} {v['accuracy']:>6.3f} {v['format_error_rate']:>8.3f} {v['mean_thinking_tokens']:>10.1f} "
              f"{v['mean_generated_tokens']:>8.1f}")
    print(f"{'mean':<8} {report['mean_accuracy']:>6.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


def cmd_eval_ruler(args) -> None:
    """RULER-style retrieval accuracy (task x length) with haystacks from the corpus's validation split."""
    import torch
    from .engine import LLM
    from .eval.ruler import MAX_TOKENS, TASKS, evaluate_ruler, format_table
    from .train.corpus import build_corpus, iter_documents
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"error: unknown RULER task(s) {', '.join(bad)} (tasks: {', '.join(TASKS)})")
    if not args.lengths or min(args.lengths) < 64:
        raise SystemExit("error: --lengths must be token counts >= 64")
    if args.depth is not None and not 0.0 <= args.depth <= 1.0:
        raise SystemExit(f"error: --depth must be in [0, 1] (0 = the start of the document), got {args.depth}")
    corpus = Path(args.corpus)
    if not (corpus / "val.jsonl").exists():
        build_corpus(corpus, sources=args.sources)
    torch.manual_seed(0)
    max_len = max(args.lengths) + max(MAX_TOKENS.values()) + 8
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="max_model_len .* exceeds")   # NoPE: the user asked for it
        llm = LLM(args.model, max_num_seqs=args.batch, max_model_len=max_len, dtype=args.dtype,
                  enable_prefix_caching=False, max_num_batched_tokens=max(args.prefill_chunk, args.batch + 1))
    if llm.tokenizer is None:
        raise SystemExit(f"error: {args.model} has no tokenizer.json (a training checkpoint: evaluate the exported "
                         "OUT_DIR/model, or copy the tokenizer files next to its config.json)")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    haystack = [d["text"] for d in iter_documents(corpus, "val")]
    report = evaluate_ruler(llm, haystack, args.tasks, args.lengths, args.samples,
                            args.seed, args.batch, log=log, depth=args.depth)
    report["model"] = str(args.model)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


def cmd_train(argv: list[str]) -> None:
    """Everything after `train` goes to the trainer's own parser, so `nemotron3 train --help` lists its flags."""
    from .train.pretrain import main as train_main
    train_main(argv, prog="nemotron3 train")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    p = argparse.ArgumentParser(prog="nemotron3", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="parameter, memory and cache accounting for a preset or model directory")
    s.add_argument("model", help="preset name (tiny, nano, super, ultra) or model directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--context", type=int, default=None, help="context length for the per-sequence cache report")
    s.add_argument("--recipe", default=None, metavar="nvfp4|nvfp4-mixed|FILE.json",
                   help="also report bits per element under this quantization recipe (a built-in or a recipe file)")
    _kv_arg(s, "K/V bytes per element in the cache report: auto = fp8 (1 byte) when the model directory "
               "declares an FP8 KV cache, else bfloat16 (2)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("quantize", help="NVFP4 / FP8 post-training quantization to a ModelOpt-format checkpoint")
    s.add_argument("src", help="BF16/FP32 model directory")
    s.add_argument("dst", help="output directory")
    s.add_argument("--recipe", required=True, metavar="nvfp4|nvfp4-mixed|FILE.json",
                   help="nvfp4: as Nemotron 3 Nano NVFP4; nvfp4-mixed: as Super/Ultra (experts NVFP4, FP8, BF16); "
                        "or a recipe file of per-module rules (README, NVFP4 section)")
    _kv_arg(s, "fp8: declare an FP8 E4M3 KV cache (kv_cache_quant_algo FP8, k_scale/v_scale from --calib, "
               "else 1.0); auto/bfloat16: KV cache not quantized")
    s.add_argument("--calib", type=int, default=0, help="calibration batches of real text for input_scale (0 = none)")
    s.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: SRC)")
    s.add_argument("--corpus", default=str(Path.home() / ".cache" / "nemotron3" / "corpus"),
                   help="corpus directory whose train split supplies calibration text (built if missing)")
    s.add_argument("--sources", nargs="+", default=["stdlib", "docs"])
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("generate", help="generate from a prompt (greedy by default)")
    s.add_argument("prompt")
    s.add_argument("--model", default=default_model(), help="model directory (default: the embedded pico model)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (vLLM's; 1 = off)")
    s.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="MTP self-speculative decoding with k draft tokens (needs a model with an MTP block; "
                        "on a CPU plain decode is faster, see bench/RESULTS.md)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI/Anthropic-compatible API server and web chat (vLLM-style flags)")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("NEMOTRON3_API_KEY"),
                   help="require this key everywhere but / and /health (Bearer or x-api-key; default: "
                        "$NEMOTRON3_API_KEY)")
    s.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use as `model` (default: the model directory's name, e.g. 'pico')")
    s.add_argument("--max-pending", type=int, default=256, help="sequences in flight before 429")
    s.add_argument("--max-request-bytes", type=int, default=8 << 20, help="request body limit (413 above)")
    s.add_argument("--responses-store-size", type=int, default=1024,
                   help="responses kept for previous_response_id / GET /v1/responses/{id} (LRU; 0 = none)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall before 408 (slow or truncated uploads)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("chat", help="interactive terminal chat with a model (no server)")
    _engine_args(s)
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("--no-thinking", action="store_true", help="start with thinking off (/think on|off toggles)")
    s.add_argument("--thinking-budget", type=int, default=None, help="max reasoning tokens per reply")
    s.add_argument("--temperature", type=float, default=0.6)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-tokens", type=int, default=1024, help="max tokens per reply (reasoning included)")
    s.add_argument("--tools", action=argparse.BooleanOptionalAction, default=True,
                   help="offer the demo calculator and sandboxed python tools and run the model's calls")
    s.add_argument("--yes", "-y", action="store_true",
                   help="run the model's python code without asking first (default: show it and ask y/N)")
    _sandbox_arg(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("eval", help="held-out loss/perplexity/MTP accuracy and in-context copying (lm), RULER "
                                    "long-context retrieval (ruler) or post-training env accuracy (envs)")
    s.add_argument("task", choices=["lm", "ruler", "envs"])
    s.add_argument("model", nargs="?", default=default_model())
    s.add_argument("--corpus", default=str(Path.home() / ".cache" / "nemotron3" / "corpus"),
                   help="corpus directory (built from the stdlib and local docs if missing)")
    s.add_argument("--sources", nargs="+", default=["stdlib", "docs"])
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-batches", type=int, default=None)
    s.add_argument("--mtp-depths", type=int, default=3)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g = s.add_argument_group("ruler")
    g.add_argument("--lengths", type=_csv(int), default=[4096, 16384, 65536, 131072],
                   help="prompt lengths in tokens, comma-separated (default 4096,16384,65536,131072)")
    g.add_argument("--tasks", type=_csv(str),
                   default=["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"],
                   help="comma-separated RULER tasks (default: all four)")
    g.add_argument("--samples", type=int, default=4, help="prompts per (task, length)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--depth", type=float, default=None,
                   help="plant the (first) needle at this fraction of the document, 0 = its start (default random)")
    g.add_argument("--json", default=None, metavar="OUT", help="write the full report (per-sample outputs) here")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    g.add_argument("--batch", type=int, default=1, help="prompts decoded together (cache slots; 1 = least memory)")
    g.add_argument("--prefill-chunk", type=int, default=2048, help="prefill chunk (max_num_batched_tokens)")
    g = s.add_argument_group("envs (--json, --threads, --batch as above; --batch 1 means 32 slots)")
    g.add_argument("--envs", type=_csv(str), default=["calc", "code", "format"], help="comma-separated envs")
    g.add_argument("--n", type=int, default=50, help="test tasks per env")
    g.add_argument("--mode", default="regular", help="reasoning mode: off | regular | medium | budget=N")
    g.add_argument("--max-tokens", type=int, default=512, help="max generated tokens per assistant turn")
    _sandbox_arg(s)
    s.set_defaults(fn=cmd_eval)

    # listed here for `nemotron3 --help`; main() hands `train ...` to the trainer before this parser runs
    s = sub.add_parser("train", help="pretrain from a recipe (see recipes/); `nemotron3 train --help` lists the "
                                     "trainer's flags", add_help=False)
    s.add_argument("args", nargs=argparse.REMAINDER, help="RECIPE.json and the trainer's flags")

    args = p.parse_args(argv)
    if getattr(args, "unsafe_no_sandbox", False):
        os.environ[UNSAFE_ENV] = "1"            # for this process and the ones it starts
        print(f"WARNING: --unsafe-no-sandbox: where the sandbox cannot run, model-written code runs "
              f"UNSANDBOXED", file=sys.stderr)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, SandboxUnavailable) as e:  # ConfigError/CheckpointError: ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
