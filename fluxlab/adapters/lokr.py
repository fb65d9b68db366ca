"""LoKr adapters (LyCORIS' Kronecker adapters, peft's ``LoKrConfig``): factors, files, merging.

peft's LoKr layer on a Linear [out, in] holds ``lokr_w1`` [a, c] (or ``lokr_w1_a`` @ ``lokr_w1_b``
with ``decompose_both``) and ``lokr_w2`` [b, d] (or ``lokr_w2_a`` @ ``lokr_w2_b`` when the rank is
below half of w2's sides), out = a·b, in = c·d, and ΔW = alpha / r · kron(w1, w2). Checkpoints
name them ``<bfl module>.lokr_w1`` etc. (peft's ``.default`` dropped).

On disk (``bfl`` / ``kohya`` layouts) the keys are LyCORIS': ``diffusion_model.<bfl module>`` or
``lora_unet_<bfl module, dots as _>`` + ``.lokr_w1`` ...; the scale is baked into w1 (or w1_a)
and ``.alpha`` is the rank, so every reader (ComfyUI, LyCORIS) applies a scale of 1 whichever
factors are decomposed. diffusers' ``FluxPipeline.load_lora_weights`` reads no LoKr (0.42.1
reads it for FLUX.2 and Z-Image only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fluxlab.adapters import names

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_ALPHA = ".alpha"


@dataclass
class LokrFactors:
    """One adapted Linear: ΔW = scale · kron(w1, w2), each w given whole or as a product."""

    factors: dict[str, Tensor]  # keys from FACTORS
    scale: float

    def _w(self, side: str) -> Tensor:
        if side in self.factors:
            return self.factors[side].float()
        return self.factors[f"{side}_a"].float() @ self.factors[f"{side}_b"].float()

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the Linear this adapts."""
        (a, c), (b, d) = self._w("lokr_w1").shape, self._w("lokr_w2").shape
        return a * b, c * d

    @property
    def rank(self) -> int:
        """The rank of the decomposed factor (w2's, else w1's); 0 when neither is decomposed."""
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in self.factors:
                return int(self.factors[key].shape[0])
        return 0

    def delta(self) -> Tensor:
        """ΔW in float32."""
        return torch.kron(self._w("lokr_w1"), self._w("lokr_w2")) * self.scale


LokrWeights = dict[str, LokrFactors]


def is_lokr_key(key: str) -> bool:
    return any(f".{f}" in key for f in FACTORS)


def lokr_weights(state: dict[str, Tensor], scale: float) -> LokrWeights:
    """``LokrWeights`` of the LoKr factors in a checkpoint's ``state`` (peft's names accepted),
    each at ``scale`` = alpha / r."""
    out: LokrWeights = {}
    for key, value in state.items():
        key = key.replace(".default.", ".").removesuffix(".default")
        module, _, factor = key.rpartition(".")
        if factor in FACTORS:
            out.setdefault(module, LokrFactors({}, scale)).factors[factor] = value
    return out


def lokr_to_state_dict(lokr: LokrWeights, layout: str) -> dict[str, Tensor]:
    """LyCORIS keys under the ``bfl`` or ``kohya`` module names, the scale baked into w1."""
    if layout not in ("bfl", "kohya"):
        raise ValueError(
            f"a LoKr adapter exports as --format bfl or kohya (LyCORIS keys, read by ComfyUI and "
            f"kohya's tools), not {layout}: diffusers' FluxPipeline.load_lora_weights reads no "
            "LoKr; for diffusers, export the merged model with `fluxlab export transformer`"
        )
    out: dict[str, Tensor] = {}
    for bfl, f in lokr.items():
        key = f"diffusion_model.{bfl}" if layout == "bfl" else f"lora_unet_{names.to_kohya(bfl)}"
        first = "lokr_w1" if "lokr_w1" in f.factors else "lokr_w1_a"
        for name, t in f.factors.items():
            t = t.float() * f.scale if name == first else t
            out[f"{key}.{name}"] = t.contiguous().clone()
        rank = f.rank or 1  # with no decomposed factor every reader ignores alpha
        out[f"{key}{_ALPHA}"] = torch.tensor(float(rank), dtype=torch.float32)
    return out


def lokr_from_state_dict(sd: dict[str, Tensor]) -> LokrWeights:
    """``LokrWeights`` of a LyCORIS LoKr file in the ``bfl`` or ``kohya`` layout (as ComfyUI
    reads it: scale alpha / rank when a factor is decomposed, else 1)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        kohya = key.startswith("lora_unet_")
        key = key.removeprefix("lora_unet_").removeprefix("diffusion_model.")
        module, _, part = key.rpartition(".")
        if part not in FACTORS and part != "alpha":
            raise ValueError(f"{key!r} is not a LoKr tensor (lokr_w1[_a/_b], lokr_w2[_a/_b])")
        module = names.from_kohya(module) if kohya else module
        modules.setdefault(module, {})[part] = value
    out: LokrWeights = {}
    for module, parts in modules.items():
        names.to_diffusers(module)  # raises on a name that is not a Flux Linear
        alpha = parts.pop("alpha", None)
        for side in ("lokr_w1", "lokr_w2"):
            if side not in parts and not {f"{side}_a", f"{side}_b"} <= parts.keys():
                raise ValueError(f"the LoKr on {module} has no {side} (nor {side}_a and _b)")
        factors = LokrFactors(parts, 1.0)
        if alpha is not None and factors.rank:
            factors.scale = float(alpha.item()) / factors.rank
        out[module] = factors
    return out
