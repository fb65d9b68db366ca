#!/usr/bin/env bash
# The held-out LoRA experiment on one GPU (docs/lora.md, "Teaching held-out emoji with a LoRA"):
# an openmoji-gpu base trained without the 50 emoji of HELDOUT_50 (fluxlab/data/openmoji_select.py),
# a rank-32 LoRA that teaches those 50 from their images and names, the grid of the 50 before and
# after, and the loss curves. Run from the repository root; each stage fits a 10-minute command:
#   bash scripts/heldout_lora_gpu.sh                      # base lora grid plot
#   bash scripts/heldout_lora_gpu.sh base                 # or any stages, in order
#   bash scripts/heldout_lora_gpu.sh docs                 # copy the figures and timings to docs/img
# Every stage prints its wall time and appends "stage<TAB>seconds" to $OUT/timings.tsv.
# Environment: FLUXLAB (default `fluxlab`; e.g. "python -m fluxlab.cli"), HELDOUT_OUT (default
# runs/heldout-lora), TRAIN_FLAGS / SAMPLE_FLAGS (extra arguments, e.g. TRAIN_FLAGS=--overwrite).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a FLUXLAB <<< "${FLUXLAB:-fluxlab}"
read -r -a TRAIN_FLAGS <<< "${TRAIN_FLAGS:-}"
read -r -a SAMPLE_FLAGS <<< "${SAMPLE_FLAGS:-}"
BASE=runs/openmoji-gpu-heldout   # the presets' output folders
LORA=runs/openmoji-gpu-lora50
OUT=${HELDOUT_OUT:-runs/heldout-lora}
PROMPTS="$HERE/heldout50_prompts.txt"
# Emoji the base did train on: what the LoRA does to them (forgetting), same seeds.
SEEN=(--prompt "red heart" --prompt "grinning face" --prompt "red apple" --prompt "sun"
      --prompt "blue heart" --prompt "frog" --prompt "pile of poo" --prompt "green apple"
      --prompt "rabbit" --prompt "alarm clock")
mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then
  printf '# %s, %s\n' "$(date -u +%FT%TZ)" \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" >> "$OUT/timings.tsv"
fi
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then stages=(base lora grid plot); fi
for stage in "${stages[@]}"; do
  start=$(date +%s.%N)
  case "$stage" in
    base) "${FLUXLAB[@]}" train --config openmoji-gpu-heldout "${TRAIN_FLAGS[@]}" ;;
    lora) "${FLUXLAB[@]}" train --config openmoji-gpu-lora50 "${TRAIN_FLAGS[@]}" ;;
    grid)
      "${FLUXLAB[@]}" sample --checkpoint "$LORA" --before-after "$BASE" --prompts-file "$PROMPTS" \
        --seed 0 "${SAMPLE_FLAGS[@]}" --out "$OUT/heldout50-before-after.png"
      "${FLUXLAB[@]}" sample --checkpoint "$LORA" --before-after "$BASE" "${SEEN[@]}" \
        --seed 0 "${SAMPLE_FLAGS[@]}" --out "$OUT/seen-before-after.png" ;;
    plot)
      "${FLUXLAB[@]}" plot --run "$BASE" --out "$OUT/base-loss.png" \
        --title "openmoji-gpu-heldout (without the 50)"
      "${FLUXLAB[@]}" plot --run "$LORA" --out "$OUT/lora-loss.png" \
        --title "openmoji-gpu-lora50 (rank 32, the 50 only)" ;;
    docs)
      for name in heldout50-before-after seen-before-after base-loss lora-loss; do
        cp "$OUT/$name.png" "$HERE/../docs/img/heldout-lora-$name.png"
      done
      cp "$OUT/timings.tsv" "$HERE/../docs/img/heldout-lora-timings.tsv"
      cp "$BASE/log.jsonl" "$HERE/../docs/img/heldout-lora-base-log.jsonl"
      cp "$LORA/log.jsonl" "$HERE/../docs/img/heldout-lora-lora-log.jsonl" ;;
    *) echo "unknown stage $stage (base lora grid plot docs)" >&2; exit 2 ;;
  esac
  end=$(date +%s.%N)
  awk -v s="$stage" -v a="$start" -v b="$end" 'BEGIN { printf "%s\t%.1f\n", s, b - a }' \
    | tee -a "$OUT/timings.tsv"
done
