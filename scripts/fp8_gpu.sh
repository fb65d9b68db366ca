#!/usr/bin/env bash
# fp8 on one GPU of compute capability 8.9+ (issue #22; docs/performance.md, "fp8"). Each stage fits
# a 10-minute command; run them in order, e.g.:
#   bash scripts/fp8_gpu.sh tests bench-train | bench-infer | bench-infer-fp8 | bench-infer-peer
#   bash scripts/fp8_gpu.sh bench-infer-mslk      # needs offline_bundle.sh's mslk part (MSLK=1)
#   bash scripts/fp8_gpu.sh train-bf16 train-fp8 compare-loss teacher fid-bf16 fid-fp8 compare-fid
# On one H100 (docs/performance.md, "CUDA graphs and tuning for fp8 sampling") the peers' fp8 recipe
# (diffusers-fp8:full, torchao's inductor settings) compiled for 346 s and fluxlab's tuned fp8 blocks
# for 39 s: hence one stage each, each with its own diffusers eager baseline (ratios within a process).
# `bench` runs bench-train's and bench-infer's cases in one process (the "same run" of the
# acceptance) where a command may take ~15 minutes. Needs: pip install -e '.[test,quant]'.
set -euo pipefail
OUT=${FP8_OUT:-runs/fp8}
mkdir -p "$OUT"
# Training: diffusers eager (the 1.00× line) and compiled, fluxlab bf16, fluxlab fp8 both recipes.
TRAIN_CASES=diffusers:autocast:eager,diffusers:autocast:full,fluxlab:master:block,fluxlab:master:full
TRAIN_CASES+=,fluxlab-fp8:master:block,fluxlab-fp8:master:full,fluxlab-fp8-rowwise:master:block
# Sampling: diffusers eager, compiled, compiled + torchao fp8 (the peers' recipe), fluxlab bf16/fp8.
# fp8 cases come last in each list: torchao patches inductor's min/max codegen process-wide (a
# numerically identical Triton workaround), so the bf16 cases run before it.
# fluxlab's cases sample with the pipeline's attention (FA4 where installed); +cudagraph replays each
# step as one CUDA graph, as fluxlab sample does; +tune adds inductor's coordinate-descent tuning;
# fluxlab-fp8 samples as fluxlab sample --fp8 (each MLP's GELU quantized in one Triton pass,
# parallel/fp8_gelu.py); fluxlab-fp8-unfused leaves that to inductor.
INFER_CASES=diffusers:eager,diffusers:full,fluxlab:block,fluxlab:block+cudagraph
FP8_INFER_CASES=diffusers:eager,fluxlab-fp8:block,fluxlab-fp8:block+cudagraph
FP8_INFER_CASES+=,fluxlab-fp8:block+tune+cudagraph,fluxlab-fp8-unfused:block+tune+cudagraph
PEER_CASES=diffusers:eager,diffusers-fp8:full
# The same fp8 sampling with torchao's MSLK GEMMs (offline_bundle.sh MSLK=1 unpacks them in /tmp/mslk;
# torchao's KernelPreference.AUTO takes them over cuBLAS once importable).
MSLK_CASES=diffusers:eager,fluxlab-fp8:block+tune+cudagraph
# The 300-step loss comparison: openmoji-gpu from scratch, every step logged, compiled blocks.
SHORT=(--config openmoji-gpu --optim.steps=300 --train.log_every=1 --train.sample_every=1000
       --train.eval_every=0 --train.checkpoint_every=300 --parallel.compile=true)
# The FID comparison: a fully trained openmoji-gpu, sampled at the same seeds in bf16 and fp8.
TEACHER=runs/openmoji-gpu
EVAL=(--checkpoint "$TEACHER" --reference-dataset openmoji --reference-split val --seed 0
      --kid-subset-size 100)
STAGES=" tests bench bench-train bench-infer bench-infer-fp8 bench-infer-peer bench-infer-mslk "
STAGES+="profile-fp8 "
STAGES+="train-bf16 train-fp8 train-fp8-rowwise compare-loss teacher fid-bf16 fid-fp8 compare-fid "
for stage in "$@"; do  # a typo in the last stage should not cost the minutes of the first ones
  if [[ "$STAGES" != *" $stage "* ]]; then echo "unknown stage $stage ($STAGES)" >&2; exit 2; fi
