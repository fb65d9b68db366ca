"""Bad situations around a run folder and the training loop, each with the answer a user should get
(issue 23, part B): a folder that holds a run, two processes in one folder, unreadable data, Ctrl-C
and SIGTERM, a failing sample grid, read-only folders, checkpoints corrupted in place."""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fluxlab.cli import main
from fluxlab.config.autoencoder import load_ae_config, validate_ae
from fluxlab.config.loading import load_config
from fluxlab.data.shard_writer import folder_samples, shard_pattern, write_shards
from fluxlab.data.training import train_batches, train_dataset
from fluxlab.train import trainer as trainer_module
from fluxlab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from fluxlab.train.evaluation import Evaluator
from fluxlab.train.run_folder import RunFolder
from fluxlab.train.run_log import RunLog

CPU = torch.device("cpu")
FAST = ["--train.tensorboard=false", "--train.threads=1", "--data.limit=24", "--optim.batch_size=4"]
QUIET = ["--train.sample_every=1000", "--train.log_every=1"]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _train(run: Path, *extra: str) -> list[str]:
    return ["train", "--config", "debug", *FAST, f"--train.output_dir={run}", *extra]


def _fake_run(run: Path, steps: tuple[int, ...] = (9,), log: bool = True) -> None:
    """A run folder as a finished run leaves it: config, log lines and checkpoints."""
    for step in steps:
        w = {"w": torch.full((8,), float(step))}
        save_checkpoint(run, step, w, w, {"config": {}}, {"step": step}, keep_last=3)
    (run / "config.json").write_text("{}\n")
    if log:
        (run / "log.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 10)))


def _no_data_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any data load fails the test: the folder must be judged before any work."""

    def data_loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data loaded before the run folder was checked")

    monkeypatch.setattr(trainer_module, "train_dataset", data_loaded)


def _error_line(err: str) -> str:
    [line] = [x for x in err.splitlines() if x.startswith("fluxlab train:")]
    assert "Traceback" not in err
    return line


# ------------------------------------------------------------------ 1. a folder that holds a run
@pytest.mark.parametrize("marker", ["checkpoints", "log.jsonl", "config.json"])
def test_a_new_run_into_a_run_folder_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], marker: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if marker == "checkpoints":
        w = {"w": torch.zeros(2)}
        save_checkpoint(run, 9, w, w, {"config": {}}, {"step": 9})
    else:
        (run / marker).write_text("{}\n")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    _no_data_load(monkeypatch)
    assert main(_train(run)) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{run} already holds a run" in line and marker in line
    assert "--resume" in line and "--overwrite" in line
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # untouched


def test_train_ae_refuses_a_run_folder_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    assert main(["train-ae", "--config", "ae-tiny", f"--train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"fluxlab train-ae: error: {tmp_path} already holds a run (log.jsonl)" in err


def test_overwrite_starts_over_and_says_what_it_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _fake_run(run, steps=(7, 9))
    (run / "samples").mkdir()
    (run / "samples" / "step_0000009.png").write_bytes(b"old")
    # keep_last=1 with the old step 9 still there would prune the new run's own step 2.
    args = _train(run, "--optim.steps=2", "--train.keep_last=1", *QUIET, "--overwrite")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"--overwrite: removed checkpoints/, log.jsonl, config.json, samples/ from {run}" in out
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "samples" / "step_0000009.png").exists()
    assert json.loads((run / "config.json").read_text())["optim"]["steps"] == 2


def test_resume_and_overwrite_together_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*_train(tmp_path / "run"), "--resume", "--overwrite"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 2. the lock
def _hold_the_lock(run: str, ready: multiprocessing.synchronize.Event) -> None:
    folder = RunFolder(run, keep_last=1, log=RunLog(Path(run), quiet=True))
    folder.claim(resume=False, overwrite=False)
    ready.set()
    time.sleep(120)  # killed by the test long before


def test_a_second_process_in_a_locked_folder_is_told_who_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_the_lock, args=(str(run), ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(30), "the lock holder never started"
        _no_data_load(monkeypatch)
        assert main(_train(run)) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"{run} is in use by pid {holder.pid} on host {socket.gethostname()} since " in line
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):  # --resume does not bypass it
            RunFolder(run, keep_last=1, log=RunLog(run)).claim(resume=True, overwrite=False)
    finally:
        holder.kill()  # as a crash would: the kernel drops the lock with the process
        holder.join()
    folder = RunFolder(run, keep_last=1, log=RunLog(run))
    folder.claim(resume=False, overwrite=False)  # the stale .lock file blocks nothing
    assert folder.lock.held
    folder.release()
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------- 3. unreadable data
def _folder(root: Path, good: int, bad: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"g{i}.png")
        (root / f"g{i}.txt").write_text("a picture")
    for i in range(bad):
        (root / f"b{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
        (root / f"b{i}.txt").write_text("never seen")
    return root


def test_batches_without_a_readable_image_are_not_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = _folder(tmp_path / "data", good=5, bad=3), tmp_path / "run"
    args = _train(run, f"--data.dataset={data}", "--data.val_fraction=0", "--optim.batch_size=1")
    assert main([*args, "--optim.steps=5", *QUIET, "--data.limit=null"]) == 0
    state = torch.load(_ckpt(run, 5) / "train_state.pt", weights_only=False)
    unreadable = state["batches_seen"] - 5  # batch size 1: every bad image was a batch of its own
    assert unreadable >= 1, "the five steps met no bad image: the test proves nothing"
    assert state["skipped_images"] == unreadable
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records)  # no empty "steps"
    assert f"skipped {unreadable} unreadable images" in capsys.readouterr().out


def test_a_dataset_of_unreadable_images_is_an_error_not_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = _folder(tmp_path / "data", good=0, bad=8), tmp_path / "run"
    args = _train(run, f"--data.dataset={data}", "--data.val_fraction=0", "--data.limit=null")
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"data.dataset={str(data)!r} gave 2 batches in a row without one readable image" in line
    assert "8 images skipped" in line
    assert not list_checkpoints(run)


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_shards_are_counted_for_the_summary(tmp_path: Path, workers: int) -> None:
    data = _folder(tmp_path / "data", good=9, bad=0)
    total, samples = folder_samples(data)
    paths = write_shards(samples, tmp_path / "shards", shard_size=3, total=total)
    paths[1].write_bytes(paths[1].read_bytes()[:1000])  # cut inside the shard's first image
    cfg = load_config(
        "debug",
        [
            f"--data.dataset={shard_pattern(paths)}",
            "--data.val_fraction=0",
            "--optim.batch_size=2",
            f"--data.num_workers={workers}",
        ],
    )
    batches = train_batches(train_dataset(cfg, CPU), cfg, 0, 0, 1, CPU)
    assert batches.broken_shards == 0
    for _ in range(8):  # over two epochs of each worker's shards
        next(batches)
    # Each worker counts in its own copy of the dataset; the tally must reach the trainer anyway.
    assert batches.broken_shards >= 1


def test_the_summary_names_broken_shards() -> None:
    lines = trainer_module.skip_summary(3, 2, 1)
    assert lines[0].startswith("skipped 3 unreadable images")
    assert lines[1].startswith("stopped reading 2 broken shard(s) at the break")
    assert lines[2] == "skipped 1 steps with a non-finite loss or gradient"
    assert trainer_module.skip_summary(0, 0, 0) == []


# -------------------------------------------------------------------------- 4. Ctrl-C and SIGTERM
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop: signal.Signals
) -> None:
    run, log = tmp_path / "run", tmp_path / "child.log"
    overrides = [*FAST, "--optim.steps=1000", "--train.checkpoint_every=1000", *QUIET]
    overrides.append(f"--train.output_dir={run}")
    cmd = [sys.executable, "-m", "fluxlab.cli", "train", "--config", "debug", *overrides]
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text()):
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never logged a step"
            time.sleep(0.02)
        child.send_signal(stop)
        code = child.wait(60)
    text = log.read_text()
    assert code == 128 + stop, text[-3000:]
    assert "Traceback" not in text
    [message] = [x for x in text.splitlines() if x.startswith("fluxlab train: stopped by")]
    step = int(message.split(" at step ")[1].split(";")[0])
    assert 1 <= step < 1000
    resume = "fluxlab train --config debug " + " ".join(overrides) + " --resume"
    assert message == (
        f"fluxlab train: stopped by {stop.name} at step {step}; saved {_ckpt(run, step)}. "
        f"Continue with: {resume}"
    )
    assert [p.name for p in list_checkpoints(run)] == [_ckpt(run, step).name]
    assert verify_checkpoint(_ckpt(run, step)) is None
    if stop == signal.SIGTERM:
        return
    capsys.readouterr()
    resumed = [*overrides[:-1], f"--optim.steps={step + 1}", f"--train.output_dir={run}"]
    assert main(["train", "--config", "debug", *resumed, "--resume"]) == 0
    assert f"resumed from {_ckpt(run, step)} at step {step}" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2))


# ------------------------------------------------------------- 5. the checkpoint before the grid
def test_a_failing_sample_grid_does_not_lose_the_checkpoint_of_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_grid(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(Evaluator, "sample_grid", broken_grid)
    run = tmp_path / "run"
    args = _train(run, "--optim.steps=4", "--train.checkpoint_every=2", "--train.sample_every=2")
    with pytest.raises(RuntimeError, match="while sampling"):
        main(args)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert verify_checkpoint(_ckpt(run, 2)) is None
    assert not (run / ".lock").exists()  # the failed run let go of its folder


# -------------------------------------------------------------------------- 6. read-only folders
READ_ONLY_CHILD = """
import contextlib, io, json, sys
from pathlib import Path
import fluxlab.train.trainer as trainer_module

def data_loaded(*args, **kwargs):
    raise AssertionError("the data loaded before the run folder was checked")

trainer_module.train_dataset = data_loaded
from fluxlab.cli import main

root = Path(sys.argv[1])
try:  # the precondition: this process cannot write where the mode says it cannot
    (root / "readonly" / "probe").write_text("x")
except PermissionError:
    pass
else:
    print(json.dumps({"skip": "this user writes into read-only folders"}))
    sys.exit(0)
cases = {
    "output": [f"--train.output_dir={root / 'readonly'}"],
    "parent": [f"--train.output_dir={root / 'readonly' / 'run'}"],
    "checkpoints": [f"--train.output_dir={root / 'run'}", "--resume"],
}
results = {}
for name, args in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", "debug", *args])
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _without_permission_override() -> None:
    """In the child, before exec: root drops CAP_DAC_OVERRIDE, which lets it write anywhere."""
    if os.geteuid() != 0:
        return
    pr_capbset_drop, cap_dac_override = 24, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_folders_are_refused_up_front_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "readonly").mkdir()
    _fake_run(tmp_path / "run", steps=(2,))
    script = tmp_path / "child.py"
    script.write_text(READ_ONLY_CHILD)
    read_only = [tmp_path / "readonly", tmp_path / "run" / "checkpoints"]
    for folder in read_only:
        folder.chmod(0o555)
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_without_permission_override,
        )
    except subprocess.SubprocessError as err:
        pytest.skip(f"cannot run a child without root's permission override: {err}")
    finally:
        for folder in read_only:
            folder.chmod(0o755)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    expected = {
        "output": f"{tmp_path / 'readonly'} is not writable (Permission denied)",
        "parent": f"cannot create train.output_dir={tmp_path / 'readonly' / 'run'} (Permission",
        "checkpoints": f"{tmp_path / 'run' / 'checkpoints'} is not writable (Permission denied)",
    }
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        assert expected[name] in _error_line(err), (name, err)


