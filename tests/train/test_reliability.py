"""Runs that die, data that lies, numbers that blow up: each is survived, reported, resumed exactly.

The SIGKILL tests run ``fluxlab train`` in a child process and kill it for real; the torchrun test
launches two gloo workers on the CPU; torchrun's elastic agent restarts them after one is killed.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchrun import run_torchrun

from fluxlab.cli import main
from fluxlab.data import BadImageError, ImageTransform, ShardDataset, load_image
from fluxlab.data.shard_writer import folder_samples, shard_pattern, write_shards
from fluxlab.tasks.text_to_image import TextToImageTask
from fluxlab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)

FAST = ["--train.tensorboard=false", "--train.threads=1", "--data.limit=24", "--optim.batch_size=4"]
# Everything resume must restore: caption-dropout draws, random flips/jitter (global RNG), warmup +
# cosine LR, EMA, AdamW moments, gradient accumulation and the data position.
EXACT = [
    "--config",
    "debug",
    *FAST,
    "--data.caption_dropout=0.5",
    "--data.hflip=true",
    "--data.color_jitter=0.2",
    "--optim.warmup_steps=3",
    "--optim.schedule=cosine",
    "--optim.ema_decay=0.9",
    "--optim.grad_accum=2",
    "--train.sample_every=1000",
    "--train.keep_last=2",
]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, EMA, optimizer moments, LR schedule, RNG and data position all bitwise equal.

    (Dropout, t and noise come from per-sample generators seeded by the data position: no state to
    compare.)
    """
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs"
    sa = torch.load(a / "train_state.pt", weights_only=False)
    sb = torch.load(b / "train_state.pt", weights_only=False)
    assert (sa["step"], sa["batches_seen"]) == (sb["step"], sb["batches_seen"])
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["torch_rng"], sb["torch_rng"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(pa[key], pb[key]), key


def _child(args: list[str], log: Path, script: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "fluxlab.cli"]
    return subprocess.Popen([*cmd, *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"child exited ({proc.returncode}) before the kill point:\n"
                + log.read_text()[-3000:]
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child never reached the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


# -------------------------------------------------------------------------------------- 1. SIGKILL
def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path: Path, capsys) -> None:
    n = 40
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = [*EXACT, f"--optim.steps={n}", "--train.checkpoint_every=3"]
    log = tmp_path / "child.log"
    proc = _child(["train", *common, f"--train.output_dir={killed}"], log)
    # Kill wherever training is once a checkpoint exists: mid-step, mid-save, anywhere.
    _wait_for(lambda: bool(list_checkpoints(killed)), proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not _ckpt(killed, n).exists(), (
        "the child finished before it was killed; the test proves nothing"
    )

    assert main(["train", *common, f"--train.output_dir={straight}"]) == 0
    with open(killed / "log.jsonl", "a") as f:  # as if the kill had landed mid-line
        f.write('{"step": 9999, "lo')
    capsys.readouterr()
    assert main(["train", *common, f"--train.output_dir={killed}", "--resume"]) == 0
    assert f"resumed from {killed / 'checkpoints' / 'step_'}" in capsys.readouterr().out
    _assert_same_checkpoint(_ckpt(straight, n), _ckpt(killed, n))
    # The log reads as one run: what the killed process logged after its last checkpoint is gone.
    records = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, n + 1))
    # keep_last=2 held across the kill and the resume
    assert [p.name for p in list_checkpoints(killed)][-1] == _ckpt(killed, n).name
    assert len(list_checkpoints(killed)) == 2


# ----------------------------------------------------------------------------- 2. kill during save
SLOW_SAVE = """
import os, sys, time
from pathlib import Path
import fluxlab.train.checkpoint as ck

real = ck._fsync_file

def slow(path):
    # Inside the save of step {step}: every file written, manifest not yet, folder not yet renamed.
    if path.parent.name.startswith(".tmp-step_{step:07d}"):
        Path(sys.argv[1]).write_text("saving")
        time.sleep(600)
    real(path)

ck._fsync_file = slow
from fluxlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_save_keeps_previous_and_resume_falls_back(tmp_path: Path, capsys) -> None:
    run, marker, log = tmp_path / "run", tmp_path / "saving", tmp_path / "child.log"
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(step=4))
    common = [
        "--config",
        "debug",
        *FAST,
        "--optim.steps=6",
        "--train.checkpoint_every=2",
        "--train.sample_every=1000",
    ]
    proc = _child([str(marker), "train", *common, f"--train.output_dir={run}"], log, script)
    _wait_for(marker.exists, proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL

    partial = list((run / "checkpoints").glob(".tmp-step_0000004-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert verify_checkpoint(_ckpt(run, 2)) is None

    # The same half-written folder under its final name (a writer without the rename, a lost
    # directory update): resume must see it is incomplete, say so, and fall back to step 2.
    partial[0].rename(_ckpt(run, 4))
    with pytest.warns(UserWarning, match=r"step_0000004: no readable meta.json"):
        assert main(["train", *common, f"--train.output_dir={run}", "--resume"]) == 0
    assert f"resumed from {_ckpt(run, 2)} at step 2" in capsys.readouterr().out
    assert (
        verify_checkpoint(_ckpt(run, 4)) is None and verify_checkpoint(_ckpt(run, 6)) is None
    )  # rewritten whole
    assert not list((run / "checkpoints").glob(".tmp-*"))  # stale temporaries cleaned up


def _save(run: Path, step: int, keep_last: int) -> Path:
    sd = {"w": torch.full((64,), float(step))}
    return save_checkpoint(run, step, sd, sd, {"config": {}}, {"step": step}, keep_last=keep_last)


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])


def test_keep_last_never_prunes_the_valid_ones_for_a_corrupt_one(tmp_path: Path) -> None:
    _save(tmp_path, 2, keep_last=3)
    _truncate(
        _save(tmp_path, 6, keep_last=3)
    )  # a corrupt newer checkpoint left by an earlier life of the run
    new = _save(tmp_path, 4, keep_last=1)  # resumed from 2 and saved 4: by name, 6 is "newest"
    assert new.is_dir() and verify_checkpoint(new) is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000006"]
    with pytest.warns(UserWarning, match="step_0000006"):
        assert latest_checkpoint(tmp_path) == new

    # Corrupt folders older than the kept ones are pruned; valid ones count towards keep_last.
    other = tmp_path / "other"
    for s in (1, 2, 3):
        _save(other, s, keep_last=0)
    _truncate(_ckpt(other, 3))
    _save(other, 5, keep_last=2)
    assert [p.name for p in list_checkpoints(other)] == ["step_0000002", "step_0000005"]


# ------------------------------------------------------------------------------------- 3. bad data
def _png_bomb(path: Path, side: int = 20_000) -> None:
    """A tiny PNG whose header claims side² pixels (400 M: past PIL's and our bomb limits)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _make_messy_folder(root: Path) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    root.mkdir()
    good = {
        "rgb.jpg": lambda p: rgb.save(p, quality=90),
        "gray.jpg": lambda p: rgb.convert("L").save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p),
        "palette.gif": lambda p: rgb.convert("P").save(p),
        "palette_alpha.png": lambda p: rgb.convert("P").save(p, transparency=3),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "rgba.webp": lambda p: rgb.convert("RGBA").save(p),
        "gray16.png": lambda p: Image.fromarray(
            rng.integers(0, 65536, (20, 20), dtype=np.uint16)
        ).save(p),
        "la.png": lambda p: rgb.convert("LA").save(p),
    }
    for name, write in good.items():
        write(root / name)
        (root / name).with_suffix(".txt").write_text(f"a {name.split('.')[0]} picture")
    (root / "rgb.txt").unlink()  # a missing caption
    (root / "gray.txt").write_bytes(b"caf\xe9 au lait \xff")  # Latin-1, not UTF-8

    bad = [
        "truncated.jpg",
        "truncated.png",
        "truncated.webp",
        "empty.png",
        "garbage.jpg",
        "bomb.png",
    ]
    for name in bad[:3]:
        rgb.save(root / name)
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(400))
    _png_bomb(root / "bomb.png")
    for name in bad:
        (root / name).with_suffix(".txt").write_text("never seen")
    return list(good), bad


