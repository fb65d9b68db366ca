"""Atomic checkpoints: partial or corrupt ones are detected and skipped; the previous one loads."""

import json
import warnings

import pytest
import torch

from fluxlab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _save(run, step, value=1.0, keep_last=3):
    sd = {"w": torch.full((3,), value)}
    return save_checkpoint(
        run, step, sd, {"w": sd["w"] * 2}, {"config": {}}, {"step": step}, keep_last=keep_last
    )


def test_save_and_load(tmp_path) -> None:
    path = _save(tmp_path, 5, 1.5)
    assert verify_checkpoint(path) is None
    assert json.loads((path / "config.json").read_text())["step"] == 5
    assert torch.equal(load_weights(path, ema=True)["w"], torch.full((3,), 3.0))
    assert torch.equal(load_weights(path, ema=False)["w"], torch.full((3,), 1.5))
    assert resolve_checkpoint(tmp_path) == path


def test_keep_last(tmp_path) -> None:
    for s in range(1, 6):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]


def test_partial_checkpoint_falls_back(tmp_path) -> None:
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    # Simulate a kill mid-write of an older format or a disk error: truncate the weights file.
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="step_0000002"):
        assert latest_checkpoint(tmp_path) == good


def test_missing_manifest_is_incomplete(tmp_path) -> None:
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    (bad / "meta.json").unlink()
    with pytest.warns(UserWarning, match="meta.json"):
        assert latest_checkpoint(tmp_path) == good


def test_temporary_folders_are_ignored(tmp_path) -> None:
    good = _save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".tmp-step_0000002-123").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path) == good


def test_resolve_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
