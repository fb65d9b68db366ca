"""Class-conditional DiT through the trainer and the CLI: DDPM (DDIM/DDPM sampling) and flow."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.config.model_params import dit_params
from fluxlab.data import OPENMOJI_GROUPS
from fluxlab.diffusion.ddpm import ddim_sample
from fluxlab.diffusion.samplers import euler, get_schedule
from fluxlab.models.dit import DiT
from fluxlab.tasks.class_to_image import ClassToImageTask
from fluxlab.train.checkpoint import read_description
from fluxlab.train.trainer import Trainer

FAST = ["--train.tensorboard=false", "--data.limit=24", "--optim.batch_size=4", "--train.threads=1"]


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dit") / "run"
    assert main(["train", "--config", "dit-debug", f"--train.output_dir={run}", *FAST]) == 0
    return run


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB")).copy())


def test_training_writes_checkpoint_grid_and_description(ddpm_run: Path) -> None:
    ckpt = ddpm_run / "checkpoints" / "step_0000004"
    assert (ckpt / "ema.safetensors").is_file() and (ckpt / "train_state.pt").is_file()
    grid = Image.open(ddpm_run / "samples" / "step_0000004.png")
    assert grid.size[0] >= 8 * 96  # one tile per class, 8 per row (10 classes)
    desc = read_description(ckpt)
    assert desc["task"] == "class_to_image"
    assert desc["classes"] == list(OPENMOJI_GROUPS)
    assert desc["model_params"]["num_classes"] == 10 and desc["model_params"]["input_size"] == 16
    assert (ddpm_run / "log.jsonl").read_text().count("\n") == 4


def test_sample_cli_ddim_and_ddpm(ddpm_run: Path, tmp_path: Path) -> None:
    common = [
        "sample",
        "--checkpoint",
        str(ddpm_run),
        "--prompt",
        "food & drink",
        "--prompt",
        "flags",
        "--num",
        "2",
    ]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main([*common, "--sampler", "ddim", "--steps", "5", "--out", str(a)]) == 0
    assert main([*common, "--sampler", "ddim", "--steps", "5", "--out", str(b)]) == 0
    assert torch.equal(_png(a), _png(b))  # eta = 0 and a fixed seed: deterministic
    assert main([*common, "--sampler", "ddpm", "--steps", "1000", "--out", str(c)]) == 0
    assert Image.open(c).size == Image.open(a).size  # 2 classes × 2 images, 2 per row
    assert not torch.equal(_png(a), _png(c))


def test_bad_class_name_lists_the_classes(ddpm_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    assert (
        main(["sample", "--checkpoint", str(ddpm_run), "--prompt", "cats", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown class 'cats'" in err and "'animals & nature'" in err
    assert not out.exists()
    assert (
        main(["sample", "--checkpoint", str(ddpm_run), "--sampler", "euler", "--out", str(out)])
        == 2
    )
    assert "ddim or ddpm" in capsys.readouterr().err


def test_bad_dit_configs_fail_before_any_work(tmp_path: Path, capsys) -> None:
    run = tmp_path / "never"
    assert (
        main(
            [
                "train",
                "--config",
                "dit-debug",
                "--model.preset=DiT-Q/2",
                f"--train.output_dir={run}",
            ]
        )
        == 2
    )
    assert "DiT-XL/2" in capsys.readouterr().err  # the valid presets are listed
    assert (
        main(
            [
                "train",
                "--config",
                "dit-debug",
                "--encoding.patch_size=4",
                f"--train.output_dir={run}",
            ]
        )
        == 2
    )
    assert "--encoding.patch_size=2" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                "dit-debug",
                "--sample.sampler=euler",
                f"--train.output_dir={run}",
            ]
        )
        == 2
    )
    assert "objective.kind='ddpm'" in capsys.readouterr().err
    assert not run.exists()


def test_dit_under_flow_trains_and_samples(tmp_path: Path) -> None:
    run = tmp_path / "flow"
    flow = [
        "--objective.kind=flow",
        "--sample.sampler=euler",
        "--optim.steps=2",
        "--train.checkpoint_every=2",
    ]
    assert main(["train", "--config", "dit-debug", f"--train.output_dir={run}", *FAST, *flow]) == 0
    out = tmp_path / "f.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--sampler",
                "heun",
                "--steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] >= 8 * 96


def test_labels_condition_and_drop_to_the_null_class(tmp_path: Path) -> None:
    cfg = load_config(
        "dit-debug", [f"--train.output_dir={tmp_path}", *FAST, "--data.caption_dropout=0.5"]
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, quiet=True)
    task = trainer.task
    assert isinstance(task, ClassToImageTask) and task.model.params.class_dropout_prob == 0.0
    seen: list[torch.Tensor] = []
    real_forward = task.model.forward
    task.model.forward = lambda x, t, y: (seen.append(y.clone()), real_forward(x, t, y))[1]
    batch = {"image": torch.zeros(64, 3, 16, 16), "label": torch.arange(64) % 10}
    task.loss(task.model, batch, torch.Generator().manual_seed(0))
    y = seen[0]
    dropped = y == task.null_class
    assert 16 < dropped.sum() < 48  # about half at caption_dropout=0.5
    assert torch.equal(y[~dropped], batch["label"][~dropped])
    # a trained-from-zero model still sees the labels: perturb the class table, outputs differ by
    # class
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    out = real_forward(torch.cat([x[:1], x[:1]]), t, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1])


def test_loss_decreases_on_a_tiny_set(tmp_path: Path) -> None:
    cfg = load_config(
        "dit-debug",
        [
            f"--train.output_dir={tmp_path}",
            "--train.tensorboard=false",
            "--train.threads=1",
            "--data.limit=8",
            "--optim.batch_size=8",
            "--optim.steps=80",
            "--optim.lr=3e-3",
            "--data.caption_dropout=0",
            "--train.sample_every=1000",
            "--train.checkpoint_every=1000",
            "--train.log_every=20",
        ],
    )
    Trainer(cfg, quiet=True).train()
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.7 * losses[0], losses


def test_flux_text_to_image_trains_under_ddpm(tmp_path: Path) -> None:
    # The other half of "any model under either objective": Flux on captions, v-prediction DDPM.
    run = tmp_path / "flux-ddpm"
    ddpm = [
        "--objective.kind=ddpm",
        "--objective.prediction=v",
        "--sample.sampler=ddim",
        "--optim.steps=2",
        "--train.checkpoint_every=2",
    ]
    assert main(["train", "--config", "debug", f"--train.output_dir={run}", *FAST, *ddpm]) == 0
    assert (
        read_description(run / "checkpoints" / "step_0000002")["config"]["objective"]["kind"]
        == "ddpm"
    )
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    base = ["sample", "--checkpoint", str(run), "--prompt", "frog", "--steps", "4"]
    assert main([*base, "--sampler", "ddim", "--out", str(a)]) == 0
    assert main([*base, "--sampler", "ddpm", "--out", str(b)]) == 0
    assert not torch.equal(_png(a), _png(b))
    assert main([*base, "--sampler", "euler", "--out", str(a)]) == 2  # a DDPM model has no velocity


@pytest.mark.parametrize("kind, sampler", [("flow", "euler"), ("ddpm", "ddim")])
def test_generate_guides_against_the_null_class(kind: str, sampler: str) -> None:
    # CFG in one doubled forward equals the two-pass combination with the null class as uncond.
    cfg = load_config("dit-debug", [f"--objective.kind={kind}", f"--sample.sampler={sampler}"])
    model = DiT(dit_params(cfg, 3)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # a fresh DiT is the zero function
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    task = ClassToImageTask(cfg, model, ["a", "b", "c"])
    labels, scale, eta = [0, 2], 2.5, 0.5
    out = task.generate(labels, steps=3, guidance=scale, sampler=sampler, eta=eta, seed=4)

    y, null = torch.tensor(labels), torch.full((2,), task.null_class)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(x, t, y), model(x, t, null)
        return uncond + scale * (cond - uncond)

    p = model.params
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, p.in_channels, p.input_size, p.input_size, generator=gen)
    with torch.no_grad():
        if kind == "flow":
            x = euler(guided, noise, get_schedule(3, p.grid_size**2))
        else:
            objective = task.objective
            x = ddim_sample(
                guided, noise, 3, eta, schedule=objective.schedule, spacing="trailing",
                prediction=objective.prediction, clip_x0=1.0, generator=gen,
            )  # fmt: skip
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
