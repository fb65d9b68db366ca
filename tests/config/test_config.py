import pytest

from fluxlab.config.loading import load_config, parse_overrides
from fluxlab.config.presets import PRESETS

# Presets over files the user makes or downloads first: they must fail with a message naming the
# field.
NEEDS_FILES = {
    "openmoji-latent-gpu": "encoding.autoencoder='runs/ae-openmoji'",
    "openmoji-256-gpu": "encoding.autoencoder='runs/ae-openmoji-256'",
    "flux-dev-finetune": "model.init_from, encoding.autoencoder, encoding.text_encoder",
    "flux-dev-lora": "model.init_from, encoding.autoencoder, encoding.text_encoder still say "
    "FLUX_DEV_PLACEHOLDER.*data.dataset",
    "flux-schnell-lora": "model.init_from, .*FLUX_SCHNELL_PLACEHOLDER.*data.dataset",
    "kontext-dev-lora": "model.init_from, .*KONTEXT_DEV_PLACEHOLDER.*data.dataset",
    # the LoRA of the held-out experiment starts from the openmoji-gpu-heldout run
    "openmoji-gpu-lora50": "model.init_from='runs/openmoji-gpu-heldout': no such file or folder",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # presets name run folders relative to the working directory
    if name in NEEDS_FILES:
        with pytest.raises(ValueError, match=NEEDS_FILES[name]):
            load_config(name)
        return
    cfg = load_config(name)
    cfg.validate()


def test_flux_dev_finetune_names_a_missing_folder(tmp_path) -> None:
    missing = tmp_path / "FLUX.1-dev"
    with pytest.raises(ValueError, match="no such file or folder"):
        load_config(
            "flux-dev-finetune",
            [
                f"--{k}={missing}"
                for k in ("model.init_from", "encoding.autoencoder", "encoding.text_encoder")
            ],
        )


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "openmoji-cpu",
        ["--optim.lr=3e-4", "--train.seed=7", "--data.hflip=true", "--model.axes_dim=8,28,28"],
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.seed == 7 and cfg.data.hflip is True
    assert cfg.model.axes_dim == [8, 28, 28]


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config("debug", ["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config("debug", ["--nosuchsection.x=1"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ValueError, match="optim.batch_size"):
        load_config("debug", ["--optim.batch_size=big"])
    with pytest.raises(ValueError, match="objective.kind"):
        load_config("debug", ["--objective.kind=gan"])


@pytest.mark.parametrize("key", ["log_every", "sample_every", "checkpoint_every"])
def test_step_intervals_below_one_are_named(key: str) -> None:
    # 0 would otherwise pass validation and stop training with a ZeroDivisionError after the first
    # step.
    with pytest.raises(ValueError, match=f"train.{key}=0"):
        load_config("debug", [f"--train.{key}=0"])


def test_resolution_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match="data.resolution=30"):
        load_config("debug", ["--data.resolution=30"])


def test_yaml_file_with_base(tmp_path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("base: debug\noptim:\n  steps: 9\n")
    cfg = load_config(str(f))
    assert cfg.optim.steps == 9 and cfg.model.preset == "flux-debug"


def test_missing_file_is_clear() -> None:
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("no/such/file.yaml")


def test_parse_overrides_nesting() -> None:
    assert parse_overrides(["--a.b.c=1", "a.d=x"]) == {
        "a": {"b": {"c": "1"}, "d": "x"}
    }  # typed later, by the field
    with pytest.raises(ValueError):
        parse_overrides(["--novalue"])


def test_model_errors_before_work() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        load_config("debug", ["--model.hidden_size=66"])
    with pytest.raises(ValueError, match="axes_dim"):
        load_config("debug", ["--model.axes_dim=4,4,4"])
    with pytest.raises(ValueError, match="unknown model preset"):
        load_config("debug", ["--model.preset=flux-huge"])


def test_missing_init_from_is_named_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="model.init_from='.*nope': no such file or folder"):
        load_config("debug", [f"--model.init_from={tmp_path / 'nope'}"])
    assert load_config("debug", [f"--model.init_from={tmp_path}"]).model.init_from == str(tmp_path)
