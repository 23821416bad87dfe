"""Markdown tables from the pipeline's evaluation JSONs (scripts/pico_pipeline.sh writes them to runs/eval/).

    python scripts/results_tables.py [EVAL_DIR]

Prints: held-out LM loss and in-context copying per stage, accuracy per domain per stage, reasoning modes (accuracy and thinking tokens), NVFP4 vs BF16,
MTP acceptance before/after boosting, RULER task x length per model. Missing files are skipped.
"""
import json
import sys
from pathlib import Path

EVAL = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/eval")
STAGES = [("base (pretrained + copy stages)", "base"), ("SFT", "sft"), ("GRPO", "grpo"),
          ("teacher: calc", "teacher-calc"), ("teacher: code", "teacher-code"), ("teacher: format", "teacher-format"),
          ("MOPD", "mopd"),
          ("final (MOPD + MTP boost), BF16", "final"), ("final, NVFP4 mixed", "final-nvfp4")]
MODES = [("off", "mode-off"), ("regular", "mode-regular"), ("medium", "mode-medium"), ("budget = 8 tokens", "mode-budget8")]


def load(name):
    p = EVAL / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def env_table(rows, extra_cols=False):
    envs = None
    out = []
    for label, name in rows:
        r = load(name)
        if r is None:
            continue
        if envs is None:
            envs, n = list(r["envs"]), r["n_per_env"]
            head = "| model | " + " | ".join(envs) + " | mean | format errors |"
            if extra_cols:
                head = "| mode | " + " | ".join(f"{e} acc / think tok" for e in envs) + " | mean acc | mean gen tok |"
            out += [head, "|" + "---|" * (len(envs) + 3)]
        e = r["envs"]
        if extra_cols:
            gen = sum(e[x]["mean_generated_tokens"] for x in envs) / len(envs)
            out.append(f"| {label} | " + " | ".join(f"{e[x]['accuracy']:.2f} / {e[x]['mean_thinking_tokens']:.0f}"
                                                     for x in envs) + f" | {r['mean_accuracy']:.3f} | {gen:.0f} |")
        else:
            fe = sum(e[x]["format_error_rate"] for x in envs) / len(envs)
            out.append(f"| {label} | " + " | ".join(f"{e[x]['accuracy']:.2f}" for x in envs)
                       + f" | {r['mean_accuracy']:.3f} | {fe:.2f} |")
    if envs:
        out.append(f"\n(greedy, held-out test split, n = {n} per domain)")
    return "\n".join(out)


def lm_table():
    """Validation loss and the copying probe (`nemotron3 eval lm`) of every stage that has an lm-NAME.json."""
    rows = [(label, load(f"lm-{name}")) for label, name in [("pretraining", "pretrain"), ("copy task", "copy"),
                                                            ("base (text + copy task)", "base"),
                                                            ("long-context stage", "longctx")] + STAGES[1:]]
    rows = [(label, r) for label, r in rows if r is not None]
    if not rows:
        return ""
    out = ["| model | val loss | MTP-1 acc | 1st copy loss | 2nd copy loss | copy gain | 2nd copy top-1 |",
           "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        i = r["induction"]
        mtp = f"{r['mtp_accuracy'][0]:.3f}" if r["mtp_accuracy"] else "-"
        out.append(f"| {label} | {r['loss']:.3f} | {mtp} | {i['first_copy_loss']:.2f} | {i['second_copy_loss']:.2f}"
                   f" | {i['copy_gain']:.2f} | {i['second_copy_accuracy']:.2f} |")
    return "\n".join(out) + (f"\n\n(corpus validation split; copying: {rows[0][1]['induction']['rows']} random sequences"
                             f" of {rows[0][1]['induction']['length']} tokens, each repeated once)")


def ruler_table():
    """One table: a row per (model, task), a column per length; cells "accuracy (samples)"."""
    cells, lengths = {}, set()
    for p in sorted(EVAL.glob("ruler-*.json")):
        r = json.loads(p.read_text())
        for task, by_len in r["results"].items():
            for length, v in by_len.items():
                cells[(r.get("model", p.stem), task, int(length))] = (v["accuracy"], len(v["samples"]))
                lengths.add(int(length))
    if not cells:
        return ""
    lengths = sorted(lengths)
    out = ["| model | task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
           "|" + "---|" * (len(lengths) + 2)]
    for model, task in sorted({(m, t) for m, t, _ in cells}):
        row = [f"{cells[(model, task, n)][0]:.2f} ({cells[(model, task, n)][1]})" if (model, task, n) in cells
               else "-" for n in lengths]
        out.append(f"| `{model}` | {task} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n\n(accuracy (samples per cell); greedy, haystack from the corpus validation split)"


def main():
    lt = lm_table()
    if lt:
        print("### Language modelling and in-context copying per stage\n\n" + lt + "\n")
    print("### Held-out accuracy per stage\n")
    print(env_table(STAGES))
    print("\n### Reasoning modes (final model)\n")
    print(env_table(MODES, extra_cols=True))
    acc = EVAL / "mtp-acceptance.json"
    if acc.exists():
        a = json.loads(acc.read_text())
        print("\n### MTP acceptance\n")
        print("| | acceptance rate | mean accepted length |\n|---|---|---|")
        for k in ("before", "after"):
            if k in a:
                print(f"| {k} boosting | {a[k]['acceptance_rate']:.3f} | {a[k]['mean_accepted_length']:.2f} |")
    rt = ruler_table()
    if rt:
        print("\n### RULER-style retrieval\n" + rt)


if __name__ == "__main__":
    main()
