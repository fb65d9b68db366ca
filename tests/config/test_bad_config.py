"""Bad settings and config files: each refused before any work, by a message naming it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fluxlab.config.loading import load_config
from fluxlab.config.schema import Config
from fluxlab.config.sections import OptimConfig, SampleConfig


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optim.grad_clip=-1", r"optim.grad_clip=-1.0 must be a positive, finite number"),
        ("--optim.grad_clip=0", r"optim.grad_clip=0.0 must be a positive, finite number"),
        ("--optim.grad_clip=inf", r"optim.grad_clip='inf': expected a finite number"),
        ("--optim.grad_clip=nan", r"optim.grad_clip='nan': expected a finite number"),
        ("--optim.lr=inf", r"optim.lr='inf': expected a finite number"),
        ("--optim.lr=NaN", r"optim.lr='NaN': expected a finite number"),
        ("--optim.lr=0", r"optim.lr=0.0 must be a positive, finite number"),
        ("--optim.lr=-1e-4", r"optim.lr=-0.0001 must be a positive, finite number"),
        ("--sample.steps=0", r"sample.steps=0 must be at least 1"),
        ("--data.limit=-1", r"data.limit=-1 must be at least 1, or null"),
        ("--data.limit=0", r"data.limit=0 must be at least 1, or null"),
        ("--data.max_pixels=0", r"data.max_pixels=0 must be at least 1, or null"),
        ("--sample.guidance=inf", r"sample.guidance='inf': expected a finite number"),
    ],
)
def test_a_bad_value_is_refused_naming_it(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("debug", [override])


def test_yaml_infinity_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("base: debug\noptim:\n  lr: .inf\n")
    with pytest.raises(ValueError, match=r"optim.lr=inf: expected a finite number"):
        load_config(str(f))


def test_the_refusals_hold_for_configs_built_in_code() -> None:
    for cfg, name in (
        (Config(optim=OptimConfig(lr=math.inf)), "optim.lr"),
        (Config(optim=OptimConfig(lr=math.nan)), "optim.lr"),
        (Config(optim=OptimConfig(grad_clip=-1.0)), "optim.grad_clip"),
        (Config(sample=SampleConfig(steps=0)), "sample.steps"),
    ):
        with pytest.raises(ValueError, match=name):
            cfg.validate()


def test_the_good_spellings_still_load() -> None:
    cfg = load_config(
        "debug", ["--optim.grad_clip=1e9", "--data.limit=null", "--data.max_pixels=none"]
    )
    assert cfg.optim.grad_clip == 1e9 and cfg.data.limit is None and cfg.data.max_pixels is None
    assert load_config("debug", ["--data.limit=1", "--sample.steps=1"]).data.limit == 1


def test_a_section_given_twice_names_the_key_lines_and_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("base: debug\noptim:\n  lr: 0.001\ntrain:\n  seed: 1\noptim:\n  steps: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: key 'optim' is given twice \(lines 2 and 6\)"):
        load_config(str(f))


def test_a_key_given_twice_in_a_section_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("base: debug\noptim:\n  lr: 0.001\n  steps: 3\n  lr: 0.01\n")
    with pytest.raises(ValueError, match=r"run.yaml: key 'lr' is given twice \(lines 3 and 5\)"):
        load_config(str(f))


def test_a_yaml_merge_may_be_overridden(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("base: debug\noptim:\n  <<: {lr: 0.001, steps: 3}\n  steps: 5\n")
    cfg = load_config(str(f))
    assert cfg.optim.steps == 5 and cfg.optim.lr == 0.001


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("base: debug\ntrain:\n  output_dir: runs/café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.yaml: not UTF-8 text .*save it as UTF-8"):
        load_config(str(f))


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML/JSON"):
        load_config(str(f))