def test_training_runs_through_a_messy_folder(tmp_path: Path, capsys, caplog) -> None:
    folder, run = tmp_path / "messy", tmp_path / "run"
    good, bad = _make_messy_folder(folder)
    # Preconditions, so that the count below means what it says: odd modes decode, bad files raise.
    for name in good:
        assert load_image(folder / name).mode == "RGB", name
    for name in bad:
        with pytest.raises(BadImageError, match=name):
            load_image(folder / name)

    n = len(good) + len(
        bad
    )  # 15: batches of 5, three steps = exactly one epoch, every file read once
    args = [
        "train",
        "--config",
        "debug",
        f"--data.dataset={folder}",
        "--data.val_fraction=0",
        "--optim.batch_size=5",
        "--optim.steps=3",
        "--train.checkpoint_every=3",
        "--train.sample_every=1000",
        "--train.tensorboard=false",
        "--train.threads=1",
        f"--train.output_dir={run}",
    ]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    state = torch.load(_ckpt(run, 3) / "train_state.pt", weights_only=False)
    assert state["batches_seen"] * 5 == n
    assert state["skipped_images"] == len(bad)  # every bad file, and not one good one
    assert f"skipped {len(bad)} unreadable images" in capsys.readouterr().out
    logged = caplog.text
    for name in bad:
        assert name in logged, f"{name} was skipped without being named"
    assert "rgb.jpg" in logged and "no caption" in logged
    assert "gray.txt is not valid UTF-8" in logged
    weights = load_file(_ckpt(run, 3) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_training_runs_through_broken_shards(tmp_path: Path, capsys, caplog) -> None:
    """The same messy images as WebDataset shards, one shard cut in half by a failed copy."""
    _make_messy_folder(tmp_path / "messy")
    total, samples = folder_samples(tmp_path / "messy")
    paths = write_shards(samples, tmp_path / "shards", shard_size=5, total=total)
    with tarfile.open(paths[1]) as tar:  # cut inside an image's bytes, as a failed copy would
        image = [m for m in tar.getmembers() if m.size > 100][1]
    paths[1].write_bytes(paths[1].read_bytes()[: image.offset_data + image.size // 2])
    spec = shard_pattern(paths)
    items = list(ShardDataset(spec, ImageTransform(16), shuffle_buffer=0, epochs=1))
    n, n_bad = len(items), sum(item is None for item in items)
    assert (
        10 < n < total and n_bad >= 3
    )  # the cut shard gave what preceded the cut; bad images stay bad

    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "debug",
        f"--data.dataset={spec}",
        "--data.val_fraction=0",
        f"--optim.batch_size={n}",
        "--optim.steps=1",
        "--train.sample_every=1000",
        "--train.tensorboard=false",
        "--train.threads=1",
        f"--train.output_dir={run}",
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(args) == 0  # one batch = one epoch: every surviving sample read once
    assert f"shard {paths[1]} is broken" in caplog.text
    state = torch.load(_ckpt(run, 1) / "train_state.pt", weights_only=False)
    assert state["skipped_images"] == n_bad
    assert f"skipped {n_bad} unreadable images" in capsys.readouterr().out


# -------------------------------------------------------------------------------- 4. config errors
@pytest.mark.parametrize(
    "override, field",
    [
        ("--optim.bogus=1", "optim.bogus"),
        ("--optim.lr=fast", "optim.lr"),
        ("--train.checkpoint_every=[1]", "train.checkpoint_every"),
        ("--model.num_heads=3", "model.num_heads"),  # 64 wide: heads do not divide it
        ("--model.axes_dim=[4,4,4]", "model.axes_dim"),  # 12 ≠ head dim 32
        ("--data.resolution=18", "data.resolution"),  # patch 4
        ("--train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    ],
)
def test_config_error_is_one_line_before_any_work(
    tmp_path: Path, capsys, override: str, field: str
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", "debug", f"--train.output_dir={run}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxlab train: error: ") and err.count("\n") == 1, err
    assert field in err
    assert not run.exists()


def test_yaml_and_data_errors_leave_no_run_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"base: debug\ntrain:\n  output_dir: {run}\nmodel:\n  hidden_size: 50\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.axes_dim" in err and "head dimension" in err and not run.exists()
    # Found only when the data is opened, still before a folder or checkpoint is made.
    assert (
        main(
            [
                "train",
                "--config",
                "debug",
                f"--train.output_dir={run}",
                f"--data.dataset={tmp_path / 'nope'}",
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err and not run.exists()


# ----------------------------------------------------------------------------------- 5. non-finite
def _poison_from(
    monkeypatch, start_call: int, stop_call: int | None = None, grad_only: bool = False
) -> None:
    """From loss call ``start_call`` on (until ``stop_call``), the loss or its gradient is NaN."""
    real = TextToImageTask.loss
    calls = {"n": 0}

    def loss(self, model, batch, generator, *args, **kwargs):
        per_sample, t = real(self, model, batch, generator, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= start_call and (stop_call is None or calls["n"] < stop_call):
            if grad_only:  # value unchanged, gradient NaN: d sqrt(z)/dz at z = 0 is inf, times 0
                zero = sum((p * 0).sum() for p in model.parameters())
                return per_sample + zero.sqrt(), t
            return per_sample * float("nan"), t
        return per_sample, t

    monkeypatch.setattr(TextToImageTask, "loss", loss)


@pytest.mark.parametrize("grad_only", [False, True])
def test_nonfinite_steps_are_skipped_and_counted(
    tmp_path: Path, monkeypatch, grad_only: bool
) -> None:
    run = tmp_path / "run"
    _poison_from(monkeypatch, start_call=3, stop_call=5, grad_only=grad_only)  # loss calls 3 and 4
    with pytest.warns(UserWarning, match="non-finite"):
        assert (
            main(
                [
                    "train",
                    "--config",
                    "debug",
                    *FAST,
                    "--optim.steps=4",
                    f"--train.output_dir={run}",
                ]
            )
            == 0
        )
    state = torch.load(_ckpt(run, 4) / "train_state.pt", weights_only=False)
    assert state["nonfinite_steps"] == 2 and state["batches_seen"] == 6
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert all(v is None or np.isfinite(v) for r in records for v in r["loss_per_t_bin"])
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(w).all() for w in load_file(_ckpt(run, 4) / name).values())


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tmp_path / "run"
    _poison_from(monkeypatch, start_call=3)  # steps 1-2 fine (checkpoint at 2), then NaN forever
    args = [
        "train",
        "--config",
        "debug",
        *FAST,
        "--optim.steps=8",
        "--train.max_nonfinite_steps=3",
        f"--train.output_dir={run}",
    ]
    with pytest.warns(UserWarning, match="non-finite"):
        assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [message] = [line for line in err.splitlines() if line.startswith("fluxlab train: error:")]
    assert (
        message.startswith("fluxlab train: error: 3 steps in a row")
        and "train.max_nonfinite_steps=3" in message
    )
    assert str(_ckpt(run, 2)) in message
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert verify_checkpoint(_ckpt(run, 2)) is None
    assert all(
        torch.isfinite(w).all() for w in load_file(_ckpt(run, 2) / "model.safetensors").values()
    )


# ----------------------------------------------------------------------------- 6. torchrun restart
KILL_RANK = """
import os, signal, sys
from fluxlab.train import trainer

real = trainer.Trainer.update_ema

def update_ema(self):
    real(self)
    # Rank 1 dies hard in the middle of step {kill_step}, in the first attempt only.
    first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    if self.dist.rank == 1 and first_attempt and self.step + 1 == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.Trainer.update_ema = update_ema
from fluxlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_torchrun_restarts_a_killed_rank_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_RANK.format(kill_step=3))
    args = ["--max-restarts=1", str(script), "train", "--config", "debug", *FAST]
    args += ["--optim.steps=4", "--train.checkpoint_every=2", "--train.sample_every=1000"]
    out = run_torchrun([*args, f"--train.output_dir={run}"], timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "exitcode: -9" in log, "rank 1 was never killed"
    assert f"resumed from {_ckpt(run, 2)} at step 2" in log
    assert verify_checkpoint(_ckpt(run, 4)) is None
    state = torch.load(_ckpt(run, 4) / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["rank_rng"]) == 2
    assert all(
        isinstance(name, str) for name in state["optimizer"]["state"]
    )  # keyed by parameter name
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3, redone after the restart, is logged once
