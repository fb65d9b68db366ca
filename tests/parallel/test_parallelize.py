"""Parallel training on the CPU with gloo: 2 processes must train exactly what 1 process trains.

One torchrun launch (2 workers) runs DDP, FSDP2 and HSDP + activation checkpointing + compile one
after the other in a shared process group, so the ~10 s launch is paid once. Each is compared with
a single-process reference on the same global batch (8 = 2 × 4), with gradient accumulation: losses
and final weights agree to float rounding. Checkpoints cross world sizes both ways: HSDP resumes the
reference's step-2 checkpoint at world size 2, and the reference resumes FSDP's step-2 checkpoint at
world size 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchrun import run_torchrun

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.config.sections import ParallelConfig
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.distributed import DistInfo
from fluxlab.parallel.parallelize import (
    blocks,
    check_training_memory,
    materialize_like,
    meta_copy,
    wrap_blocks,
)
from fluxlab.train.checkpoint import load_weights
from fluxlab.train.rng import SampleGenerators
from fluxlab.train.trainer import Trainer

STEPS = 4
COMMON = [
    "--train.tensorboard=false",
    "--train.threads=1",
    "--data.limit=32",
    "--optim.grad_accum=2",
    f"--optim.steps={STEPS}",
    "--train.checkpoint_every=2",
    "--train.sample_every=1000",
    "--train.log_every=1",
    "--data.caption_dropout=0.3",
    "--optim.warmup_steps=2",
]
WS1 = [*COMMON, "--optim.batch_size=8"]  # the same global batch as 2 processes × 4
WS2 = [*COMMON, "--optim.batch_size=4"]
TOL = 1e-5

WORKER = """
import json, sys
import torch.distributed as dist
from fluxlab.parallel import distributed
from fluxlab.config.loading import load_config
from fluxlab.train.trainer import Trainer

# Shared by every run below: the trainer leaves a group it did not create alone.
dist.init_process_group("gloo")
for args, resume in json.loads(open(sys.argv[1]).read()):
    Trainer(load_config("debug", args), resume=resume, quiet=True).train()
