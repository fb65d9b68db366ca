"""encoding.autoencoder specs → AutoEncoder; a latent-space Flux trained and sampled end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.models.weights.autoencoder_spec import describe, load_autoencoder, save_autoencoder
from fluxlab.pipelines.build import load_for_sampling

LATENT = [
    "--encoding.space=latent",
    "--encoding.autoencoder=preset:ae-tiny",
    "--encoding.patch_size=2",
]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preset_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_autoencoder("preset:ae-tiny")
    assert torch.equal(torch.rand(3), expected)
    assert _same(a, load_autoencoder("preset:ae-tiny"))
    assert a.downsample_factor == 2 and a.params.z_channels == 4 and not a.training


def test_fluxlab_folder_round_trips_from_run_folder_ae_folder_and_file(tmp_path: Path) -> None:
    ae = load_autoencoder("preset:ae-tiny")
    ae.params.scale_factor, ae.params.shift_factor = 1.7, -0.2
    save_autoencoder(ae, tmp_path / "run" / "ae", extra={"psnr_val": 12.5})
    info = json.loads((tmp_path / "run" / "ae" / "ae.json").read_text())
    assert info["scale_factor"] == 1.7 and info["psnr_val"] == 12.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for spec in (
        tmp_path / "run",
        tmp_path / "run" / "ae",
        tmp_path / "run" / "ae" / "ae.safetensors",
    ):
        loaded = load_autoencoder(spec)
        assert _same(loaded, ae), spec
        assert (loaded.scale_factor, loaded.shift_factor) == (1.7, -0.2)
        torch.testing.assert_close(loaded.encode(x), ae.encode(x))
        assert describe(str(spec)).downsample_factor == 2


def test_bfl_single_file_with_scale_metadata(tmp_path: Path) -> None:
    ae = load_autoencoder("preset:ae-tiny")
    path = tmp_path / "ae.safetensors"
    save_file(ae.state_dict(), path, metadata={"scale_factor": "0.5", "shift_factor": "0.25"})
    loaded = load_autoencoder(path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert (loaded.scale_factor, loaded.shift_factor) == (0.5, 0.25)
    assert describe(str(path)).ch_mult == [1, 2]


def test_diffusers_flux_folder(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.6,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(tmp_path / "flux" / "vae")
    for spec in (tmp_path / "flux", tmp_path / "flux" / "vae"):
        ae = load_autoencoder(spec)
        assert (ae.scale_factor, ae.shift_factor) == (0.6, 0.1)
        assert describe(str(spec)).z_channels == 4
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(ae.encode(x), 0.6 * (ref - 0.1), atol=1e-5, rtol=1e-5)


def test_missing_or_unknown_autoencoder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        load_autoencoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_autoencoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        load_autoencoder("preset:nope")


def test_latent_config_validation() -> None:
    with pytest.raises(ValueError, match="encoding.autoencoder"):
        load_config("debug", ["--encoding.space=latent"])
    with pytest.raises(
        ValueError, match="not divisible by 8"
    ):  # 2× down × patch 4 does not divide 20
        load_config("debug", [*LATENT, "--encoding.patch_size=4", "--data.resolution=20"])
    with pytest.raises(ValueError, match="no such file"):
        load_config("debug", ["--encoding.space=latent", "--encoding.autoencoder=/does/not/exist"])
    load_config("debug", LATENT)


def test_latent_flux_trains_and_samples_through_the_autoencoder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fast = [
        "--train.tensorboard=false",
        "--data.limit=16",
        "--optim.batch_size=4",
        "--optim.steps=2",
        "--train.checkpoint_every=2",
        "--train.sample_every=2",
    ]
    assert main(["train", "--config", "debug", f"--train.output_dir={run}", *LATENT, *fast]) == 0
    desc = json.loads((run / "checkpoints" / "step_0000002" / "config.json").read_text())
    # ae-tiny: 16² → 8×8×4 latents, 2×2 patches → 16 tokens of 16 features
    assert desc["model_params"]["in_channels"] == 16
    assert (run / "samples" / "step_0000002.png").is_file()
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--prompt",
                "red heart",
                "--num",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _, pipe, _ = load_for_sampling(run, torch.device("cpu"))
    assert pipe.codec.downsample == 2 and pipe.latent_size == 8
    assert not any(p.requires_grad for p in pipe.codec.parameters())


def test_export_as_diffusers_folder_loads_in_diffusers_with_equal_outputs(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    source = tmp_path / "ae.safetensors"
    ae = load_autoencoder("preset:ae-tiny")
    # Non-trivial scale/shift, so a config that dropped them would fail below.
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(source), metadata={"scale_factor": "0.7", "shift_factor": "0.2"})
    args = ["export", "autoencoder", "--source", str(source), "--format", "diffusers"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").eval()
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.7, 0.2)
    ours = load_autoencoder(source)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(ours.encode(x), 0.7 * (mean - 0.2), atol=1e-5, rtol=1e-5)
        z = ours.encode(x)
        ref = vae.decode(z / 0.7 + 0.2).sample
        torch.testing.assert_close(ours.decode(z), ref, atol=1e-5, rtol=1e-5)
    # ... and fluxlab reads its own export back unchanged.
    assert _same(load_autoencoder(tmp_path / "out"), ours)


def test_export_autoencoder_refuses_a_bfl_path_without_safetensors_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "autoencoder", "--source", "preset:ae-tiny", "--format", "bfl"]
    assert main([*args, "--out", str(tmp_path / "ae")]) != 0
    assert "one .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "ae").exists()
