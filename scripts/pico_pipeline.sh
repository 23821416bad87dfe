#!/usr/bin/env bash
# The whole pico pipeline on a CPU, from nothing to the shipped chat model:
#   data + tokenizer + pretraining -> long-context extension (+ its attention ablation) -> SFT -> GRPO
#   -> one teacher per domain -> MOPD -> MTP boosting -> export + NVFP4 -> evaluation tables.
# Every stage checkpoints atomically; rerunning the script resumes the stage that was interrupted and skips
# finished ones (a stage is finished when OUT_DIR/model exists). Measured durations: README "Post-training".
# Usage: bash scripts/pico_pipeline.sh [EVAL_DIR]
# Threads: each recipe's train.threads / rl.threads. The sequential stages (pretraining, copy, SFT) use both
# cores (1.8x one on an idle machine, bench/RESULTS.md); the stages run two at a time below use one each.
# OMP_WAIT_POLICY=PASSIVE (the default here) keeps OpenMP from spinning when something else shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
EVAL=${1:-runs/eval}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$EVAL"

stage() {   # stage NAME OUT_DIR COMMAND...: run (or resume) unless OUT_DIR/model exists, and time it
  local name=$1 out=$2; shift 2
  if [ -f "$out/model/model.safetensors" ]; then echo "[$name] done ($out/model)"; return; fi
  local resume=(); [ -d "$out/checkpoint" ] && resume=(--resume)
  local t0=$SECONDS
  "$@" "${resume[@]}"
  echo "[$name] $(( (SECONDS - t0) / 60 )) min" | tee -a "$EVAL/durations.txt"
}

# 1. corpus, tokenizer, pretraining: 5,600 steps x 4,096 tokens = 22.9M tokens (~6 h on two idle cores)
stage pretrain runs/pico $PY -m nemotron3.train recipes/pico.json --no-progress
# 1b. in-context copying: 400 steps of the copy task alone (16 random tokens of the 508 most frequent, repeated;
#     ~10 min), then 3,000 steps of text + the same task over the whole vocabulary (15.4M tokens). Pretraining with a
#     text-span copy curriculum in the mix did not make pico copy (copy gain 0.11 after 1,200 steps); this does.
stage copy runs/pico-copy $PY -m nemotron3.train recipes/pico-copy.json --no-progress
stage copy-mix runs/pico-copy-mix $PY -m nemotron3.train recipes/pico-copy-mix.json --no-progress
BASE=runs/pico-copy-mix/model
# the base's loss against tokens over its three stages (model card)
$PY scripts/plot_tokens.py runs/pico/log.jsonl runs/pico-copy/log.jsonl runs/pico-copy-mix/log.jsonl --out "$EVAL/base-loss.png"
# 2. long-context extension: 8K + 512-token mixture with synthetic retrieval, constant low LR
stage longctx runs/pico-longctx $PY -m nemotron3.train.longctx recipes/pico-longctx.json --no-progress &
# 2b. ablation: the attention layers replaced by fresh Mamba layers (train/surgery.py), same stage recipe;
#     the controlled from-scratch version of the attention-vs-SSM recall test is bench/recall_ablation.py
[ -d runs/ablation/noattn-init ] || $PY -m nemotron3.train.surgery "$BASE" runs/ablation/noattn-init \
    --pattern MEMMEMEMMEME --mtp-layers 0
stage longctx-noattn runs/ablation/noattn $PY -m nemotron3.train.longctx recipes/pico-longctx.json \
    --init runs/ablation/noattn-init --out-dir runs/ablation/noattn --no-progress
wait
# 3. SFT on the environments' reference episodes (think / off / budget / medium traces), 1500 per domain
stage sft runs/pico-sft $PY -m nemotron3.train.sft recipes/pico-sft.json --no-progress
# 4. GRPO over all environments
stage grpo runs/pico-grpo $PY -m nemotron3.train.rl recipes/pico-grpo.json
# 5. one teacher per domain (GRPO on its own environment), two at a time
stage teacher-calc runs/pico-teacher-calc $PY -m nemotron3.train.rl recipes/pico-teacher-calc.json &
stage teacher-code runs/pico-teacher-code $PY -m nemotron3.train.rl recipes/pico-teacher-code.json
wait
stage teacher-format runs/pico-teacher-format $PY -m nemotron3.train.rl recipes/pico-teacher-format.json
# 6. multi-teacher on-policy distillation
stage mopd runs/pico-mopd $PY -m nemotron3.train.rl recipes/pico-mopd.json
# 7. MTP boosting (backbone frozen)
stage mtp-boost runs/pico-mtp-boost $PY -m nemotron3.train.mtp_boost recipes/pico-mtp-boost.json
cp runs/pico-mtp-boost/acceptance.json "$EVAL/mtp-acceptance.json"
# 8. ship: bf16 chat model + its NVFP4 (mixed recipe) version
FINAL=runs/pico-mtp-boost/model
[ -d runs/pico-nvfp4 ] || $PY -m nemotron3.cli quantize "$FINAL" runs/pico-nvfp4 --recipe nvfp4-mixed

# 9. evaluation tables (held-out test split of every environment; validation loss and the copying probe per
#    stage; RULER before/after the extension + ablation)
ev() { [ -f "$EVAL/$1.json" ] || $PY -m nemotron3.cli eval envs "$2" --n 30 "${@:3}" --json "$EVAL/$1.json"; }
ev base "$BASE"
ev sft runs/pico-sft/model
ev grpo runs/pico-grpo/model
for d in calc code format; do ev "teacher-$d" runs/pico-teacher-$d/model; done
ev mopd runs/pico-mopd/model
ev final "$FINAL"
ev final-nvfp4 runs/pico-nvfp4
for m in off regular medium budget=8; do ev "mode-${m/=/}" "$FINAL" --mode "$m"; done
lm() { [ -f "$EVAL/lm-$1.json" ] || $PY -m nemotron3.cli eval lm "$2" --corpus runs/corpus --max-batches 8 --json "$EVAL/lm-$1.json" >/dev/null; }
lm pretrain runs/pico/model
lm copy runs/pico-copy/model
lm base "$BASE"
lm longctx runs/pico-longctx/model
lm sft runs/pico-sft/model
lm grpo runs/pico-grpo/model
lm mopd runs/pico-mopd/model
lm final "$FINAL"
lm final-nvfp4 runs/pico-nvfp4
for m in "$BASE" runs/pico-longctx/model runs/ablation/noattn/model; do
  n=$(echo "$m" | tr / -)
  [ -f "$EVAL/ruler-$n.json" ] || $PY -m nemotron3.cli eval ruler "$m" --corpus runs/corpus --lengths 4096,16384 \
      --samples 2 --json "$EVAL/ruler-$n.json"
done
[ -f "$EVAL/ruler-long-runs-pico-longctx-model.json" ] || $PY -m nemotron3.cli eval ruler runs/pico-longctx/model \
    --corpus runs/corpus --lengths 65536,131072 --tasks niah_single --samples 1 \
    --json "$EVAL/ruler-long-runs-pico-longctx-model.json"
$PY scripts/results_tables.py "$EVAL" > "$EVAL/tables.md"
echo "pipeline finished; results in $EVAL"
