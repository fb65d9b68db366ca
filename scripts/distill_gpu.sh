#!/usr/bin/env bash
# Guidance distillation on one GPU (docs/distillation.md): an openmoji-gpu teacher, its one-pass
# student, and the comparison at w = 2, 4, 6. Each stage fits a 10-minute command:
#   bash scripts/distill_gpu.sh teacher1 teacher2 distill1 distill2 compare
# Environment: FLUXLAB (default `fluxlab`), TEACHER (a run to distill instead of training one),
# DISTILL_MINUTES (per distill stage, default 8), COMPARE_OUT. Each stage's wall time goes to
# $COMPARE_OUT/timings.tsv.
set -euo pipefail
read -r -a FLUXLAB <<< "${FLUXLAB:-fluxlab}"
TEACHER=${TEACHER:-runs/openmoji-gpu}
STUDENT=$TEACHER-distilled
OUT=${COMPARE_OUT:-runs/distill-compare}
MINUTES=${DISTILL_MINUTES:-8}
# The student starts as the teacher: a short warm-up, the teacher's lr scale, frequent grids.
DISTILL=(--teacher "$TEACHER" --optim.lr=2e-4 --optim.warmup_steps=100
         --train.sample_every=500 --train.checkpoint_every=500 --train.eval_every=500)
mkdir -p "$OUT"
for stage in "$@"; do
  start=$(date +%s.%N)
  case "$stage" in
    teacher1) "${FLUXLAB[@]}" train --config openmoji-gpu --train.max_minutes=5.5 ;;
    teacher2) "${FLUXLAB[@]}" train --config openmoji-gpu --train.max_minutes=7 --resume ;;
    distill1) "${FLUXLAB[@]}" distill "${DISTILL[@]}" --train.max_minutes="$MINUTES" ;;
    distill2) "${FLUXLAB[@]}" distill "${DISTILL[@]}" --train.max_minutes="$MINUTES" --resume ;;
    compare)
      "${FLUXLAB[@]}" compare-distill --teacher "$TEACHER" --student "$STUDENT" \
        --scale 2 --scale 4 --scale 6 --reference-split val --grid-rows 8 --out "$OUT"
      "${FLUXLAB[@]}" plot --run "$STUDENT" --out "$OUT/loss.png" ;;
    *) echo "unknown stage $stage (teacher1 teacher2 distill1 distill2 compare)" >&2; exit 2 ;;
  esac
  end=$(date +%s.%N)
  awk -v s="$stage" -v a="$start" -v b="$end" 'BEGIN { printf "%s\t%.1f\n", s, b - a }' \
    | tee -a "$OUT/timings.tsv"
done