# --------------------------------------------------------------- 7. checkpoints corrupted in place
def _nan_in_place(checkpoint: Path, name: str = "model.safetensors") -> None:
    """Every weight NaN, the file the same size: what a size check cannot see."""
    path = checkpoint / name
    size = path.stat().st_size
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)
    assert path.stat().st_size == size


def test_corruption_in_place_is_caught_at_load_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_run(tmp_path, steps=(2, 4))
    assert verify_checkpoint(_ckpt(tmp_path, 4)) is None  # intact, and remembered as such
    time.sleep(0.01)  # so the rewrite below gets a new mtime even on coarse clocks
    _nan_in_place(_ckpt(tmp_path, 4))
    assert verify_checkpoint(_ckpt(tmp_path, 4), full=False) is None  # sizes still agree
    with pytest.raises(ValueError, match=r"model.safetensors does not match its sha256"):
        resolve_checkpoint(_ckpt(tmp_path, 4))
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(_ckpt(tmp_path, 4)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step_0000004 is unusable: model.safetensors does not match its sha256" in err
    with pytest.warns(UserWarning, match="step_0000004: model.safetensors does not match"):
        assert resolve_checkpoint(tmp_path) == _ckpt(tmp_path, 2)  # a run folder: the one before


def test_resume_falls_back_past_a_corrupt_checkpoint_and_refuses_when_all_are(
    tmp_path: Path,
) -> None:
    _fake_run(tmp_path, steps=(2, 4))
    _nan_in_place(_ckpt(tmp_path, 4), "ema.safetensors")
    folder = RunFolder(tmp_path, keep_last=3, log=RunLog(tmp_path, quiet=True))
    with pytest.warns(UserWarning, match="step_0000004: ema.safetensors does not match"):
        assert folder.resume(lambda path, state: state["step"]) == _ckpt(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]

    _fake_run(tmp_path / "all", steps=(2, 4))
    for step in (2, 4):
        _nan_in_place(_ckpt(tmp_path / "all", step))
    log_before = (tmp_path / "all" / "log.jsonl").read_text()
    folder = RunFolder(tmp_path / "all", keep_last=3, log=RunLog(tmp_path / "all", quiet=True))
    with pytest.warns(UserWarning), pytest.raises(ValueError) as error:
        folder.resume(lambda path, state: state["step"])
    message = str(error.value)
    assert "none of the 2 checkpoints" in message and "--overwrite" in message
    assert "step_0000002: model.safetensors does not match its sha256" in message
    assert (tmp_path / "all" / "log.jsonl").read_text() == log_before  # not a silent restart


def test_older_checkpoints_without_checksums_still_load(tmp_path: Path) -> None:
    _fake_run(tmp_path, steps=(2, 4))
    for step in (2, 4):  # as written before checksums: sizes only
        meta = _ckpt(tmp_path, step) / "meta.json"
        info = json.loads(meta.read_text())
        del info["sha256"]
        meta.write_text(json.dumps(info))
    assert verify_checkpoint(_ckpt(tmp_path, 4)) is None
    truncated = _ckpt(tmp_path, 4) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="step_0000004: model.safetensors has"):
        assert latest_checkpoint(tmp_path) == _ckpt(tmp_path, 2)


# ------------------------------------------------------------------------------- 9. ae.grad_clip
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_ae_grad_clip_must_be_positive_and_finite(value: float) -> None:
    if math.isfinite(value):  # the override parser refuses inf and nan itself
        with pytest.raises(ValueError, match=f"ae.grad_clip={value} must be a positive, finite"):
            load_ae_config("ae-tiny", [f"--ae.grad_clip={value}"])
    cfg = load_ae_config("ae-tiny")
    cfg.ae.grad_clip = value  # as a YAML file or a caller could set it
    with pytest.raises(ValueError, match=f"ae.grad_clip={value} must be a positive, finite"):
        validate_ae(cfg)
