"""The one-pass GELU + row-wise fp8 quantisation: torchao's numerics, the op's registration, a
fused fp8 Flux equal to torchao's own layers, and the Triton kernel on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from fp8_helpers import cpu_scaled_mm_takes_row_scales
from torch import nn

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import float8 as f8
from fluxlab.parallel import fp8_gelu as fg

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[quant]'")
from torchao.quantization.quant_primitives import (  # noqa: E402
    _choose_scale_float8,
    _quantize_affine_float8,
)


def tiny_flux() -> Flux:
    torch.manual_seed(0)
    params = flux_params("flux-debug", in_channels=48, context_in_dim=32, vec_in_dim=32)
    return Flux(params)  # default init: gates are not zero, every block acts


def flux_inputs(model: Flux, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen, p, b = torch.Generator().manual_seed(1), model.params, 2
    x = dict(
        img=torch.randn(b, 16, p.in_channels, generator=gen),
        img_ids=image_ids(b, 4, 4),
        txt=torch.randn(b, 5, p.context_in_dim, generator=gen),  # 42 rows: no multiple of 16
        txt_ids=text_ids(b, 5),
        timesteps=torch.rand(b, generator=gen),
        y=torch.randn(b, p.vec_in_dim, generator=gen),
    )
    return {k: v.to(device, torch.bfloat16) for k, v in x.items()}


def rows(m: int, n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(m, n, generator=gen)).to(torch.bfloat16)


@pytest.mark.parametrize("with_plain", [False, True])
def test_reference_quantizes_as_torchao_does(with_plain: bool) -> None:
    plain, gated = (rows(37, 48, 1) if with_plain else None), rows(37, 80, 2)
    q, scale = fg.gelu_rows_to_fp8_reference(plain, gated)
    act = torch.nn.functional.gelu(gated, approximate="tanh")
    full = act if plain is None else torch.cat((plain, act), dim=-1)
    want_scale = _choose_scale_float8(full, block_size=[1, full.shape[1]])
    want_q = _quantize_affine_float8(full, want_scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == full.shape and scale.shape == (37, 1)
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_an_all_zero_row_quantizes_to_zeros() -> None:
    gated = torch.zeros(2, 32, dtype=torch.bfloat16)
    q, scale = fg.gelu_rows_to_fp8_reference(None, gated)
    assert torch.isfinite(scale).all() and (q.float() == 0).all()


def test_custom_op_registration_passes_opcheck() -> None:
    torch.library.opcheck(fg.gelu_rows_to_fp8, (rows(5, 16, 1), rows(5, 32, 2)))
    torch.library.opcheck(fg.gelu_rows_to_fp8, (None, rows(5, 32, 2)))


def _quantized_pair(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> tuple[nn.Module, ...]:
    import torchao.quantization.quant_api as quant_api

    if device.type == "cpu":  # torchao refuses the CPU at quantize time; its kernel runs here
        monkeypatch.setattr(f8, "require_float8", lambda device, setting, instead: None)
        monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    ref = tiny_flux().to(device=device, dtype=torch.bfloat16).eval()
    f8.quantize_for_sampling(ref, device)
    fused = fg.use_fused_fp8_gelu(copy.deepcopy(ref))
    return ref, fused


@pytest.mark.skipif(
    not cpu_scaled_mm_takes_row_scales(),
    reason="this torch's CPU _scaled_mm takes per-tensor scales only (rowwise needs torch >= 2.13)",
)
def test_fused_blocks_compute_what_torchaos_layers_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, fused = _quantized_pair(monkeypatch, torch.device("cpu"))
    kinds = {type(m).__name__ for m in fused.modules()}
    assert {"FusedGeluFloat8SingleStreamBlock", "FusedGeluFloat8MLP"} <= kinds
    assert set(fused.state_dict()) == set(ref.state_dict())  # the exposed views are not saved
    x = flux_inputs(ref)
    with torch.no_grad():
        want, out = ref(**x).float(), fused(**x).float()
    assert torch.equal(out, want)  # the same quantisation and the same _scaled_mm calls


def test_blocks_without_fp8_weights_are_left_alone() -> None:
    model = fg.use_fused_fp8_gelu(tiny_flux())
    assert not any(type(m).__name__.startswith("FusedGelu") for m in model.modules())


NO_GPU = None if torch.cuda.is_available() else "needs a CUDA GPU (Triton kernel); none is visible"
if NO_GPU is None and f8.float8_unsupported(torch.device("cuda")):
    NO_GPU = f8.float8_unsupported(torch.device("cuda"))


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
@pytest.mark.parametrize(("n_plain", "n_gated"), [(0, 12288), (3072, 12288), (48, 80), (0, 1000)])
def test_triton_kernel_matches_the_reference(n_plain: int, n_gated: int) -> None:
    assert fg._triton_kernel() is not None, "Triton is missing on a CUDA machine"
    cuda = torch.device("cuda")
    plain = rows(333, n_plain, 1).to(cuda) if n_plain else None
    wide = rows(333, n_gated + 64, 2).to(cuda)
    gated = wide[:, 64:]  # a slice of a wider output, as the single block's MLP part is
    q, scale = fg.gelu_rows_to_fp8(plain, gated)
    want_q, want_scale = fg.gelu_rows_to_fp8_reference(plain, gated)
    torch.testing.assert_close(scale, want_scale, rtol=8e-3, atol=0)  # within a bf16 rounding
    same = (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean().item()
    assert same > 0.99, same
    # The rest sit one fp8 step apart (a bf16 GELU value rounded the other way): e4m3 codes of one
    # sign are ordered, so their magnitudes differ by one and their signs agree unless both are 0.
    got, want = q.view(torch.uint8).int(), want_q.view(torch.uint8).int()
    magnitude_gap = ((got & 0x7F) - (want & 0x7F)).abs()
    sign_flip = ((got ^ want) & 0x80).bool() & (((got | want) & 0x7F) != 0)
    assert magnitude_gap.max().item() <= 1 and not sign_flip.any().item()


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_fused_fp8_flux_on_gpu_matches_torchao_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, fused = _quantized_pair(monkeypatch, torch.device("cuda"))
    for block in [*fused.double_blocks, *fused.single_blocks]:
        block.forward = torch.compile(block.forward, fullgraph=True)
    x = flux_inputs(ref, "cuda")
    with torch.no_grad():
        want, out = ref(**x).float(), fused(**x).float()
    assert (out - want).norm() / want.norm() < 2e-2
