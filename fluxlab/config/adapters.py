"""The ``lora`` config section: low-rank (LoRA) or Kronecker (LoKr) adapters (peft) on a frozen
Flux, and its checks.

Module names are BFL's (``img_attn.qkv``, ``linear1``, ...): a target matches every module whose
name ends with it, in every block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Attention q/k/v and output projections of both streams, the MLPs, and the single blocks' fused
# projections: what diffusers' and kohya's FLUX LoRA scripts adapt by default.
DEFAULT_TARGETS = [
    "img_attn.qkv",
    "img_attn.proj",
    "txt_attn.qkv",
    "txt_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mlp.0",
    "txt_mlp.2",
    "linear1",
    "linear2",
]
# Further Linear layers a LoRA may adapt (adaLN modulations, embedders, the output layer).
OPTIONAL_TARGETS = [
    "img_mod.lin",
    "txt_mod.lin",
    "modulation.lin",
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
]

BASE_QUANTS = ("none", "int8", "float8", "nf4")
KINDS = ("lora", "lokr")


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = False  # train adapters on a frozen model.init_from instead of every weight
    # lora: ΔW = B·A; lokr: ΔW = kron(w1, w2) (LyCORIS' LoKr, peft's LoKrConfig), rank and alpha
    # then shape w2's (and with lokr_decompose_both w1's) low-rank factors.
    kind: Literal["lora", "lokr"] = "lora"
    rank: int = 16
    alpha: float | None = None  # the update is scaled by alpha / rank; None = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # The frozen base's storage; bfloat16 halves its memory and needs bf16 autocast.
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    # The frozen base's block Linears quantized (fluxlab/adapters/quantize.py): int8 (torchao,
    # weight-only), float8 (fp8 GEMMs forward and backward, SM >= 8.9), nf4 (bitsandbytes).
    base_quant: Literal["none", "int8", "float8", "nf4"] = "none"
    # LoKr only: w1's side of each dimension (peft's decompose_factor; -1 = near the square root),
    # and whether w1 is a low-rank product too (smaller, for large factors).
    lokr_factor: int = -1
    lokr_decompose_both: bool = False

    @property
    def scale(self) -> float:
        """The factor peft multiplies ``B·A`` by."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def validate(
        self, init_from: str | None, mixed_precision: str, arch: str, parallel_mode: str = "none"
    ) -> None:
        if not self.enabled:
            return
        if arch != "flux":
            raise ValueError("lora.enabled trains adapters on a Flux: set model.arch=flux")
        if not init_from:
            raise ValueError(
                "lora.enabled needs a base to adapt: set model.init_from to a fluxlab run, a "
                "diffusers FLUX folder or a BFL flux1-*.safetensors file"
            )
        if self.kind not in KINDS:
            raise ValueError(f"lora.kind={self.kind!r}: choose one of {list(KINDS)}")
        if self.kind == "lokr":
            self._validate_lokr()
        elif self.lokr_factor != -1 or self.lokr_decompose_both:
            raise ValueError(
                "lora.lokr_factor and lora.lokr_decompose_both shape LoKr adapters: set "
                "lora.kind=lokr, or leave them at -1 and false"
            )
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank} must be at least 1 (16 is usual)")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be positive, or null for the rank")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        known = DEFAULT_TARGETS + OPTIONAL_TARGETS
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={self.targets}: name BFL Linear modules, from {known}")
        if self.base_quant not in BASE_QUANTS:
            raise ValueError(
                f"lora.base_quant={self.base_quant!r}: choose one of {list(BASE_QUANTS)} "
                "(int8 needs torchao, nf4 bitsandbytes)"
            )
        if self.base_quant != "none" and parallel_mode in ("fsdp", "hsdp"):
            raise ValueError(
                f"lora.base_quant={self.base_quant}: FSDP does not shard quantized tensors; set "
                f"parallel.mode=ddp (each process holds the quantized base) or none (not "
                f"{parallel_mode}), or lora.base_quant=none"
            )
        if self.base_dtype == "bfloat16" and mixed_precision == "no":
            raise ValueError(
                "lora.base_dtype=bfloat16 needs bf16 autocast: set train.mixed_precision=bf16 "
                "(or auto on a GPU), or keep lora.base_dtype=float32"
            )

    def _validate_lokr(self) -> None:
        if self.lokr_factor != -1 and self.lokr_factor < 1:
            raise ValueError(
                f"lora.lokr_factor={self.lokr_factor} must be -1 (near the square root of each "
                "dimension) or a positive size for w1 (4 to 16 is usual)"
            )
