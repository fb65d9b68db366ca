"""Guidance-embedded models (FLUX.1-dev style) train with a guidance input, resume bitwise and
sample with the strength they were trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.tasks.guidance import sampling_guidance, training_guidance
from fluxlab.train.rng import SampleGenerators

FAST = ["--train.tensorboard=false", "--data.limit=24", "--optim.batch_size=4"]
GUIDED = ["--config", "debug", "--model.guidance_embed=true", *FAST]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def test_guidance_model_trains_with_its_guidance_and_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor | None] = []
    forward = Flux.forward

    def spy(self: Flux, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs.get("guidance"))  # type: ignore[arg-type]
        return forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Flux, "forward", spy)
    run = tmp_path / "run"
    args = [*GUIDED, "--objective.train_guidance=2.5", f"--train.output_dir={run}"]
    assert main(["train", *args]) == 0
    training = seen[:4]  # one forward per step before the first sample grid
    assert all(g is not None and torch.all(g == 2.5) for g in training)
    desc = json.loads((_ckpt(run, 4) / "config.json").read_text())
    assert desc["train_guidance"] == [2.5, 2.5]
    seen.clear()
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(run), "--prompt", "red heart", "--steps", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.is_file()
    assert seen and all(g is not None and torch.all(g == 2.5) for g in seen)


def test_guidance_range_resumes_bitwise(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*GUIDED, "--objective.train_guidance=[1,4]", "--train.checkpoint_every=2"]
    assert main(["train", *common, f"--train.output_dir={straight}"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--optim.steps=2"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--resume"]) == 0
    a = load_file(_ckpt(straight, 4) / "model.safetensors")
    b = load_file(_ckpt(resumed, 4) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the guidance embedder trained
    start = load_file(_ckpt(resumed, 2) / "model.safetensors")
    assert not torch.equal(a["guidance_in.in_layer.weight"], start["guidance_in.in_layer.weight"])


def test_a_range_draws_per_sample_the_same_at_any_world_size() -> None:
    cfg = load_config("debug", ["--objective.train_guidance=[1,4]"])
    params = flux_params("flux-debug", guidance_embed=True)
    cpu = torch.device("cpu")
    alone = training_guidance(cfg, params, 4, SampleGenerators.for_batch(0, 7, 4, 0, 1, cpu), cpu)
    ranks = [
        training_guidance(cfg, params, 2, SampleGenerators.for_batch(0, 7, 2, r, 2, cpu), cpu)
        for r in range(2)
    ]
    assert alone is not None and ranks[0] is not None and ranks[1] is not None
    assert torch.equal(alone[0::2], ranks[0]) and torch.equal(alone[1::2], ranks[1])
    assert alone.min() >= 1 and alone.max() <= 4 and len(set(alone.tolist())) == 4


def test_constant_guidance_and_plain_models_draw_nothing() -> None:
    cfg = load_config("debug", ["--objective.train_guidance=3.5"])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    guided = flux_params("flux-debug", guidance_embed=True)
    assert torch.equal(
        training_guidance(cfg, guided, 3, gen, torch.device("cpu")), torch.full((3,), 3.5)
    )
    assert training_guidance(cfg, flux_params("flux-debug"), 3, gen, torch.device("cpu")) is None
    assert torch.equal(gen.get_state(), state)


def test_sampling_defaults_to_the_training_guidance() -> None:
    assert sampling_guidance(load_config("debug", ["--objective.train_guidance=[1,4]"])) == 2.5
    explicit = ["--objective.train_guidance=1", "--sample.distilled_guidance=3.5"]
    assert sampling_guidance(load_config("debug", explicit)) == 3.5


@pytest.mark.parametrize("value", ["[4,1]", "[1,2,3]", "-1"])
def test_bad_guidance_is_named(value: str) -> None:
    with pytest.raises(ValueError, match="objective.train_guidance"):
        load_config("debug", [f"--objective.train_guidance={value}"])
