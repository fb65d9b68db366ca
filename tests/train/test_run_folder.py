"""What both trainers share: the run log, resuming a run folder, the loss window, the clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fluxlab.parallel.distributed import DistInfo
from fluxlab.train.progress import T_BINS, LossWindow, TimeBudget
from fluxlab.train.run_folder import RunFolder
from fluxlab.train.run_log import RunLog


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


def test_only_a_writing_rank_writes_the_log(tmp_path: Path) -> None:
    RunLog(tmp_path, writes=False).record({"step": 1})
    assert not (tmp_path / "log.jsonl").exists()
    log = RunLog(tmp_path, writes=True, quiet=True)
    log.record({"step": 1, "loss": 0.5})
    log.record({"step": 2, "loss": 0.25})
    assert _steps(tmp_path / "log.jsonl") == [1, 2]


def test_resume_restores_the_newest_checkpoint_and_rewinds_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = RunFolder(tmp_path, keep_last=3, log=RunLog(tmp_path))
    calls: list[tuple[Path, dict[str, Any]]] = []

    def restore(path: Path, state: dict[str, Any]) -> int:
        calls.append((path, state))
        return state["step"]

    assert folder.resume(restore) is None and not calls
    assert "no checkpoint" in capsys.readouterr().out

    weights = {"w": torch.ones(2)}
    for step in (2, 4):
        folder.save(step, weights, None, {"config": {}}, {"step": step})
    with open(tmp_path / "log.jsonl", "w") as f:  # steps 5-6 logged by a run that then died
        f.write("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    path = folder.resume(restore)
    assert path == folder.checkpoint_path(4) and calls == [(path, {"step": 4})]
    assert _steps(tmp_path / "log.jsonl") == [1, 2, 3, 4]
    assert f"resumed from {path} at step 4" in capsys.readouterr().out


def test_loss_window_means_the_steps_and_bins_the_samples_by_t() -> None:
    window = LossWindow(torch.device("cpu"), DistInfo(), steps_per_epoch=2)
    t = torch.tensor([0.05, 0.07, 0.95])
    window.add(1.0, [(t, torch.tensor([1.0, 3.0, 5.0]))])
    assert window.end_of_epoch(1) is None
    window.add(2.0, [(torch.tensor([1.0]), torch.tensor([7.0]))])  # t = 1 joins the last bin
    assert window.end_of_epoch(2) == (1, 1.5)
    mean, curve = window.flush()
    assert mean == 1.5 and len(curve) == T_BINS
    assert curve[0] == 2.0 and curve[-1] == 6.0 and curve[1:-1] == [None] * (T_BINS - 2)
    window.add(4.0, [])
    assert window.flush() == (4.0, [None] * T_BINS)  # the last flush started a new window


def test_time_budget_runs_out_after_its_minutes() -> None:
    budget, unlimited = TimeBudget(1.0), TimeBudget(None)
    assert not budget.exhausted()
    budget.start -= 61  # as if a minute and a second had passed
    unlimited.start -= 10**6
    assert budget.exhausted() and budget.elapsed() >= 61
    assert not unlimited.exhausted()
