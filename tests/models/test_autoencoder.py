"""fluxlab's FLUX autoencoder against diffusers' AutoencoderKL (the numerical oracle), on tiny
random models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fluxlab.models.autoencoder import (
    AE_PRESETS,
    AutoEncoder,
    AutoEncoderParams,
    Downsample,
    ae_params,
    kl_divergence,
)
from fluxlab.models.weights.autoencoder_diffusers import (
    detect_layout,
    diffusers_to_bfl_autoencoder,
    load_autoencoder_weights,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.downsampling import Downsample2D  # noqa: E402

SCALE, SHIFT = 0.3611, 0.1159
TINY = dict(
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
    mid_block_add_attention=True,
    sample_size=32,
)
# diffusers' config for black-forest-labs/FLUX.1-dev vae/config.json.
FLUX_VAE = dict(TINY, block_out_channels=[128, 256, 512, 512], sample_size=1024)
ATOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Default init leaves norms at 1/0; perturb them so a swapped norm weight or bias would show.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def oracle() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    _randomise(vae, seed=1)
    return vae


@pytest.fixture(scope="module")
def ours(oracle: AutoencoderKL) -> AutoEncoder:
    params = AutoEncoderParams(resolution=32, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=2)
    model = AutoEncoder(params).eval()
    model.load_state_dict(diffusers_to_bfl_autoencoder(oracle.state_dict()), strict=True)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


@torch.no_grad()
def test_moments_match_diffusers(
    oracle: AutoencoderKL, ours: AutoEncoder, images: torch.Tensor
) -> None:
    ref = oracle.encode(images).latent_dist
    mean, logvar = ours.encode_moments(images)
    assert mean.shape == (2, 16, 4, 4)
    assert (
        mean.std() > 0.1 and logvar.std() > 0.1
    )  # a tolerance check on near-constant tensors proves nothing
    torch.testing.assert_close(mean, ref.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, ref.logvar, atol=ATOL, rtol=0)
    torch.testing.assert_close(kl_divergence(mean, logvar), ref.kl(), atol=1e-3, rtol=1e-5)


@torch.no_grad()
def test_encode_is_scaled_posterior_mean(
    oracle: AutoencoderKL, ours: AutoEncoder, images: torch.Tensor
) -> None:
    ref = oracle.encode(images).latent_dist.mean
    torch.testing.assert_close(ours.encode(images), SCALE * (ref - SHIFT), atol=ATOL, rtol=0)


@torch.no_grad()
def test_decode_matches_diffusers(oracle: AutoencoderKL, ours: AutoEncoder) -> None:
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    ref = oracle.decode(z / SCALE + SHIFT).sample
    out = ours.decode(z)
    assert out.shape == (2, 3, 32, 32) and out.std() > 0.1
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_sample_draws_from_posterior_with_generator(
    ours: AutoEncoder, images: torch.Tensor
) -> None:
    a = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    b = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    mean, logvar = ours.encode_moments(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        a, SCALE * (mean + (0.5 * logvar).exp() * noise - SHIFT), atol=ATOL, rtol=0
    )
    assert not torch.allclose(a, ours.encode(images), atol=1e-3)


@pytest.mark.parametrize("size", [7, 8])
@torch.no_grad()
def test_downsample_pads_right_and_bottom_like_diffusers(size: int) -> None:
    ours = Downsample(32)
    asymmetric = Downsample2D(32, use_conv=True, padding=0)
    symmetric = Downsample2D(32, use_conv=True, padding=1)
    for ref in (asymmetric, symmetric):
        ref.conv.load_state_dict(ours.conv.state_dict())
    x = torch.randn(1, 32, size, size)
    torch.testing.assert_close(ours(x), asymmetric(x), atol=ATOL, rtol=0)
    # Symmetric padding samples different pixels; the FLUX weights would silently degrade with it.
    sym = symmetric(x)
    assert sym.shape != ours(x).shape or not torch.allclose(sym, ours(x), atol=1e-3)


def test_flux_preset_matches_diffusers_flux_vae() -> None:
    with torch.device("meta"):
        ours = AutoEncoder(ae_params("flux"))
        ref = AutoencoderKL(**FLUX_VAE)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert abs(n_ours - 83.8e6) < 0.1e6
    ours_sd = ours.state_dict()
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.block_2.norm2.bias",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
    ):
        assert key in ours_sd, key
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ours_sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ours_sd  # the finest level never upsamples
    assert "encoder.down.3.downsample.conv.weight" not in ours_sd
    converted = diffusers_to_bfl_autoencoder(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours_sd.items()
    }


def test_presets_build_and_copy() -> None:
    shapes = {
        "flux": (8, 16),
        "ae-small": (8, 16),
        "ae-debug": (8, 16),
        "ae-openmoji": (4, 16),
        "ae-openmoji-256": (8, 16),
        "ae-tiny": (2, 4),
    }
    for name in AE_PRESETS:
        params = ae_params(name)
        assert (params.downsample_factor, params.z_channels) == shapes[name], name
        with torch.device("meta"):
            AutoEncoder(params)
    small = ae_params("ae-small")
    small.ch_mult.append(4)
    assert len(AE_PRESETS["ae-small"].ch_mult) == 4
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        ae_params("sdxl")


@pytest.mark.parametrize(
    "bad",
    [
        dict(ch=48),
        dict(ch=32, ch_mult=[1, 1.5, 2]),
        dict(ch_mult=[]),
        dict(resolution=100),
        dict(scale_factor=0.0),
    ],
)
def test_bad_params_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        AutoEncoderParams(**bad)


def test_bad_inputs_raise() -> None:
    model = AutoEncoder(ae_params("ae-debug"))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 20, 32))
    with pytest.raises(ValueError, match="latents shaped"):
        model.decode(torch.zeros(1, 4, 4, 4))


@torch.no_grad()
def test_load_diffusers_folder(oracle: AutoencoderKL, images: torch.Tensor, tmp_path) -> None:
    oracle.save_pretrained(tmp_path / "pipe" / "vae")
    model = load_autoencoder_weights(
        tmp_path / "pipe"
    )  # a pipeline root resolves to its vae/ folder
    assert (
        model.params.ch == 32
        and model.params.ch_mult == [1, 1, 2, 2]
        and model.params.num_res_blocks == 2
    )
    assert (model.scale_factor, model.shift_factor) == (SCALE, SHIFT)
    assert not model.training
    ref = oracle.encode(images).latent_dist.mean
    torch.testing.assert_close(model.encode(images), SCALE * (ref - SHIFT), atol=ATOL, rtol=0)

    half = load_autoencoder_weights(tmp_path / "pipe" / "vae", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in half.parameters())


@torch.no_grad()
def test_load_bfl_file(ours: AutoEncoder, images: torch.Tensor, tmp_path) -> None:
    weights = {k: v.contiguous() for k, v in ours.state_dict().items()}
    plain, tagged, prefixed = (tmp_path / f"{n}.safetensors" for n in ("ae", "tagged", "full"))
    save_file(weights, plain)
    save_file(weights, tagged, metadata={"scale_factor": "0.5", "shift_factor": "0.25"})
    save_file({f"vae.{k}": v for k, v in weights.items()} | {"model.x": torch.zeros(1)}, prefixed)

    # Scale/shift are not in the tensors, so a non-FLUX architecture needs them from somewhere.
    with pytest.raises(ValueError, match="pass params="):
        load_autoencoder_weights(plain)
    loaded = load_autoencoder_weights(plain, params=ours.params)
    torch.testing.assert_close(loaded.encode(images), ours.encode(images), atol=0, rtol=0)
    assert (
        load_autoencoder_weights(tagged).scale_factor,
        load_autoencoder_weights(tagged).shift_factor,
    ) == (
        0.5,
        0.25,
    )
    from_prefixed = load_autoencoder_weights(prefixed, params=ours.params)
    torch.testing.assert_close(
        from_prefixed.decode(ours.encode(images)), ours(images), atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="do not fit"):
        load_autoencoder_weights(plain, params=ae_params("ae-debug"))


def test_quant_conv_is_rejected(tmp_path) -> None:
    sd_style = AutoencoderKL(**dict(TINY, use_quant_conv=True, use_post_quant_conv=True))
    with pytest.raises(ValueError, match="quant"):
        diffusers_to_bfl_autoencoder(sd_style.state_dict())
    sd_style.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_quant_conv"):
        load_autoencoder_weights(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_quant_conv"] is True


def test_legacy_attention_names_and_layout(oracle: AutoencoderKL, ours: AutoEncoder) -> None:
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in oracle.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    converted = diffusers_to_bfl_autoencoder(legacy)
    for key, value in ours.state_dict().items():
        assert torch.equal(converted[key], value), key
    assert detect_layout(legacy) == "diffusers" and detect_layout(converted) == "bfl"
    with pytest.raises(ValueError, match="unexpected key"):
        diffusers_to_bfl_autoencoder(
            legacy | {"encoder.mid_block.attentions.0.extra.weight": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="not an autoencoder"):
        detect_layout(["model.weight"])
