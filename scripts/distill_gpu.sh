#!/usr/bin/env bash
# Guidance distillation on one GPU (docs/distillation.md): an openmoji-gpu teacher, its one-pass
# student, and the comparison at w = 2, 4, 6. Each stage fits a 10-minute command:
#   bash scripts/distill_gpu.sh teacher1 teacher2 distill1 distill2 compare
set -euo pipefail
TEACHER=runs/openmoji-gpu
STUDENT=runs/openmoji-gpu-distilled
OUT=${COMPARE_OUT:-runs/distill-compare}
# The student starts as the teacher: a short warm-up, the teacher's lr scale, frequent grids.
DISTILL=(--teacher "$TEACHER" --optim.lr=2e-4 --optim.warmup_steps=100
         --train.sample_every=500 --train.checkpoint_every=500 --train.eval_every=500)
for stage in "$@"; do
  case "$stage" in
    teacher1) fluxlab train --config openmoji-gpu --train.max_minutes=5.5 ;;
    teacher2) fluxlab train --config openmoji-gpu --train.max_minutes=7 --resume ;;
    distill1) fluxlab distill "${DISTILL[@]}" --train.max_minutes=8 ;;
    distill2) fluxlab distill "${DISTILL[@]}" --train.max_minutes=8 --resume ;;
    compare)
      fluxlab compare-distill --teacher "$TEACHER" --student "$STUDENT" \
        --scale 2 --scale 4 --scale 6 --reference-split val --grid-rows 8 --out "$OUT"
      fluxlab plot --run "$STUDENT" --out "$OUT/loss.png" ;;
    *) echo "unknown stage $stage (teacher1 teacher2 distill1 distill2 compare)" >&2; exit 2 ;;
  esac
done
