"""The `nemotron3` command. Subcommands follow vLLM's conventions (`nemotron3 serve MODEL --port 8000`).

    nemotron3 info PRESET|PATH [--json] [--context N]   parameter / memory accounting
    nemotron3 generate [--model PATH] "prompt"          greedy generation
    nemotron3 train RECIPE.json [...]                   pretraining (see recipes/)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "pico"


def default_model() -> str:
    """The embedded model shipped in the repo (override with $NEMOTRON3_MODEL)."""
    return os.environ.get("NEMOTRON3_MODEL", str(DEFAULT_MODEL))


def _config_for(target: str):
    from .config import NemotronConfig
    from .presets import PRESETS, get_preset
    if target in PRESETS:
        return get_preset(target), target
    if Path(target).exists():
        return NemotronConfig.from_json_file(target), Path(target).name
    raise SystemExit(f"error: {target!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def cmd_info(args) -> None:
    from .presets import format_report, report_dict
    cfg, name = _config_for(args.model)
    if args.json:
        print(json.dumps(report_dict(cfg, args.context, name), indent=2))
    else:
        print(format_report(cfg, name, args.context))


def cmd_generate(args) -> None:
    import torch
    from .generate import greedy_generate
    from .checkpoint import load
    from .train.tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = load(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("error: the prompt is empty")
    stop = {tok.eos_id} | {i for i in (tok.token_to_id("<|im_end|>"),) if i is not None}
    for piece in greedy_generate(model, ids, args.max_tokens, stop_ids=stop, decode=tok.decode):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_train(args, rest) -> None:
    from .train.pretrain import main as train_main
    train_main([args.recipe, *rest])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nemotron3", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="parameter, memory and cache accounting for a preset or model directory")
    s.add_argument("model", help="preset name (tiny, nano, super, ultra) or model directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--context", type=int, default=None, help="context length for the per-sequence cache report")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="greedy generation from a prompt")
    s.add_argument("prompt")
    s.add_argument("--model", default=default_model(), help="model directory (default: the embedded pico model)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("train", help="pretrain from a recipe (see recipes/); extra flags go to the trainer")
    s.add_argument("recipe")
    s.set_defaults(fn=None)

    args, rest = p.parse_known_args(argv)
    if args.cmd == "train":
        return cmd_train(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:     # ConfigError / CheckpointError are ValueErrors
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
