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
The frozen layer's backward is a custom autograd Function that passes the gradient on to the
input only (a frozen weight needs no activation saved): ``grad @ dequantize(W)`` for int8 and NF4,
and for fp8 a second fp8 GEMM (``Float8Linear``), so all three GEMMs of a checkpointed step
(forward, recompute, backward) run at fp8 speed; torchao's fp8 inference tensors have no backward.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

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
        with torch.autocast(grad.device.type, enabled=False):
            return ctx.layer.input_grad(grad).to(ctx.x_dtype), None


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

    def input_grad(self, grad: Tensor) -> Tensor:
        """dL/dx = dL/dy @ W, autocast off."""
        w = self.dequantized()
        return grad.to(w.dtype) @ w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}"


class TorchaoLinear(FrozenQuantLinear):
    """int8 through a torchao tensor subclass (its own ``F.linear`` and ``dequantize``)."""

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


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _rowwise_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] as e4m3 with one float32 scale per row (x ≈ q · scale), the largest |x| → 448."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(FrozenQuantLinear):
    """fp8 e4m3 weights with one scale per output row; both passes are fp8 GEMMs
    (``torch._scaled_mm``) on per-row dynamically scaled activations and output gradients.

    The backward folds the weight's row scales into the gradient (they lie along its reduced
    dimension, where ``_scaled_mm`` takes no scale): dx = (dy · s_w) @ W_q. Layers whose sizes
    ``_scaled_mm`` refuses (not multiples of 16) compute with the dequantized weight instead.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight, scale = _rowwise_e4m3(linear.weight.detach())
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out]
        self.fp8_gemm = self.in_features % 16 == 0 and self.out_features % 16 == 0

    def compute(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if not self.fp8_gemm:
                return F.linear(x.to(self.dtype), self.dequantized(), self.bias)
            return self._fp8_linear(x)

    def _fp8_linear(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = _rowwise_e4m3(rows)
        # Rowwise-scaled fp8 GEMMs write bf16 (the only output type cuBLAS offers for them). Fast
        # accumulation in the forward only, as torchao's float8 training recipe has it.
        y = torch._scaled_mm(
            q,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        ).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def input_grad(self, grad: Tensor) -> Tensor:
        if not self.fp8_gemm:
            return super().input_grad(grad)
        q, scale = _rowwise_e4m3(grad.reshape(-1, self.out_features).float() * self.weight_scale)
        # _scaled_mm wants its second operand column-major: a transposed copy, 1 byte an element.
        weight_cols = self.weight.t().contiguous().t()
        ones = self.weight_scale.new_ones(1, self.in_features)
        dx = torch._scaled_mm(
            q, weight_cols, scale_a=scale, scale_b=ones, out_dtype=torch.bfloat16
        ).to(self.dtype)
        return dx.reshape(*grad.shape[:-1], self.in_features)

    def dequantized(self) -> Tensor:
        return (self.weight.float() * self.weight_scale.t()).to(self.dtype)


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


def int8_config() -> Any:
    """torchao's int8 weight-only config; a ValueError naming the field when torchao is missing."""
    try:
        from torchao import quantization as tq  # optional (the quant extra)
    except ImportError as err:
        raise ValueError(
            "lora.base_quant=int8 needs torchao: pip install 'fluxlab[quant]' (or torchao)"
        ) from err
    return tq.Int8WeightOnlyConfig()  # the memory halves, the GEMMs stay bf16


@cache
def cpu_rowwise_fp8_gemm() -> bool:
    """Whether this PyTorch's CPU ``_scaled_mm`` takes per-row scales (2.13 does, 2.11 does not)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


def check_float8_device(device: torch.device) -> None:
    """fp8 GEMMs run on SM >= 8.9 GPUs and on CPUs (PyTorch's reference kernel, for tests)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            "lora.base_quant=float8 needs fp8 GEMMs (an Ada, Hopper or newer GPU, SM >= 8.9); "
            "use lora.base_quant=int8 or nf4 on this GPU"
        )
    if device.type == "cpu" and not cpu_rowwise_fp8_gemm():
        raise ValueError(
            f"lora.base_quant=float8 on the CPU needs per-row scaled fp8 GEMMs, which torch "
            f"{torch.__version__} lacks there (2.13 has them); use lora.base_quant=int8, or a GPU"
        )


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
    if kind == "nf4":
        make = _nf4_factory()
    elif kind == "float8":
        check_float8_device(device)
        make = Float8Linear
    else:
        make = partial(TorchaoLinear, config=int8_config())
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
    # Every DDP rank quantizes the same base itself: DDP need not (and for fp8 or packed tensors
    # cannot) broadcast these buffers from rank 0.
    frozen = [f"{n}.{b}" for n in names for b, _ in model.get_submodule(n).named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return len(names)


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
