"""Guidance distillation (``fluxlab distill``): the target is the pipeline's own CFG velocity, the
student starts as its teacher and learns, a distilled checkpoint samples in one pass per step,
and a resumed run is exact; text-to-image, Kontext edits, latents on the fly and from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fluxlab.cli import main
from fluxlab.models.flux.model import Flux
from fluxlab.tasks.distill import DistillTask, student_config
from fluxlab.train.trainer import Trainer

FAST = ["--train.tensorboard=false", "--data.limit=16", "--optim.batch_size=4"]


def _teacher(tmp_path: Path, preset: str = "debug", extra: tuple[str, ...] = ()) -> Path:
    run = tmp_path / "teacher"
    argv = ["train", "--config", preset, *FAST, *extra, f"--train.output_dir={run}"]
    assert main([*argv, "--data.caption_dropout=0.3", "--optim.steps=6"]) == 0
    return run


def _task(teacher: Path, tmp_path: Path, *overrides: str) -> tuple[Trainer, DistillTask]:
    out = f"--train.output_dir={tmp_path / 'student'}"
    trainer = Trainer(student_config(str(teacher), None, [*FAST, out, *overrides]))
    assert isinstance(trainer.task, DistillTask)
    return trainer, trainer.task


def _batch(trainer: Trainer) -> dict:
    items = [trainer.dataset[i] for i in range(4)]
    return {
        "image": torch.stack([i["image"] for i in items]),
        "caption": [i["caption"] for i in items],
    }


def test_the_target_is_the_pipelines_cfg_velocity(tmp_path: Path) -> None:
    trainer, task = _task(_teacher(tmp_path), tmp_path)
    batch = _batch(trainer)
    inputs = task.base.flow_inputs(batch, None, None, measure=True)
    pipe, teacher = task.base.pipe, task.teacher
    # Different scales per sample: each row is guided by its own.
    scale = torch.tensor([1.0, 2.0, 4.5, 6.0])
    x_t, t = torch.randn_like(inputs.x0), torch.tensor([0.9, 0.5, 0.3, 0.7])
    target = task.teacher_velocity(inputs, scale)(x_t, t)
    v_c = pipe.velocity(teacher, x_t, t, inputs.text)
    v_u = pipe.velocity(teacher, x_t, t, task.base.captions.lookup([""] * 4))
    assert not torch.allclose(v_c, v_u)  # the teacher learned to use its captions
    expected = v_u + scale[:, None, None] * (v_c - v_u)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)
    # One Euler step of the pipeline's own guided sampling from t=1 is x - v(x, 1).
    seed, w = 3, 4.0
    images = pipe.generate(
        inputs.text, task.base.captions.lookup([""]), steps=1, guidance=w, seed=seed, model=teacher
    )
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(inputs.x0.shape, generator=gen)
    one_step = noise - task.teacher_velocity(inputs, torch.full((4,), w))(noise, torch.ones(4))
    torch.testing.assert_close(images, pipe.from_tokens(one_step), rtol=1e-5, atol=1e-5)


def test_the_student_starts_as_its_teacher_and_learns(tmp_path: Path) -> None:
    trainer, task = _task(_teacher(tmp_path), tmp_path, "--optim.lr=3e-3")
    student = task.model
    assert student.params.guidance_embed and not task.teacher.params.guidance_embed
    assert not any(p.requires_grad for p in task.teacher.parameters())
    batch = _batch(trainer)
    inputs = task.base.flow_inputs(batch, None, None, measure=True)
    x_t, t = torch.randn_like(inputs.x0), torch.full((4,), 0.6)
    with torch.no_grad():  # a zero-initialised guidance embedding: the teacher's v_c exactly
        for g in (1.0, 5.0):
            torch.testing.assert_close(
                inputs.predict(student, torch.full((4,), g))(x_t, t),
                inputs.predict(task.teacher, None)(x_t, t),
                rtol=0,
                atol=0,
            )
    # A six-step teacher barely tells captions apart; random weights give CFG something to learn.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in task.teacher.parameters():
            p.normal_(0, 0.1)
    fixed = {"t": torch.tensor([0.2, 0.4, 0.6, 0.8]), "noise": lambda shape: torch.ones(shape)}
    generator = torch.Generator().manual_seed(0)
    before = task.loss(student, batch, generator, **fixed)[0].mean().item()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(10):
        optimizer.zero_grad()
        task.loss(student, batch, torch.Generator().manual_seed(0), **fixed)[0].mean().backward()
        optimizer.step()
    after = task.loss(student, batch, torch.Generator().manual_seed(0), **fixed)[0].mean().item()
    assert before > 1e-3 and after < 0.5 * before


def test_a_distilled_checkpoint_samples_in_one_pass_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = _teacher(tmp_path)
    common = ["distill", "--teacher", str(teacher), *FAST, "--train.checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, f"--train.output_dir={straight}"]) == 0
    assert main([*common, f"--train.output_dir={resumed}", "--optim.steps=2"]) == 0
    assert main([*common, f"--train.output_dir={resumed}", "--resume"]) == 0
    a = load_file(straight / "checkpoints/step_0000004/model.safetensors")
    b = load_file(resumed / "checkpoints/step_0000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "guidance_in.out_layer.weight" in a

    calls: list[int] = []
    forward = Flux.forward

    def count(self: Flux, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs["img"].shape[0])  # type: ignore[union-attr]
        return forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Flux, "forward", count)
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(straight), "--prompt", "red heart", "--steps", "5"]
    assert main([*argv, "--guidance", "4", "--out", str(out)]) == 0
    assert calls == [1] * 5  # one pass of one image per step: no unconditional branch
    assert main(["sample", "--checkpoint", str(teacher), *argv[3:], "--out", str(out)]) == 0
    assert calls[5:] == [2] * 5  # the teacher: conditional and unconditional rows together


@pytest.mark.parametrize("flag", [["--negative-prompt", "blue"], ["--true-cfg", "3"]])
def test_a_distilled_checkpoint_refuses_cfg_and_says_why(
    tmp_path: Path, flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = _teacher(tmp_path)
    student = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), *FAST, "--optim.steps=1"]
    assert main([*argv, f"--train.output_dir={student}"]) == 0
    capsys.readouterr()
    sample = ["sample", "--checkpoint", str(student), "--prompt", "sun", "--steps", "1"]
    assert main([*sample, *flag, "--out", str(tmp_path / "x.png")]) == 2
    assert "distilled from its teacher's classifier-free guidance" in capsys.readouterr().err


def test_kontext_edits_distil_with_the_condition_on_both_sides(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path, "edit-debug")
    trainer, task = _task(teacher, tmp_path)
    items = [trainer.dataset[i] for i in range(2)]
    batch = {k: [i[k] for i in items] for k in items[0]}
    batch = {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else v for k, v in batch.items()}
    inputs = task.base.flow_inputs(batch, None, None, measure=True)
    assert inputs.condition is not None
    seen: list[int] = []
    forward = Flux.forward

    def spy(self: Flux, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs["img"].shape[1])  # type: ignore[union-attr]
        return forward(self, *args, **kwargs)  # type: ignore[arg-type]

    Flux.forward = spy  # type: ignore[method-assign]
    try:
        loss, _ = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    finally:
        Flux.forward = forward  # type: ignore[method-assign]
    # teacher (doubled batch) and student both see target and condition tokens
    tokens = inputs.x0.shape[1] + inputs.condition.tokens.shape[1]
    assert seen == [tokens, tokens] and torch.isfinite(loss).all()
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                *FAST,
                "--optim.steps=2",
                f"--train.output_dir={tmp_path / 'edit-student'}",
                "--overwrite",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("cached", [False, True])
def test_latent_space_distils_on_the_fly_and_from_the_cache(tmp_path: Path, cached: bool) -> None:
    cache = tmp_path / "cache"
    space = [f"--data.cache_dir={cache}"] if cached else ["--data.cache_dir=null"]
    space += ["--data.val_fraction=0", "--train.eval_every=0"]
    if cached:
        assert main(["cache", "--config", "latent-debug", *FAST, *space]) == 0
    teacher = _teacher(tmp_path, "latent-debug", tuple(space))
    student = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), *FAST, "--optim.steps=2"]
    assert main([*argv, f"--train.output_dir={student}"]) == 0
    weights = load_file(student / "checkpoints/step_0000002/model.safetensors")
    assert "guidance_in.out_layer.weight" in weights
    assert weights["guidance_in.out_layer.weight"].abs().sum() > 0  # it trained


def test_compare_distill_reports_error_distances_and_time(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(  # a stand-in for the Inception: random conv features
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    )
    features = tmp_path / "standin.pt"
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), str(features))
    teacher, student = _teacher(tmp_path), tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), *FAST, "--optim.steps=2"]
    assert main([*argv, f"--train.output_dir={student}"]) == 0
    out = tmp_path / "compare"
    argv = ["compare-distill", "--teacher", str(teacher), "--student", str(student)]
    argv += ["--scale", "2", "--scale", "5", "--limit", "6", "--steps", "2", "--batch-size", "4"]
    argv += ["--reference-split", "train", "--features", str(features), "--grid-rows", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    rows = summary["results"]
    assert [r["scale"] for r in rows] == [2.0, 5.0] and summary["prompts"] == 6
    for r in rows:
        assert 0 < r["mae"] < 1 and r["psnr"] > 0
        assert all(np.isfinite(r[k]) for k in ("teacher_fid", "student_fid", "time_ratio"))
    # The two scales guide the teacher differently, so its error against the student differs.
    assert rows[0]["mae"] != rows[1]["mae"]
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 4 * 96  # teacher | student at two scales
    assert "| w | MAE |" in (out / "results.md").read_text()
