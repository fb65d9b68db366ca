"""The MLP's tanh-GELU and its row-wise fp8 quantisation in one pass, for fp8 sampling.

With torchao's dynamic row-wise activations, the input of each MLP's second linear (in a single
block [attention, GELU(MLP)], 15,360 wide in flux-dev) is reduced for its row maxima and then cast:
two passes, compiled by inductor as looped reductions at ~1.3 TB/s. Here one Triton program holds
a whole row: GELU, amax, scale and fp8 cast read it once. The result feeds ``torch._scaled_mm``
with torchao's fp8 weight, as torchao's own linear would. Off CUDA (or without Triton) the same
function runs in torch. ``fluxlab sample --fp8`` uses it: 0.0959 → 0.0890 s a flux-dev step on an
H100 (docs/performance.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlab.models.flux.layers import DoubleStreamBlock, SingleStreamBlock
from fluxlab.parallel.float8 import is_plain_weight

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale, not 0/0


def gelu_rows_to_fp8_reference(plain: Tensor | None, gated: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of [plain, tanh-GELU(gated)] in fp8 e4m3 and their fp32 scales [M, 1], the way
    torchao quantizes a row-wise dynamic activation (scale = amax / 448 in the input's dtype)."""
    act = F.gelu(gated, approximate="tanh")
    rows = act if plain is None else torch.cat((plain, act), dim=-1)
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    scale = (amax / FP8_MAX).float()
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@torch.library.custom_op("fluxlab::gelu_rows_to_fp8", mutates_args=())
def gelu_rows_to_fp8(plain: Tensor | None, gated: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`gelu_rows_to_fp8_reference` for 2-D inputs with unit column stride; one Triton pass
    on CUDA."""
    return gelu_rows_to_fp8_reference(plain, gated)


@gelu_rows_to_fp8.register_kernel("cuda")
def _gelu_rows_to_fp8_cuda(plain: Tensor | None, gated: Tensor) -> tuple[Tensor, Tensor]:
    kernel = _triton_kernel()
    if kernel is None:
        return gelu_rows_to_fp8_reference(plain, gated)
    if plain is not None and plain.stride(1) != 1:
        plain = plain.contiguous()
    if gated.stride(1) != 1:
        gated = gated.contiguous()
    rows, n_gated = gated.shape
    n_plain = 0 if plain is None else plain.shape[1]
    out = torch.empty(rows, n_plain + n_gated, dtype=FP8, device=gated.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gated.device)
    width = _next_power_of_2(n_plain + n_gated)
    kernel[(rows,)](
        plain if plain is not None else gated,
        gated,
        out,
        scale,
        plain.stride(0) if plain is not None else 0,
        gated.stride(0),
        out.stride(0),
        n_plain,
        n_gated,
        PLAIN_BLOCK=_next_power_of_2(max(n_plain, 1)),
        GATED_BLOCK=_next_power_of_2(n_gated),
        HAS_PLAIN=plain is not None,
        FP8_MAX_VALUE=FP8_MAX,
        AMAX_MIN=AMAX_FLOOR,
        num_warps=16 if width >= 8192 else 8 if width >= 2048 else 4,
    )
    return out, scale


@gelu_rows_to_fp8.register_fake
def _(plain: Tensor | None, gated: Tensor) -> tuple[Tensor, Tensor]:
    rows, n_gated = gated.shape
    n_plain = 0 if plain is None else plain.shape[1]
    return gated.new_empty(rows, n_plain + n_gated, dtype=FP8), gated.new_empty(
        rows, 1, dtype=torch.float32
    )


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _triton_kernel() -> Any:
    """The Triton kernel, built on first use (None without Triton: CPU-only installs)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def gelu_rows_to_fp8_kernel(
        plain_ptr,
        gated_ptr,
        out_ptr,
        scale_ptr,
        plain_stride,
        gated_stride,
        out_stride,
        n_plain,
        n_gated,
        PLAIN_BLOCK: tl.constexpr,
        GATED_BLOCK: tl.constexpr,
        HAS_PLAIN: tl.constexpr,
        FP8_MAX_VALUE: tl.constexpr,
        AMAX_MIN: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        g_cols = tl.arange(0, GATED_BLOCK)
        g_mask = g_cols < n_gated
        g_in = tl.load(gated_ptr + row * gated_stride + g_cols, mask=g_mask, other=0.0)
        g = g_in.to(tl.float32)
        # tanh-GELU as torch computes it, tanh(z) = 2·sigmoid(2z) − 1, rounded to the input dtype;
        # every downcast rounds to nearest even, as torch's do.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
        g = g.to(g_in.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        amax = tl.max(tl.abs(g), axis=0)
        if HAS_PLAIN:
            p_cols = tl.arange(0, PLAIN_BLOCK)
            p_mask = p_cols < n_plain
            p = tl.load(plain_ptr + row * plain_stride + p_cols, mask=p_mask, other=0.0)
            p = p.to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(p), axis=0))
        # The scale in the input's dtype, as torchao divides a bf16 amax by 448.
        scale = tl.maximum(amax, AMAX_MIN) / FP8_MAX_VALUE
        scale = scale.to(g_in.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(scale_ptr + row, scale)
        out_row = out_ptr + row * out_stride
        if HAS_PLAIN:
            p_q = tl.clamp(p / scale, -FP8_MAX_VALUE, FP8_MAX_VALUE)
            p_q = p_q.to(tl.float8e4nv, fp_downcast_rounding="rtne")
            tl.store(out_row + p_cols, p_q, mask=p_mask)
        g_q = tl.clamp(g / scale, -FP8_MAX_VALUE, FP8_MAX_VALUE)
        g_q = g_q.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(out_row + n_plain + g_cols, g_q, mask=g_mask)

    return gelu_rows_to_fp8_kernel


def rowwise_fp8_weight(layer: nn.Module) -> bool:
    """Whether ``layer`` holds torchao's fp8 weight with one scale per output row (what
    ``quantize_for_sampling`` makes), whose data and scales this module reads."""
    w = getattr(layer, "weight", None)
    if not isinstance(layer, nn.Linear) or w is None or is_plain_weight(w):
        return False
    data, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
    return (
        isinstance(data, Tensor)
        and data.dtype == FP8
        and isinstance(scale, Tensor)
        and tuple(scale.shape) == (w.shape[0], 1)
    )


def expose_fp8_weight(layer: nn.Linear) -> None:
    """Keeps views of ``layer``'s fp8 weight data [K, N] and scales [1, N] as non-persistent
    buffers (no copy; state-dict keys unchanged), so compiled forwards read plain tensors."""
    w = layer.weight
    layer.register_buffer("fp8_weight_t", w.qdata.t(), persistent=False)
    layer.register_buffer("fp8_scale_t", w.scale.t(), persistent=False)
    mm_config = getattr(w, "mm_config", None)
    layer.fp8_fast_accum = bool(getattr(mm_config, "use_fast_accum", True))


def fused(layer: nn.Module) -> bool:
    """Whether :func:`expose_fp8_weight` has prepared ``layer``."""
    return getattr(layer, "fp8_weight_t", None) is not None


def fp8_linear_of_gelu(layer: nn.Linear, plain: Tensor | None, gated: Tensor) -> Tensor:
    """``layer([plain, tanh-GELU(gated)])`` over the last dimension, with ``layer``'s row-wise fp8
    weight (:func:`expose_fp8_weight`) and the activation quantized in one pass."""
    lead = gated.shape[:-1]
    flat_plain = None if plain is None else plain.reshape(-1, plain.shape[-1])
    q, scale = gelu_rows_to_fp8(flat_plain, gated.reshape(-1, gated.shape[-1]))
    out = torch._scaled_mm(
        q,
        layer.fp8_weight_t,
        scale_a=scale,
        scale_b=layer.fp8_scale_t,
        bias=layer.bias,
        out_dtype=gated.dtype,
        use_fast_accum=layer.fp8_fast_accum,
    )
    return out.view(*lead, -1)


class FusedGeluFloat8MLP(nn.Sequential):
    """A double block's MLP (Linear → tanh-GELU → Linear) with the second linear's input
    quantized in the GELU's pass."""

    def forward(self, x: Tensor) -> Tensor:
        first, _, second = self
        if not fused(second):
            return super().forward(x)
        return fp8_linear_of_gelu(second, None, first(x))


class FusedGeluFloat8SingleStreamBlock(SingleStreamBlock):
    """``SingleStreamBlock`` with ``linear2``'s input, [attention, GELU(MLP)], quantized in one
    pass (no concatenation in memory either)."""

    def project_out(self, attn: Tensor, mlp: Tensor) -> Tensor:
        if not fused(self.linear2):
            return super().project_out(attn, mlp)
        return fp8_linear_of_gelu(self.linear2, attn, mlp)


def use_fused_fp8_gelu(model: nn.Module) -> nn.Module:
    """Swaps the one-pass GELU quantisation into every Flux block of ``model`` (by class, as the
    GEMM epilogues are); returns ``model``. Apply it after ``quantize_for_sampling`` and before
    compiling. Blocks whose layer has no row-wise fp8 weight keep their own forward."""
    for module in list(model.modules()):
        if type(module) is SingleStreamBlock and rowwise_fp8_weight(module.linear2):
            expose_fp8_weight(module.linear2)
            module.__class__ = FusedGeluFloat8SingleStreamBlock
        elif type(module) is DoubleStreamBlock:
            for mlp in (module.img_mlp, module.txt_mlp):
                if type(mlp) is nn.Sequential and rowwise_fp8_weight(mlp[2]):
                    expose_fp8_weight(mlp[2])
                    mlp.__class__ = FusedGeluFloat8MLP
    return model
