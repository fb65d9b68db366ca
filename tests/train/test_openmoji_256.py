"""The 256² presets (docs/openmoji-256.md) on a CPU: their token geometry as configured, and their
whole path at toy size (train-ae → cache → latent train → sample; the pixel preset a few steps)."""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxlab.cli import main
from fluxlab.conditioning.tokens import pack
from fluxlab.config.autoencoder import ae_params_from_config, load_ae_config
from fluxlab.config.loading import load_config
from fluxlab.config.presets import AE_TRAIN_PRESETS, PRESETS
from fluxlab.config.presets_256 import PRESETS_256
from fluxlab.pipelines.build import build_codec, token_dim

# Few emoji, one or two held out, no loader workers, no TensorBoard; the preset's time limits stay.
SMALL = [
    "--data.limit=24",
    "--data.val_fraction=0.25",
    "--data.num_workers=0",
    "--train.tensorboard=false",
    "--train.threads=1",
]
# The latent path at 64² (8×8×16 latents, 16 tokens): an autoencoder at 256² costs seconds per step
# here. Its depth (8× down) and 16 channels stay; only the widths shrink.
TOY_AE = [*SMALL, "--data.resolution=64", "--ae.ch=32", "--ae.ch_mult=[1,1,1,1]"]
# flux-debug for a few steps, sampled with 2 Euler steps; val loss on one held-out image (8 fixed t
# each: the whole split at 1024 tokens would cost seconds) and a grid at the last step.
TOY_FLUX = [
    "--model.preset=flux-debug",
    "--optim.batch_size=4",
    "--optim.steps=2",
    "--optim.warmup_steps=0",
    "--train.device=cpu",
    "--train.log_every=1",
    "--train.sample_every=2",
    "--train.checkpoint_every=2",
    "--train.eval_every=2",
    "--data.val_limit=1",
    "--sample.steps=2",
    "--sample.prompts=[red heart, frog]",
    "--parallel.compile_backend=aot_eager",  # the presets compile their blocks; no C compiler here
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy models: thread hand-offs cost more than the arithmetic
    yield
    torch.set_num_threads(threads)


def test_presets_have_fluxs_token_geometry() -> None:
    ae_cfg = load_ae_config("ae-openmoji-256")
    params = ae_params_from_config(ae_cfg)
    assert (ae_cfg.data.resolution, params.downsample_factor, params.z_channels) == (256, 8, 16)
    image = torch.zeros(1, 3, 256, 256)
    # The latent preset with that architecture (random weights stand in for the trained run).
    latent = load_config("openmoji-256-gpu", ["--encoding.autoencoder=preset:ae-openmoji-256"])
    codec = build_codec(latent)
    with torch.no_grad():
        z = codec.encode(image)
    assert tuple(z.shape) == (1, 16, 32, 32)
    tokens = pack(z, latent.encoding.patch_size)
    assert tuple(tokens.shape) == (1, 256, 64) and token_dim(codec, latent) == 64
    pixel = load_config("openmoji-256-pixel-gpu")
    tokens = pack(build_codec(pixel).encode(image), pixel.encoding.patch_size)
    assert tuple(tokens.shape) == (1, 1024, 192) and pixel.data.resolution == 256
    # Equal GPU time for the two transformers, the same model; every stage is time-bound.
    assert latent.train.max_minutes == pixel.train.max_minutes is not None
    assert latent.model.preset == pixel.model.preset
    assert latent.parallel.compile and pixel.parallel.compile  # launch-bound eager on a GPU
    assert ae_cfg.ae.max_minutes is not None
    # Registered where `fluxlab train` / `train-ae` look them up, under their own names.
    assert PRESETS_256.items() <= PRESETS.items() and "ae-openmoji-256" in AE_TRAIN_PRESETS


def test_latent_path_at_toy_size(tmp_path: Path) -> None:
    ae = tmp_path / "ae"
    steps = ["--ae.steps=2", "--ae.batch_size=4", "--ae.val_images=4", "--ae.stats_images=8"]
    args = ["train-ae", "--config", "ae-openmoji-256", f"--train.output_dir={ae}", *TOY_AE]
    assert main([*args, *steps, "--ae.eval_every=1", "--train.checkpoint_every=2"]) == 0
    metrics = json.loads((ae / "metrics.json").read_text())
    assert (metrics["downsample_factor"], metrics["z_channels"], metrics["step"]) == (8, 16, 2)
    assert math.isfinite(metrics["psnr_val"]) and metrics["scale_factor"] > 0
    assert (ae / "samples" / "recon_final.png").is_file()
    assert (ae / "samples" / "recon_step_0000001.png").is_file()

    run = tmp_path / "run"
    latent = [
        *SMALL,
        "--data.resolution=64",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--encoding.autoencoder={ae}",
        "--cache.batch_size=8",
        "--cache.shard_size=8",
        f"--train.output_dir={run}",
        *TOY_FLUX,
    ]
    assert main(["cache", "--config", "openmoji-256-gpu", "--device=cpu", *latent]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] and (tmp_path / "cache" / "train" / "64x64").is_dir()
    assert main(["train", "--config", "openmoji-256-gpu", *latent]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("val_loss" in r for r in records)
    config = json.loads((run / "config.json").read_text())
    assert config["encoding"]["autoencoder"] == str(ae) and config["objective"]["shift"] is True

    out = tmp_path / "grid.png"
    sample = ["sample", "--checkpoint", str(run), "--prompt", "red heart", "--prompt", "frog"]
    assert main([*sample, "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    with Image.open(out) as grid:  # decoded through the trained autoencoder, at 64²
        assert grid.width >= 2 * 64 and grid.height >= 64


def test_pixel_preset_trains_at_256(tmp_path: Path) -> None:
    run = tmp_path / "pixel"
    # From its own pixel cache, as configured (float32: the rendered pixels exactly)
    cache = [f"--data.cache_dir={tmp_path / 'cache'}", "--cache.batch_size=8"]
    writer = ["cache", "--config", "openmoji-256-pixel-gpu", "--device=cpu"]
    assert main([*writer, *SMALL, *cache]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] and (tmp_path / "cache" / "train" / "256x256").is_dir()
    args = ["train", "--config", "openmoji-256-pixel-gpu", f"--train.output_dir={run}", *cache]
    assert main([*args, *SMALL, *TOY_FLUX, "--optim.batch_size=2"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any("val_loss" in r for r in records)
    with Image.open(run / "samples" / "step_0000002.png") as grid:  # 1024 tokens → 256² images
        assert grid.width >= 2 * 256 and grid.height >= 256


@pytest.mark.parametrize("name", ["openmoji-256-gpu", "openmoji-256-pixel-gpu"])
def test_presets_refuse_a_resolution_the_patches_do_not_divide(name: str) -> None:
    overrides = ["--data.resolution=100", "--encoding.autoencoder=preset:ae-openmoji-256"]
    with pytest.raises(ValueError, match="data.resolution=100"):
        load_config(name, overrides if "pixel" not in name else overrides[:1])
