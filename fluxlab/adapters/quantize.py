"""A quantized frozen base for LoRA: the transformer blocks' Linear weights in int8, fp8 or NF4.

Only the Linears inside ``double_blocks`` and ``single_blocks`` are quantized (attention,
MLPs, the fused single-block projections and the adaLN modulations: 99.5% of FLUX.1-dev's
weights). The embedders (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``),
``final_layer`` and the QK-norm scales stay in ``lora.base_dtype``: they are 0.5% of the bytes,
and their error would reach every block (the input side) or the prediction itself (the output).
peft's ``lora_A``/``lora_B`` are never quantized: they train in float32.

peft wraps first, then each wrapped ``base_layer`` (and every other block Linear) is swapped for
a ``FrozenQuantLinear``: peft then dispatches its plain ``lora.Linear`` (it only calls
``base_layer(x)``), so its torchao/bnb special cases and their merge paths stay out of the way.
The frozen layer's backward is a custom autograd Function, ``grad @ dequantize(W)``: it works for
every format (torchao's fp8 GEMM path has no backward of its own) and saves no activation, since
a frozen weight needs none to pass the gradient on to its input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlab.config.adapters import BASE_QUANTS

_BLOCKS = ("double_blocks.", "single_blocks.")


class _FrozenLinearFunction(torch.autograd.Function):
    """y = layer(x) with a frozen quantized weight; dx = dy @ W, W dequantized on the fly."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: FrozenQuantLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer.compute(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        layer: FrozenQuantLinear = ctx.layer
        with torch.autocast(grad.device.type, enabled=False):
            w = layer.dequantized()
            return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None


class FrozenQuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized; subclasses say how it computes.

    The weight is a non-persistent buffer: not a parameter (no optimizer, histogram or gradient
    sees it) and not in ``state_dict`` (the base comes back from ``model.init_from``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype  # the compute dtype: lora.base_dtype
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return _FrozenLinearFunction.apply(x, self)

    def compute(self, x: Tensor) -> Tensor:
        """The forward in ``self.dtype``, autocast off (it would cast the packed weight)."""
        raise NotImplementedError

    def dequantized(self) -> Tensor:
        """The weight [out, in] in ``self.dtype``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}"


class TorchaoLinear(FrozenQuantLinear):
    """int8 or fp8 through a torchao tensor subclass (its own ``F.linear`` and ``dequantize``)."""

    def __init__(self, linear: nn.Linear, config: Any) -> None:
        super().__init__(linear)
        from torchao.quantization import quantize_  # optional (the quant extra)

        holder = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        holder.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        quantize_(holder, config)
        self.register_buffer("weight", holder.weight.detach(), persistent=False)

    def compute(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.dtype), self.weight, self.bias)

    def dequantized(self) -> Tensor:
        return self.weight.dequantize().to(self.dtype)


class NF4Linear(FrozenQuantLinear):
    """NF4 in blocks of 64 with double-quantized scales (QLoRA's), through bitsandbytes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        import bitsandbytes.functional as bnbf  # optional, imported only for nf4

        packed, self.quant_state = bnbf.quantize_4bit(
            linear.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        self.register_buffer("weight", packed, persistent=False)

    def compute(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        with torch.autocast(x.device.type, enabled=False):
            # The bias apart: bitsandbytes' one-row (GEMV) path mis-broadcasts it.
            y = bnb.matmul_4bit(x.to(self.dtype), self.weight.t(), self.quant_state)
            return y + self.bias if self.bias is not None else y

    def dequantized(self) -> Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight, self.quant_state).to(self.dtype)


def torchao_config(kind: str, device: torch.device) -> Any:
    """torchao's config for ``kind`` on ``device``; a ValueError naming the field when unusable."""
    try:
        from torchao import quantization as tq  # optional (the quant extra)
    except ImportError as err:
        raise ValueError(
            f"lora.base_quant={kind} needs torchao: pip install 'fluxlab[quant]' (or torchao)"
        ) from err
    if kind == "int8":  # weight-only: the memory halves, the GEMMs stay bf16
        return tq.Int8WeightOnlyConfig()
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                "lora.base_quant=float8 needs fp8 GEMMs (an Ada, Hopper or newer GPU, SM >= 8.9); "
                "use lora.base_quant=int8 or nf4 on this GPU"
            )
        # fp8 weights and per-row dynamically scaled fp8 activations: the GEMMs run in fp8.
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
    # Elsewhere fp8 is storage only (dequantized for a float GEMM): the same weights, for tests.
    return tq.Float8WeightOnlyConfig()


def quantizable(name: str, module: nn.Module) -> bool:
    """A block Linear of the base: not an embedder, the final layer or a LoRA adapter."""
    return (
        type(module) is nn.Linear
        and name.startswith(_BLOCKS)
        and ".lora_A." not in name
        and ".lora_B." not in name
    )


def quantize_base(model: nn.Module, kind: str, device: torch.device) -> int:
    """Swaps every block Linear of ``model`` (peft's ``base_layer`` included) for a frozen
    quantized one, in place; returns how many. Call after peft has injected its adapters."""
    if kind not in BASE_QUANTS:
        raise ValueError(f"lora.base_quant={kind!r}: choose one of {list(BASE_QUANTS)}")
    if kind == "none":
        return 0
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            f"lora.base_quant={kind} trains on one process (DDP and FSDP do not move quantized "
            "tensors): launch without torchrun, or set lora.base_quant=none"
        )
    make = _nf4_factory() if kind == "nf4" else _torchao_factory(kind, device)
    # Names, not modules: each full-precision Linear is freed as soon as it is swapped, so the
    # peak is the base plus one layer, not the base twice.
    names = [n for n, m in model.named_modules() if quantizable(n, m)]
    for name in names:
        if model.get_submodule(name).weight.requires_grad:
            raise ValueError(f"{name} is trainable: only a frozen base is quantized")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)


def _torchao_factory(kind: str, device: torch.device) -> Any:
    config = torchao_config(kind, device)
    return lambda linear: TorchaoLinear(linear, config)


def _nf4_factory() -> Any:
    try:
        import bitsandbytes  # noqa: F401  (optional: only nf4 needs it)
    except ImportError as err:
        raise ValueError(
            "lora.base_quant=nf4 needs bitsandbytes: pip install bitsandbytes (a CUDA GPU is its "
            "main target), or use lora.base_quant=int8 (torchao)"
        ) from err
    return NF4Linear


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the tensors of ``module`` occupy, counting a quantized weight by its packed data and
    scales (torchao subclasses through ``__tensor_flatten__``, bitsandbytes' quant state)."""
    total, seen = 0, set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    for m in module.modules():
        if isinstance(m, NF4Linear):
            total += _quant_state_bytes(m.quant_state)
    return total


def tensor_bytes(t: Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _quant_state_bytes(state: Any) -> int:
    parts = [state.absmax, state.code]
    if state.nested:
        parts += [state.state2.absmax, state.state2.code, state.offset]
    return sum(tensor_bytes(p) for p in parts if isinstance(p, Tensor))
