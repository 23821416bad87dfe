"""Tokens/s and peak memory (max RSS) per rank of DDP vs FSDP2 vs EP 2 vs FSDP2 x EP 2 at 2 ranks (gloo on CPU):
`python bench/parallel_speed.py RECIPE.json CORPUS_DIR TOKENIZER_DIR [STEPS [LAYOUT,LAYOUT...]]`. Each layout runs under torchrun
with this file as the worker (`--worker`), which trains and then writes its rank's peak RSS; tokens/s is the
mean of the log's per-step tok_per_s after the first 2 steps."""
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {"DDP": [], "FSDP2": ["parallel.fsdp=true"], "EP 2": ["parallel.expert=2"],
           "FSDP2 x EP 2": ["parallel.fsdp=true", "parallel.expert=2"]}

if __name__ == "__main__" and sys.argv[1] == "--worker":
    from nemotron3.train.pretrain import main
    main(sys.argv[2:])
    out = Path(sys.argv[sys.argv.index("--out-dir") + 1])
    (out / f"rss_rank{os.environ['RANK']}").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
elif __name__ == "__main__":
    recipe, corpus, tok = sys.argv[1:4]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 12
    only = sys.argv[5].split(",") if len(sys.argv) > 5 else list(LAYOUTS)
    for name, sets in LAYOUTS.items():
        if name not in only:
            continue
        out = Path(tempfile.mkdtemp())
        over = [f"data.corpus_dir={corpus}", f"data.tokenizer_dir={tok}", f"train.total_steps={steps}",
                "train.eval_every=100000", "train.save_every=100000", "train.threads=2", *sets]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--worker", recipe, "--out-dir", str(out), "--no-progress",
                        "--max-steps", str(steps), *[a for s in over for a in ("--set", s)]],
                       check=True, capture_output=True)
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][2:]
        tps = sum(r["tok_per_s"] for r in recs) / len(recs)
        rss = [int((out / f"rss_rank{r}").read_text()) / 1024 for r in range(2)]
        print(f"| {Path(recipe).stem} | {name} | {tps:,.0f} | {rss[0]:.0f} / {rss[1]:.0f} |", flush=True)
