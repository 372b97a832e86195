#!/usr/bin/env bash
# Issue 18's few-shot selection on twitter_complaints, as docs/accuracy.md ("The few-shot selection protocol")
# fixes it before it runs: the test split is read only in the last step, for the one chosen setting.
#   1. stage 1: every setting of the grid below on 5 stratified folds of the 50 training rows;
#   2. stage 2: the 8 best (fold accuracy, then macro-F1, then fewer trainable parameters) on 5 folds x 3 repeats;
#   3. the choice: `peftlab compare --select` (the fewest trainable parameters within one standard error of
#      the best stage-2 accuracy);
#   4. the chosen setting on the 3,399 test rows, seeds 0, 1, 2.
# Every sweep is resumable: the same command again skips finished jobs (resume=auto) and goes on.
#
# Usage: scripts/twitter_fewshot_selection.sh OUT [JOBS_AT_ONCE]
#   OUT           where the sweeps go (stage1/, stage2/, test/, logs/, and the tables)
#   JOBS_AT_ONCE  sweeps run side by side (default 2), dealt round-robin over the GPUs in CUDA_VISIBLE_DEVICES
#                 (default: every GPU nvidia-smi lists; none: the CPU)
# PYTHON (default: python) is the interpreter with peftlab installed. MODELS="mpnet minilm" (default) names the
# encoders; EXTRA="..." adds overrides to every run; EPOCHS (default 10,30) and FT_EPOCHS (full fine-tuning's,
# default 30) shorten a rehearsal: on 2 CPU cores, 5 minutes when nothing else runs (23 with other work beside it),
# MODELS=tiny_bert EPOCHS=1,2 FT_EPOCHS=2 EXTRA=++objective.num_iterations=1 scripts/twitter_fewshot_selection.sh /tmp/s
# model=mpnet needs all-mpnet-base-v2 in the Hugging Face cache: bash ../shared/models/install_mpnet.sh
set -euo pipefail
OUT=${1:?usage: scripts/twitter_fewshot_selection.sh OUT [JOBS_AT_ONCE]}
JOBS=${2:-2}
MODELS=${MODELS:-mpnet minilm}
EXTRA=${EXTRA:-}
EPOCHS=${EPOCHS:-10,30}
FT_EPOCHS=${FT_EPOCHS:-30}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
if [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && command -v nvidia-smi >/dev/null; then
  CUDA_VISIBLE_DEVICES=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
IFS=, read -r -a GPUS <<<"${CUDA_VISIBLE_DEVICES:-}"
BASE="experiment=twitter_fewshot_selection $EXTRA"

# One line per sweep: "<name> <overrides>"; the costliest first, so that the last wave is short. Stages 2 and 3
# take a run's recorded overrides, which hold $BASE already.
grid() {
  for model in $MODELS; do
    for objective in contrastive cross_entropy; do
      for peft in lora loha ia3; do
        for lr in 3e-4 1e-3 3e-3; do
          echo "$model-$peft-$objective-$lr $BASE model=$model peft=$peft objective=$objective train.lr=$lr train.epochs=$EPOCHS"
        done
      done
      if [ "$objective" = contrastive ]; then  # full fine-tuning: the body at SetFit's rates, the head at 1e-3
        echo "$model-none-contrastive $BASE model=$model peft=none objective=contrastive objective.body_lr=2e-5,5e-5 train.lr=1e-3 train.epochs=$FT_EPOCHS"
      else
        echo "$model-none-cross_entropy $BASE model=$model peft=none objective=cross_entropy train.lr=2e-5,5e-5 train.epochs=$FT_EPOCHS"
      fi
    done
  done
}

# Runs "<name> <overrides>" lines from stdin, JOBS at once, each on the next GPU; a failed sweep is reported
# (its log named) and the others go on. $1: the stage's folder; $2: -m for a sweep, or nothing for one run.
run_all() {
  local stage=$1 mode=${2:-} k=0 name args dir where
  while read -r name args; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    dir=$OUT/$stage/$name
    (
      [ ${#GPUS[@]} -gt 0 ] && export CUDA_VISIBLE_DEVICES=${GPUS[k % ${#GPUS[@]}]}
      if [ -n "$mode" ]; then where="hydra.sweep.dir=$dir"; else where="hydra.run.dir=$dir"; fi
      # shellcheck disable=SC2086
      if ! $PY run.py $mode $args "$where" >>"$OUT/logs/$stage-$name.log" 2>&1; then  # a re-run appends
        echo "$stage/$name failed: $OUT/logs/$stage-$name.log" >&2
      fi
    ) &
    k=$((k + 1))
  done
  wait
}

echo "stage 1: $(grid | wc -l) sweeps, $JOBS at once, GPUs: ${CUDA_VISIBLE_DEVICES:-none}"
grid | run_all stage1 -m
"$PY" -m peftlab.cli compare "$OUT/stage1" --sort accuracy --no-plots --out "$OUT/stage1_table" >"$OUT/stage1.txt"

# stage 2: the 8 best stage-1 settings again, on 3 repeats of the 5 folds
"$PY" - "$OUT" >"$OUT/stage2_settings.txt" <<'PY'
import sys
from pathlib import Path

from peftlab.rundir import find_runs, load_run

runs = [load_run(d) for d in find_runs([Path(sys.argv[1]) / "stage1"])]
done = [r for r in runs if r["status"] == "finished"]
print(f"{len(done)} of {len(runs)} stage-1 settings finished", file=sys.stderr)
key = lambda r: (-r["metrics"]["final"]["accuracy"], -r["metrics"]["final"]["macro_f1"], r["metrics"]["trainable_params"])
for k, r in enumerate(sorted(done, key=key)[:8]):  # named by rank and setting, e.g. 0-mpnet-lora-contrastive-0.001-30
    overrides = [o for o in r["overrides"] if not o.startswith("hydra")]
    name = "-".join([str(k)] + [o.split("=", 1)[1] for o in overrides if not o.startswith(("experiment=", "+"))])
    print(name.replace("/", "_"), " ".join(overrides))
PY
sed 's/$/ eval.fold_repeats=3/' "$OUT/stage2_settings.txt" | run_all stage2
"$PY" -m peftlab.cli compare "$OUT/stage2" --select --no-plots --out "$OUT/stage2_table" | tee "$OUT/stage2_select.txt"

# the test split, once, for the chosen setting
chosen=$(sed -n 's/^selected: .* | overrides: //p' "$OUT/stage2_select.txt")
echo "chosen $chosen eval.split=test seed=0,1,2" | run_all test -m
"$PY" -m peftlab.cli compare "$OUT/test" --no-plots --out "$OUT/test_table" >"$OUT/test.txt"
"$PY" -m peftlab.cli compare "$OUT/test" --mean-over seed --no-plots | tee -a "$OUT/test.txt"  # the protocol's figure
