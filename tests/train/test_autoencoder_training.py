"""fluxlab train-ae at toy size: loss, PSNR, scale/shift, ae/ folder, resume, loading it back."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxlab.cli import main
from fluxlab.config.autoencoder import load_ae_config
from fluxlab.eval.perceptual import InceptionPerceptual
from fluxlab.models.inception import FIDInceptionV3
from fluxlab.models.weights.autoencoder_spec import load_autoencoder
from fluxlab.train.autoencoder import AETrainer, latent_statistics, psnr

FAST = ["--data.limit=24", "--data.val_fraction=0.25", "--ae.val_images=4", "--ae.stats_images=8"]


def test_psnr_matches_the_hand_formula() -> None:
    a = torch.rand(3, 3, 8, 8) * 2 - 1
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    mse01 = (((a + 1) / 2 - (b + 1) / 2) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(b, a), 10 * torch.log10(1 / mse01))
    # a constant error of 0.2 in [-1, 1] is 0.1 on [0, 1]: MSE 0.01, 20 dB
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.2, x).item() == pytest.approx(20.0, abs=1e-4)


def test_latent_statistics_are_mean_and_inverse_std() -> None:
    chunks = [torch.randn(4, 4, 3, 3) * 2.5 + 0.7 for _ in range(3)]
    shift, scale = latent_statistics(iter(chunks))
    z = torch.cat(chunks).double()
    assert shift == pytest.approx(z.mean().item(), rel=1e-9)
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-9)


def test_train_ae_writes_a_loadable_autoencoder(tmp_path: Path) -> None:
    run = tmp_path / "ae"
    assert main(["train-ae", "--config", "ae-tiny", f"--train.output_dir={run}", *FAST]) == 0
    info = json.loads((run / "ae" / "ae.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        math.isfinite(info["scale_factor"])
        and info["scale_factor"] > 0
        and math.isfinite(info["shift_factor"])
    )
    assert math.isfinite(metrics["psnr_val"]) and metrics["psnr_val"] == info["psnr_val"]
    assert info["params"]["z_channels"] == 4 and metrics["step"] == 4
    assert (run / "samples" / "recon_final.png").is_file() and (
        run / "samples" / "recon_step_0000002.png"
    ).is_file()
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4] and "psnr_val" in lines[1]

    ae = load_autoencoder(run)
    assert (ae.scale_factor, ae.shift_factor) == (info["scale_factor"], info["shift_factor"])
    trained = load_file(run / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(v, trained[k]) for k, v in ae.state_dict().items())
    # The measured scale/shift normalise the latents of the images they were measured on.
    cfg = load_ae_config("ae-tiny", [f"--train.output_dir={tmp_path / 'x'}", *FAST])
    trainer = AETrainer(cfg, quiet=True)
    images = torch.cat(list(trainer._images(trainer.dataset, cfg.ae.stats_images)))
    with torch.no_grad():
        z = ae.encode(images)
        assert z.mean().abs().item() < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-4)
        # encode → decode is the trainer's reconstruction: scale/shift cancel
        trainer.model.load_state_dict(ae.state_dict())
        torch.testing.assert_close(
            ae.decode(z).clamp(-1, 1), trainer.reconstruct(images), atol=1e-5, rtol=1e-5
        )


def test_train_ae_resume_is_exact_after_a_torn_log_line(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["train-ae", "--config", "ae-tiny", *FAST]
    assert main([*base, f"--train.output_dir={straight}"]) == 0
    assert main([*base, f"--train.output_dir={resumed}", "--ae.steps=2"]) == 0
    # As if a killed run had logged past its last checkpoint, the kill landing mid-line.
    with open(resumed / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 99.0}\n{"step": 9999, "lo')
    assert main([*base, f"--train.output_dir={resumed}", "--resume"]) == 0
    a = load_file(straight / "ae" / "ae.safetensors")
    b = load_file(resumed / "ae" / "ae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["step"] == 4
    # The log reads as one run: the dead run's lines past step 2 are gone, the torn one too.
    records = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert 99.0 not in [r["loss"] for r in records if "loss" in r]


def test_bad_ae_config_is_reported(tmp_path: Path, capsys) -> None:
    assert main(["train-ae", "--config", "ae-tiny", "--ae.ch=48"]) == 2
    assert "divisible by 32" in capsys.readouterr().err
    assert main(["train-ae", "--config", "ae-tiny", "--data.resolution=15"]) == 2
    assert main(["train-ae", "--config", "nope"]) == 2
    assert "ae-openmoji" in capsys.readouterr().err


def test_perceptual_distance_and_missing_weights(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    d = InceptionPerceptual(FIDInceptionV3())  # random weights: the mechanics, not the numbers
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(d(y, y), torch.zeros(2), atol=1e-6)
    out = d(x, y)
    assert out.shape == (2,) and (out > 0).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    monkeypatch.setenv("FLUXLAB_FID_WEIGHTS", str(tmp_path / "missing.pth"))
    cfg = load_ae_config(
        "ae-tiny", [f"--train.output_dir={tmp_path / 'p'}", "--ae.perceptual_weight=0.1", *FAST]
    )
    with pytest.raises(ValueError, match="perceptual_weight"):
        AETrainer(cfg, quiet=True)


def test_train_ae_step_interval_of_zero_is_named() -> None:
    with pytest.raises(ValueError, match="train.checkpoint_every=0"):
        load_ae_config("ae-tiny", ["--train.checkpoint_every=0"])
