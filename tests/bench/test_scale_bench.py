"""fluxlab bench-scale: the multi-GPU throughput benchmark's plumbing, on CPU (gloo), tiny Flux."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from torchrun import run_torchrun

from fluxlab.cli import main
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params

TINY = [
    "--preset",
    "flux-debug",
    "--batch",
    "2",
    "--resolution",
    "64",
    "--txt-tokens",
    "8",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--device",
    "cpu",
]


def test_one_process(tmp_path: Path) -> None:
    out = tmp_path / "one.json"
    assert main(["bench-scale", "--mode", "none", *TINY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["world"] == 1 and r["mode"] == "none" and r["step_s"] > 0
    assert abs(r["images_per_s"] - 2 / r["step_s"]) < 1e-6


def test_fsdp_two_processes_with_checkpointing_and_compile(tmp_path: Path) -> None:
    out = tmp_path / "two.json"
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        "-m",
        "fluxlab.cli",
        "bench-scale",
        "--mode",
        "fsdp",
        "--activation-checkpointing",
        "--compile",
        "--compile-backend",
        "aot_eager",
        *TINY,
        "--json",
        str(out),
    ]
    proc = run_torchrun(cmd, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert (
        r["world"] == 2 and r["mode"] == "fsdp" and r["activation_checkpointing"] and r["compile"]
    )
    assert (
        abs(r["images_per_s"] - 4 / r["step_s"]) < 1e-6
    )  # the whole job's images: 2 ranks × batch 2
    assert len(r["peak_mem_gb_per_rank"]) == 2
    whole = sum(p.numel() for p in Flux(flux_params("flux-debug")).parameters())
    assert r["params_b"] == whole / 1e9  # the whole model, counted before sharding


def test_simulated_world_measures_one_shard_without_communication(tmp_path: Path) -> None:
    """--simulate-world 4: one process is rank 0 of 4 (fake process group), so it holds a quarter
    of each weight."""
    out = tmp_path / "sim.json"
    assert (
        main(["bench-scale", "--mode", "fsdp", *TINY, "--simulate-world", "4", "--json", str(out)])
        == 0
    )
    r = json.loads(out.read_text())
    assert r["world"] == 4 and r["mode"] == "fsdp" and r["simulated_world"] is True
    assert r["step_s_without_communication"] > 0
    # No throughput is claimed for a job that did not run.
    assert "images_per_s" not in r and "step_s" not in r
    assert len(r["peak_mem_gb_per_rank"]) == 1
    # A quarter, up to padding.
    assert abs(r["params_b_on_rank0"] - r["params_b"] / 4) < 1e-3 * r["params_b"]
    assert not dist.is_initialized()  # the fake group is torn down, so later tests start clean
