"""The whole stack at toy size: train → checkpoint → resume → sample, through the CLI."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.train.trainer import Trainer

FAST = ["--train.tensorboard=false", "--data.limit=24", "--optim.batch_size=4"]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def test_train_then_sample_through_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", "debug", f"--train.output_dir={run}", *FAST]) == 0
    ckpt = run / "checkpoints" / "step_0000004"
    assert (ckpt / "ema.safetensors").is_file() and (ckpt / "train_state.pt").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert (run / "config.json").is_file() and (run / "log.jsonl").read_text().count("\n") == 4
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--prompt",
                "red heart",
                "--num",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] >= 2 * 96  # two tiles, upscaled for legibility


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "--config",
        "debug",
        *FAST,
        "--data.caption_dropout=0.5",
        "--train.checkpoint_every=2",
    ]
    assert main(["train", *common, f"--train.output_dir={straight}"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--optim.steps=2"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--resume"]) == 0
    a, b = _weights(straight, 4), _weights(resumed, 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did something: the step-2 weights differ from the step-4 ones
    assert any(not torch.equal(a[k], _weights(resumed, 2)[k]) for k in a)


def test_loss_decreases_on_a_tiny_set(tmp_path: Path) -> None:
    cfg = load_config(
        "debug",
        [
            f"--train.output_dir={tmp_path}",
            "--train.tensorboard=false",
            "--data.limit=8",
            "--optim.batch_size=8",
            "--optim.steps=60",
            "--optim.lr=2e-3",
            "--data.caption_dropout=0",
            "--train.sample_every=1000",
            "--train.checkpoint_every=1000",
            "--train.log_every=10",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.7 * losses[0], losses


def test_batches_are_a_function_of_position() -> None:
    full = iter(InfiniteBatchSampler(10, 3, seed=1))
    seq = [next(full) for _ in range(7)]
    later = iter(InfiniteBatchSampler(10, 3, seed=1, start_batch=4))
    assert [next(later) for _ in range(3)] == seq[4:]
    epoch0 = sum(seq[:3], [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteBatchSampler(2, 3, seed=0)


def test_bad_config_exits_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", "debug", "--optim.bogus=1"]) == 2
    assert "optim.bogus" in capsys.readouterr().err
    run = f"--train.output_dir={tmp_path / 'run'}"
    assert main(["train", "--config", "debug", run, f"--data.dataset={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "nope"),
                "--prompt",
                "x",
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )


def test_simulated_world_trains_one_rank_and_writes_no_checkpoint(tmp_path, capsys) -> None:
    """`fluxlab train --simulate-world 2`: rank 0 of a fake 2-process FSDP job runs its steps and
    grid, and saves nothing."""
    out = tmp_path / "sim"
    args = [
        "train",
        "--config",
        "debug",
        "--simulate-world",
        "2",
        "--parallel.mode=fsdp",
        "--optim.steps=2",
        "--data.limit=16",
        "--train.tensorboard=false",
        f"--train.output_dir={out}",
    ]
    assert main(args) == 0
    assert not (out / "checkpoints").exists()
    assert (out / "samples" / "step_0000002.png").is_file()
    assert "no GPU, so no memory figure" in capsys.readouterr().out
    assert not dist.is_initialized()  # the fake group is gone: later tests start clean


def test_master_weights_train_and_resume_like_autocast(tmp_path: Path, capsys) -> None:
    """optim.master_weights (bf16 matmul weights, fp32 masters) trains exactly like autocast +
    AdamW, clipping and EMA included, and resumes from (and into) either kind of run."""
    common = [
        "--config",
        "debug",
        *FAST,
        "--train.mixed_precision=bf16",
        "--train.checkpoint_every=2",
        "--optim.grad_clip=0.05",
    ]
    autocast, master, mixed = tmp_path / "autocast", tmp_path / "master", tmp_path / "mixed"
    assert (
        main(["train", *common, f"--train.output_dir={autocast}", "--optim.master_weights=off"])
        == 0
    )
    assert (
        main(["train", *common, f"--train.output_dir={master}", "--optim.master_weights=on"]) == 0
    )
    assert "fp32 master weights" in capsys.readouterr().out
    # Two steps with autocast, two more with master weights from its checkpoint.
    assert (
        main(
            [
                "train",
                *common,
                f"--train.output_dir={mixed}",
                "--optim.steps=2",
                "--optim.master_weights=off",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                *common,
                f"--train.output_dir={mixed}",
                "--resume",
                "--optim.master_weights=on",
            ]
        )
        == 0
    )
    for name in ("model", "ema"):
        ref = load_file(autocast / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        for run in (master, mixed):
            got = load_file(run / "checkpoints" / "step_0000004" / f"{name}.safetensors")
            assert got.keys() == ref.keys()
            for k in ref:
                assert got[k].dtype == torch.float32, (run.name, k)
                torch.testing.assert_close(
                    got[k], ref[k], rtol=0, atol=0, msg=f"{run.name} {name} {k}"
                )


def test_master_weights_sum_accumulated_gradients_in_fp32(tmp_path: Path) -> None:
    common = [
        "--config",
        "debug",
        *FAST,
        "--train.mixed_precision=bf16",
        "--optim.grad_accum=2",
        "--optim.steps=3",
        "--optim.batch_size=2",
    ]
    for mode in ("off", "on"):
        assert (
            main(
                [
                    "train",
                    *common,
                    f"--train.output_dir={tmp_path / mode}",
                    f"--optim.master_weights={mode}",
                ]
            )
            == 0
        )
    ref, got = (
        load_file(tmp_path / m / "checkpoints" / "step_0000003" / "model.safetensors")
        for m in ("off", "on")
    )
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_master_weights_write_tensorboard_graph_and_histograms(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(
                [
                    "train",
                    "--config",
                    "debug",
                    "--data.limit=24",
                    "--optim.batch_size=4",
                    "--train.mixed_precision=bf16",
                    "--optim.master_weights=on",
                    f"--train.output_dir={tmp_path}",
                ]
            )
            == 0
        )
    assert not [w for w in caught if "TensorBoard" in str(w.message)], [
        str(w.message) for w in caught
    ]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert events.Graph() is not None
    # Histograms of the fp32 masters: the values of the checkpoint, not their bf16 roundings.
    hist = events.Histograms("weights/img_in.weight")[-1].histogram_value
    saved = _weights(tmp_path, 4)["img_in.weight"]
    assert hist.sum == pytest.approx(saved.sum().item(), rel=1e-5)


def test_master_weights_on_refuses_what_it_cannot_do(tmp_path: Path, capsys) -> None:
    args = [
        "train",
        "--config",
        "debug",
        *FAST,
        f"--train.output_dir={tmp_path}",
        "--optim.master_weights=on",
    ]
    assert main([*args, "--train.mixed_precision=bf16", "--parallel.mode=fsdp"]) == 2
    assert "without DDP/FSDP (parallel.mode resolves to fsdp)" in capsys.readouterr().err
    assert main(args) == 2  # fp32 on the CPU by default
    assert "bf16 mixed precision" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