done
for stage in "$@"; do
  case "$stage" in
    tests)
      python -m pytest -p no:cacheprovider -q -rs tests/parallel/test_float8.py \
        tests/parallel/test_fp8_gelu.py tests/parallel/test_cuda_graphs.py ;;
    bench)
      fluxlab bench --what train,infer --train-cases "$TRAIN_CASES" \
        --infer-cases "$INFER_CASES,${FP8_INFER_CASES#diffusers:eager,},${PEER_CASES#diffusers:eager,}" \
        --json "$OUT/bench.json" ;;
    bench-train) fluxlab bench --what train --train-cases "$TRAIN_CASES" --json "$OUT/train.json" ;;
    bench-infer) fluxlab bench --what infer --infer-cases "$INFER_CASES" --json "$OUT/infer.json" ;;
    bench-infer-fp8)
      fluxlab bench --what infer --infer-cases "$FP8_INFER_CASES" --json "$OUT/infer-fp8.json" ;;
    bench-infer-peer)
      fluxlab bench --what infer --infer-cases "$PEER_CASES" --json "$OUT/infer-peer.json" ;;
    bench-infer-mslk)
      PYTHONPATH=/tmp/mslk${PYTHONPATH:+:$PYTHONPATH} fluxlab bench --what infer \
        --infer-cases "$MSLK_CASES" --json "$OUT/infer-mslk.json" ;;
    profile-fp8)
      fluxlab bench --impls fluxlab-fp8 --what train --train-cases fluxlab-fp8:master:block \
        --profile --profile-rows 40 ;;
    train-bf16) fluxlab train "${SHORT[@]}" --train.output_dir="$OUT/loss-bf16" --overwrite ;;
    train-fp8)
      fluxlab train "${SHORT[@]}" --parallel.float8=tensorwise \
        --train.output_dir="$OUT/loss-fp8" --overwrite ;;
    train-fp8-rowwise)
      fluxlab train "${SHORT[@]}" --parallel.float8=rowwise \
        --train.output_dir="$OUT/loss-fp8-rowwise" --overwrite ;;
    compare-loss)
      python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

out = Path(sys.argv[1])
ref = losses(out / "loss-bf16")
for name in ("loss-fp8", "loss-fp8-rowwise"):
    if not (out / name / "log.jsonl").exists():
        continue
    ours = losses(out / name)
    steps = sorted(set(ref) & set(ours))
    rel = [ours[s] / ref[s] - 1 for s in steps]
    mean_ref = sum(ref[s] for s in steps) / len(steps)
    mean_ours = sum(ours[s] for s in steps) / len(steps)
    print(f"{name}: {len(steps)} steps, mean loss {mean_ours:.5f} vs bf16 {mean_ref:.5f} "
          f"({mean_ours / mean_ref - 1:+.2%}), mean |per-step difference| "
          f"{sum(map(abs, rel)) / len(rel):.2%}, last step {ours[steps[-1]]:.5f} vs "
          f"{ref[steps[-1]]:.5f}")
EOF
      runs=(--run "$OUT/loss-bf16")
      for name in loss-fp8 loss-fp8-rowwise; do
        if [ -f "$OUT/$name/log.jsonl" ]; then runs+=(--run "$OUT/$name"); fi
      done
      fluxlab plot "${runs[@]}" --title "first 300 steps, bf16 vs fp8" --out "$OUT/loss-compare.png" ;;
    # A trained openmoji-gpu in one command: compiled blocks (2.8× the eager steps/s of this model
    # size, docs/openmoji-256.md), so 6 minutes give more steps than the preset's eager 12.5.
    teacher) fluxlab train --config openmoji-gpu --train.max_minutes=6 --parallel.compile=true ;;
    fid-bf16) fluxlab eval "${EVAL[@]}" --json "$OUT/fid-bf16.json" --grid "$OUT/fid-bf16.png" ;;
    fid-fp8)
      fluxlab eval "${EVAL[@]}" --fp8 --json "$OUT/fid-fp8.json" --grid "$OUT/fid-fp8.png" ;;
    compare-fid)
      python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
bf16, fp8 = (json.loads((out / f"fid-{k}.json").read_text()) for k in ("bf16", "fp8"))
print(f"FID bf16 {bf16['fid']:.3f}, fp8 {fp8['fid']:.3f} ({fp8['fid'] / bf16['fid'] - 1:+.2%}); "
      f"KID bf16 {bf16.get('kid')}, fp8 {fp8.get('kid')}")
EOF
      ;;
  esac
done
