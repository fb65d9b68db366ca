"""Presets of the held-out LoRA experiment (docs/lora.md, scripts/heldout_lora_gpu.sh).

A base ``openmoji-gpu`` model is trained without the 50 emoji of ``HELDOUT_50``, then a LoRA
teaches those 50 from their images and names; both fit one GPU in under 20 minutes together.
"""

from __future__ import annotations

import copy
from typing import Any

from fluxlab.config.adapters import DEFAULT_TARGETS
from fluxlab.data.openmoji_select import HELDOUT_50

HELDOUT_BASE_RUN = "runs/openmoji-gpu-heldout"


def heldout_presets(openmoji_gpu: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``openmoji-gpu-heldout`` and ``openmoji-gpu-lora50``, built over ``openmoji-gpu``'s
    sections (passed in rather than imported: presets.py registers these)."""
    base = copy.deepcopy(openmoji_gpu)
    base["data"]["exclude"] = list(HELDOUT_50)
    # 8 of the 20 minutes: openmoji-gpu ran 5.5 steps/s on one H200 (docs/openmoji-gpu.md), so
    # ~2,600 steps, past the ~2,000 where its validation loss stopped falling.
    base["train"].update(output_dir=HELDOUT_BASE_RUN, max_minutes=8)

    lora = copy.deepcopy(openmoji_gpu)
    lora["model"]["init_from"] = HELDOUT_BASE_RUN
    # The text embedder and the pooled-text path carry the new names into the model, so they get
    # adapters beside the attention and MLP projections.
    targets = [*DEFAULT_TARGETS, "txt_in", "vector_in.in_layer", "vector_in.out_layer"]
    lora["lora"] = {"enabled": True, "rank": 32, "targets": targets}
    # Every one of the 50 trains (no val split); one batch is the whole set.
    lora["data"].update(include=list(HELDOUT_50), val_fraction=0.0, num_workers=2)
    lora["optim"].update(lr=1e-3, warmup_steps=100, batch_size=50, ema_decay=0.995)
    lora["train"].update(
        output_dir="runs/openmoji-gpu-lora50",
        max_minutes=4,
        sample_every=500,
        checkpoint_every=500,
        eval_every=0,
    )
    lora["sample"]["prompts"] = [HELDOUT_50[c] for c in list(HELDOUT_50)[::6]]
    return {"openmoji-gpu-heldout": base, "openmoji-gpu-lora50": lora}
