"""fp8 matmuls applied from outside the model: which layers, training (emulated on the CPU) that
tracks fp32, the order inside ``parallelize``, clear errors, and the real kernels on a GPU."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fp8_helpers import cpu_scaled_mm_takes_row_scales
from torch import Tensor, nn

from fluxlab.commands.sampling_options import apply_fp8
from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.config.loading import load_config
from fluxlab.config.sections import ParallelConfig
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import float8 as f8
from fluxlab.parallel import parallelize as par
from fluxlab.parallel.attention_kernels import for_training, training_attention, use_attention
from fluxlab.parallel.distributed import DistInfo
from fluxlab.parallel.epilogues import use_inference_epilogues

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[quant]'")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

CPU = torch.device("cpu")
BLOCK_LINEARS = {
    *(f"double_blocks.0.{s}_{p}" for s in ("img", "txt") for p in ("attn.qkv", "attn.proj")),
    *(f"double_blocks.0.{s}_mlp.{i}" for s in ("img", "txt") for i in (0, 2)),
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
}


def tiny_params(**overrides: object) -> FluxParams:
    return flux_params("flux-debug", in_channels=48, context_in_dim=32, vec_in_dim=32, **overrides)


def tiny_flux(seed: int = 0, **overrides: object) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny_params(**overrides))  # default init: gates are not zero, every block acts


def inputs(
    params: FluxParams, batch: int = 2, txt_len: int = 5, device: torch.device = CPU
) -> dict[str, Tensor]:
    # 4×4 image tokens and 5 text tokens: token counts that are no multiple of 16 (10 text rows,
    # 42 single-stream rows a batch), as real prompt lengths give.
    gen = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(batch, 16, params.in_channels, generator=gen).to(device),
        img_ids=image_ids(batch, 4, 4).to(device),
        txt=torch.randn(batch, txt_len, params.context_in_dim, generator=gen).to(device),
        txt_ids=text_ids(batch, txt_len).to(device),
        timesteps=torch.rand(batch, generator=gen).to(device),
        y=torch.randn(batch, params.vec_in_dim, generator=gen).to(device),
    )


def test_filter_keeps_embedders_modulations_and_final_layer_out_of_fp8() -> None:
    model = tiny_flux()
    assert set(f8.float8_layer_names(model)) == BLOCK_LINEARS
    # A width that is no multiple of 16 leaves no layer to convert: a clear error, not a crash.
    odd = tiny_flux(hidden_size=40, num_heads=2, axes_dim=[4, 8, 8])
    assert f8.float8_layer_names(odd) == []
    with pytest.raises(ValueError, match="parallel.float8=tensorwise.*multiples of 16"):
        f8.convert_to_float8_training(odd, "tensorwise", CPU, emulate=True)


def train_losses(model: nn.Module, steps: int = 6) -> list[float]:
    x = inputs(model.params)
    target = torch.randn(
        2, 16, model.params.in_channels, generator=torch.Generator().manual_seed(2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(**x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", f8.RECIPES)
def test_emulated_float8_training_tracks_fp32(recipe: str) -> None:
    ref = tiny_flux()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    f8.convert_to_float8_training(model, recipe, CPU, emulate=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == BLOCK_LINEARS
    assert list(model.state_dict()) == keys  # checkpoints keep the plain format
    ours, theirs = train_losses(model), train_losses(ref)
    assert ours[-1] < 0.9 * ours[0]  # it learns
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, rel=0.01)
    assert ours != theirs  # fp8 rounding really happened


def test_parallelize_converts_to_fp8_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_flux()
    cfg = ParallelConfig(float8="rowwise", compile=True, compile_backend="eager")
    with pytest.raises(ValueError, match=r"parallel.float8=rowwise .* on cpu.*parallel.float8=off"):
        par.parallelize(model, cfg, CPU, DistInfo())
    emulated = f8.convert_to_float8_training

    def convert(model: nn.Module, recipe: str, device: torch.device) -> nn.Module:
        # The compile wrapper must not exist yet: fp8 layers are swapped into the bare blocks.
        assert all("forward" not in vars(b) for b in par.blocks(model))
        return emulated(model, recipe, device, emulate=True)

    monkeypatch.setattr(par, "convert_to_float8_training", convert)
    net = par.parallelize(model, cfg, CPU, DistInfo())
    assert isinstance(model.single_blocks[0].linear1, Float8Linear)
    assert all("forward" in vars(b) for b in par.blocks(model))  # compiled afterwards
    out = net(**inputs(model.params))
    out.square().mean().backward()
    assert model.double_blocks[0].img_attn.qkv.weight.grad.abs().sum() > 0


def test_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parallel.float8"):
        load_config("debug", ["--parallel.float8=fp8"])
    base = tmp_path / "base.safetensors"  # init_from must exist before LoRA is checked
    base.touch()
    with pytest.raises(ValueError, match="parallel.float8=tensorwise.*lora.enabled"):
        load_config(
            "debug",
            ["--parallel.float8=tensorwise", "--lora.enabled=true", f"--model.init_from={base}"],
        )
    with pytest.raises(ValueError, match=r"--fp8 .* on cpu"):
        f8.quantize_for_sampling(tiny_flux(), CPU)


@pytest.mark.skipif(
    not cpu_scaled_mm_takes_row_scales(),
    reason="this torch's CPU _scaled_mm takes per-tensor scales only (rowwise needs torch >= 2.13)",
)
def test_fp8_sampling_layers_run_torchaos_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchao refuses the CPU at quantize time, but its torch kernel (torch._scaled_mm) runs here:
    # with both device checks lifted, the real quantized layers are exercised.
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(f8, "require_float8", lambda device, setting, instead: None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    ref = tiny_flux().to(torch.bfloat16)
    model = copy.deepcopy(ref)
    f8.quantize_for_sampling(model, CPU)
    use_inference_epilogues(model)  # the sampling pipeline's swap must step aside, not break
    quantized = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not f8.is_plain_weight(m.weight)
    }
    assert quantized == BLOCK_LINEARS
    assert f8.is_plain_weight(model.final_layer.linear.weight)
    x = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in inputs(ref.params).items()
    }
    with torch.no_grad():
        out, want = model(**x).float(), ref(**x).float()
    err = (out - want).norm() / want.norm()
    assert 1e-3 < err < 0.1, err  # fp8 rounding, not a different function


def gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU of compute capability 8.9+ (fp8 matmuls); none is visible"
    return f8.float8_unsupported(torch.device("cuda"))


@pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))
@pytest.mark.parametrize("recipe", f8.RECIPES)
def test_float8_training_on_gpu_matches_bf16(recipe: str) -> None:
    cuda = torch.device("cuda")
    params = dataclasses.replace(
        flux_params("flux-small"), in_channels=48, context_in_dim=384, vec_in_dim=384
    )
    torch.manual_seed(0)
    ref = Flux(params).to(cuda)
    model = copy.deepcopy(ref)
    f8.convert_to_float8_training(model, recipe, cuda)
    model = par.wrap_blocks(model, ParallelConfig(compile=True))
    # 13 text tokens: the weight-gradient matmuls of the text stream need their padding.
    x = inputs(params, batch=4, txt_len=13, device=cuda)
    grads = []
    for net in (ref, model):
        # The trainer's attention kernels: SDPA's own pick (cuDNN) has crashed Flux backwards.
        use_attention(net, training_attention(cuda))
        with for_training(cuda), torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(**x).float()
            out.square().mean().backward()
        grads.append((out.detach(), net.single_blocks[3].linear1.weight.grad))
    (want, g_ref), (out, g) = grads
    assert (out - want).norm() / want.norm() < 0.08
    assert (g - g_ref).norm() / g_ref.norm() < 0.15


@pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))
def test_fp8_sampling_on_gpu_matches_bf16() -> None:
    cuda = torch.device("cuda")
    params = dataclasses.replace(
        flux_params("flux-small"), in_channels=48, context_in_dim=384, vec_in_dim=384
    )
    torch.manual_seed(0)
    ref = Flux(params).to(cuda).eval()
    model = copy.deepcopy(ref)
    apply_fp8(model, cuda, enabled=True)  # what --fp8 does: quantize, compile the blocks
    use_inference_epilogues(model)
    x = inputs(params, batch=2, txt_len=13, device=cuda)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out: Tensor = model(**x).float()
        want: Tensor = ref(**x).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - want).norm() / want.norm() < 0.08