distributed.destroy_group()
"""

gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs gloo",
)


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _losses(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
    }


def _train(run: Path, extra: list[str], resume: bool = False) -> None:
    Trainer(
        load_config("debug", [*WS1, *extra, f"--train.output_dir={run}"]), resume=resume, quiet=True
    ).train()


def _seed_from(src: Path, dst: Path, step: int) -> None:
    """A new run folder holding only ``src``'s checkpoint ``step``: resuming it continues from
    there."""
    shutil.copytree(_ckpt(src, step), _ckpt(dst, step))


def _assert_close_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    """Weights of two checkpoints, whole (safetensors) or DCP shards (FSDP/HSDP), read as
    ``fluxlab sample`` does."""
    wa, wb = (load_weights(c, ema=name.startswith("ema")) for c in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        where = f"{name}:{k}"
        torch.testing.assert_close(
            wa[k], wb[k], atol=TOL, rtol=TOL, msg=lambda m, where=where: f"{where}: {m}"
        )


def _assert_same_losses(ref: dict[int, float], got: dict[int, float]) -> None:
    assert got and set(got) <= set(ref), (ref, got)
    for step, loss in got.items():
        assert abs(loss - ref[step]) < TOL, (step, ref[step], loss)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    out = {name: root / name for name in ("ref", "ddp", "fsdp", "hsdp", "to_ws1")}
    _train(out["ref"], [])  # one process: the reference
    _seed_from(out["ref"], out["hsdp"], 2)  # resumed at world size 2 (1 → 2)
    jobs = [
        ([*WS2, "--parallel.mode=ddp", f"--train.output_dir={out['ddp']}"], False),
        (
            [
                *WS2,
                "--parallel.mode=fsdp",
                "--train.tensorboard=true",
                f"--train.output_dir={out['fsdp']}",
            ],
            False,
        ),
        (
            [
                *WS2,
                "--parallel.mode=hsdp",
                "--parallel.replicate=2",
                "--parallel.activation_checkpointing=true",
                "--parallel.compile=true",
                "--parallel.compile_backend=aot_eager",
                f"--train.output_dir={out['hsdp']}",
            ],
            True,
        ),
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "worker.py").write_text(WORKER)
    proc = run_torchrun([str(root / "worker.py"), str(root / "jobs.json")], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


def _optimizer_state(ckpt: Path) -> dict:
    """The name-keyed optimizer state of a checkpoint, whether stored whole or as DCP shards."""
    state = torch.load(ckpt / "train_state.pt", weights_only=False)["optimizer"]
    if state != "optimizer":
        return state
    dcp_to_torch_save(ckpt / "optimizer", ckpt.parent / "optimizer.pt")
    return torch.load(ckpt.parent / "optimizer.pt", weights_only=False)["optimizer"]


@gloo
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_what_one_trains(runs: dict[str, Path], mode: str) -> None:
    ref, run = runs["ref"], runs[mode]
    _assert_same_losses(_losses(ref), _losses(run))
    assert set(_losses(run)) == set(range(1, STEPS + 1))
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_close_weights(_ckpt(ref, STEPS), _ckpt(run, STEPS), name)
    # The optimizer state is keyed by parameter name, however it was sharded (FSDP: DCP shards, no
    # rank-0 gather).
    sa, sb = _optimizer_state(_ckpt(ref, STEPS)), _optimizer_state(_ckpt(run, STEPS))
    assert (_ckpt(run, STEPS) / "optimizer").is_dir() == (mode == "fsdp")
    # FSDP: the weights too are DCP shards written by every rank, with no gathered safetensors copy
    assert (_ckpt(run, STEPS) / "weights").is_dir() == (mode == "fsdp")
    assert (_ckpt(run, STEPS) / "model.safetensors").is_file() == (mode != "fsdp")
    assert sa["state"].keys() == sb["state"].keys() and all(isinstance(k, str) for k in sa["state"])
    for k in sa["state"]:
        torch.testing.assert_close(
            sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"], atol=TOL, rtol=1e-4
        )


@gloo
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "hsdp"])
def test_two_processes_sample_what_one_samples(runs: dict[str, Path], mode: str) -> None:
    """The final grid: under FSDP/HSDP every rank runs the sharded EMA in lockstep and rank 0
    writes it."""
    name = f"samples/step_{STEPS:07d}.png"
    ref, got = (np.asarray(Image.open(runs[r] / name), dtype=np.int16) for r in ("ref", mode))
    assert ref.shape == got.shape and ref.std() > 1  # a real picture
    assert np.abs(ref - got).max() <= 2  # the weights agree to 1e-5: pixels to rounding


@gloo
def test_fsdp_writes_weight_histograms_gathered_from_the_shards(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    events = EventAccumulator(str(runs["fsdp"] / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()["histograms"]
    assert "predictions/output" in tags
    hist = events.Histograms("weights/double_blocks.0.img_attn.qkv.weight")[-1].histogram_value
    rows, cols = (
        Trainer(load_config("debug", [*WS1, f"--train.output_dir={tmp_path}"]), quiet=True)
        .model.double_blocks[0]
        .img_attn.qkv.weight.shape
    )
    assert hist.num == rows * cols  # the whole tensor, not rank 0's shard


@gloo
def test_hsdp_with_checkpointing_and_compile_resumes_a_one_process_checkpoint(
    runs: dict[str, Path],
) -> None:
    ref, run = runs["ref"], runs["hsdp"]
    assert set(_losses(run)) == {3, 4}  # resumed at step 2
    _assert_same_losses(_losses(ref), _losses(run))
    _assert_close_weights(_ckpt(ref, STEPS), _ckpt(run, STEPS))
    _assert_close_weights(_ckpt(ref, STEPS), _ckpt(run, STEPS), "ema.safetensors")


@gloo
def test_a_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Path]) -> None:
    ref, run = runs["ref"], runs["to_ws1"]
    _seed_from(runs["fsdp"], run, 2)
    with pytest.warns(UserWarning, match="written by 2 process"):
        _train(run, [], resume=True)
    assert set(_losses(run)) == {3, 4}
    _assert_same_losses(_losses(ref), _losses(run))
    _assert_close_weights(_ckpt(ref, STEPS), _ckpt(run, STEPS))


@pytest.mark.skipif(
    os.environ.get("FLUXLAB_SLOW_TESTS") != "1",
    reason="inductor compiles C++: set FLUXLAB_SLOW_TESTS=1",
)
def test_inductor_compile_trains_like_eager(tmp_path: Path) -> None:
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _train(eager, ["--optim.steps=2"])
    _train(
        compiled,
        ["--optim.steps=2", "--parallel.compile=true", "--parallel.activation_checkpointing=true"],
    )
    _assert_same_losses(_losses(eager), _losses(compiled))
    _assert_close_weights(_ckpt(eager, 2), _ckpt(compiled, 2))


# -------------------------------------------------------------------------------------------- units
def test_checkpointing_and_compile_keep_parameter_names_and_outputs() -> None:
    torch.manual_seed(0)
    params = flux_params("flux-debug", in_channels=12, context_in_dim=16, vec_in_dim=8)
    model = Flux(params)
    for p in model.parameters():  # adaLN-Zero would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    plain = Flux(params)
    plain.load_state_dict(model.state_dict())
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    wrap_blocks(
        model,
        ParallelConfig(activation_checkpointing=True, compile=True, compile_backend="aot_eager"),
    )
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    plain.load_state_dict(model.state_dict(), strict=True)  # and the other way round

    ids = torch.zeros(2, 4, 3)
    args = (
        torch.randn(2, 4, 12),
        ids,
        torch.randn(2, 3, 16),
        torch.zeros(2, 3, 3),
        torch.rand(2),
        torch.randn(2, 8),
    )
    out, ref = model(*args), plain(*args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(
            a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_checkpoint_every_wraps_every_nth_block_and_keeps_gradients() -> None:
    torch.manual_seed(0)
    params = flux_params(
        "flux-debug", in_channels=12, context_in_dim=16, vec_in_dim=8, depth_single_blocks=2
    )
    model, plain = Flux(params), Flux(params)
    for p in model.parameters():  # adaLN-Zero would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    plain.load_state_dict(model.state_dict())
    wrap_blocks(model, ParallelConfig(activation_checkpointing=True, checkpoint_every=2))
    wrapped = ["forward" in vars(block) for block in blocks(model)]
    assert wrapped == [i % 2 == 0 for i in range(len(wrapped))] and len(wrapped) > 2
    args = (
        torch.randn(2, 4, 12),
        torch.zeros(2, 4, 3),
        torch.randn(2, 3, 16),
        torch.zeros(2, 3, 3),
        torch.rand(2),
        torch.randn(2, 8),
    )
    model(*args).square().sum().backward()
    plain(*args).square().sum().backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="parallel.checkpoint_every"):
        load_config("debug", ["--parallel.checkpoint_every=0"])


def test_ranks_split_each_global_batch_and_draw_its_numbers() -> None:
    one = iter(InfiniteBatchSampler(24, 8, seed=3))
    two = [iter(InfiniteBatchSampler(24, 4, seed=3, rank=r, world=2)) for r in range(2)]
    for _ in range(5):  # across an epoch boundary
        batch, parts = next(one), [next(it) for it in two]
        assert batch[0::2] == parts[0] and batch[1::2] == parts[1]
    # per-sample generators: the same dropout, t and noise for a global position on any rank
    whole = SampleGenerators.for_batch(0, 7, 8, rank=0, world=1, device=torch.device("cpu"))
    halves = [
        SampleGenerators.for_batch(0, 7, 4, rank=r, world=2, device=torch.device("cpu"))
        for r in range(2)
    ]
    u, n = whole.rand(8), whole.randn((8, 5, 3))
    for r, g in enumerate(halves):
        assert torch.equal(g.rand(4), u[r::2]) and torch.equal(g.randn((4, 5, 3)), n[r::2])


@pytest.mark.parametrize(
    "overrides, world, field",
    [
        (["--parallel.mode=hsdp", "--parallel.replicate=3"], 4, "parallel.replicate"),
        (["--parallel.mode=fsdp", "--parallel.replicate=2"], 2, "parallel.replicate"),
        (["--parallel.replicate=0"], 1, "parallel.replicate"),
        (["--parallel.mode=zero3"], 1, "parallel.mode"),
    ],
)
def test_parallel_config_errors_name_the_field(
    overrides: list[str], world: int, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        load_config("debug", overrides).parallel.validate(world)


def test_fsdp_alone_and_hsdp_that_divides_are_fine() -> None:
    load_config("debug", ["--parallel.mode=fsdp"]).parallel.validate(1)
    load_config("debug", ["--parallel.mode=hsdp", "--parallel.replicate=2"]).parallel.validate(4)


def test_ema_copy_is_built_on_meta_then_filled_from_the_model() -> None:
    """The EMA never exists as a second whole model before sharding: a meta copy, then only this
    rank's part."""
    model = Flux(flux_params("flux-debug"))
    shadow = meta_copy(model)
    assert (
        all(p.is_meta and not p.requires_grad for p in shadow.parameters()) and not shadow.training
    )
    assert all(not p.is_meta for p in model.parameters())  # the model is untouched
    ema = materialize_like(shadow, model, ParallelConfig(), torch.device("cpu"), DistInfo())
    for (name, a), b in zip(ema.named_parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_training_that_cannot_fit_is_refused_with_the_gpus_it_needs() -> None:
    flux_dev, h200, h100 = 11_901_408_320, 143_771_000_000, 85_031_000_000
    check_training_memory(flux_dev, ParallelConfig(mode="fsdp"), 2, h200)  # 111 GiB per rank: fits
    with pytest.raises(
        ValueError, match=r"222 GiB per GPU .*parallel.mode=none over 1 .*at least 3 such GPUs"
    ):
        check_training_memory(flux_dev, ParallelConfig(), 1, h200)
    with pytest.raises(ValueError, match=r"parallel.mode=ddp over 4 .*at least 4 such GPUs"):
        check_training_memory(
            flux_dev, ParallelConfig(), 4, h100
        )  # DDP replicates: sharding is what helps
    with pytest.raises(
        ValueError, match=r"parallel.mode=hsdp over 4"
    ):  # 2 replicas of 2 shards on H100s
        check_training_memory(flux_dev, ParallelConfig(mode="hsdp", replicate=2), 4, h100)


@gloo
def test_sample_reads_a_checkpoint_of_dcp_weight_shards(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """`fluxlab sample` consolidates an FSDP checkpoint's weight shards in one process, as it would
    on a laptop."""
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(runs["fsdp"]),
                "--prompt",
                "red heart",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] > 0
