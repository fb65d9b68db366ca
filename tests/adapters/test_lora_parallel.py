"""LoRA under DDP and FSDP2 (gloo, 2 CPU processes): both train the adapter a single process
trains on the same global batch, to float rounding; DDP over an fp8-quantized base too (to its
bf16 roundings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import save_debug_base
from torchrun import run_torchrun

from fluxlab.adapters.lora import is_adapter_parameter
from fluxlab.config.loading import load_config
from fluxlab.train.checkpoint import load_weights
from fluxlab.train.trainer import Trainer

pytest.importorskip("diffusers", reason="builds the base folder (test extra)")
pytest.importorskip("peft", reason="LoRA training needs peft (the lora extra)")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs gloo",
)

WORKER = """
import json, sys
import torch.distributed as dist
from fluxlab.parallel import distributed
from fluxlab.config.loading import load_config
from fluxlab.train.trainer import Trainer

dist.init_process_group("gloo")
for args in json.loads(open(sys.argv[1]).read()):
    Trainer(load_config("debug", args), quiet=True).train()
distributed.destroy_group()
"""


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    """The step-4 adapter, from adapter-only safetensors or FSDP's DCP shards of the whole model."""
    weights = load_weights(run / "checkpoints" / "step_0000004", ema=False)
    return {k.replace(".default.", "."): v for k, v in weights.items() if is_adapter_parameter(k)}


def test_ddp_and_fsdp_train_the_single_process_adapter(tmp_path: Path) -> None:
    base = save_debug_base(tmp_path / "base")
    common = [
        "--train.tensorboard=false",
        "--train.threads=1",
        "--data.limit=32",
        "--optim.steps=4",
        "--optim.lr=1e-2",
        "--train.sample_every=1000",
        "--train.checkpoint_every=4",
        f"--model.init_from={base}",
        "--lora.enabled=true",
        "--lora.rank=4",
    ]
    fp8 = "--lora.base_quant=float8"  # DDP also over a quantized base, each rank quantizing it
    for name, extra in (("ref", []), ("ref-fp8", [fp8])):
        args = [*common, *extra, "--optim.batch_size=8", f"--train.output_dir={tmp_path / name}"]
        Trainer(load_config("debug", args), quiet=True).train()
    runs = {"ddp": ["--parallel.mode=ddp"], "fsdp": ["--parallel.mode=fsdp"]}
    runs["ddp-fp8"] = ["--parallel.mode=ddp", fp8]
    jobs = [
        [*common, *extra, "--optim.batch_size=4", f"--train.output_dir={tmp_path / name}"]
        for name, extra in runs.items()
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = run_torchrun([str(tmp_path / "worker.py"), str(tmp_path / "jobs.json")], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for name in runs:
        ref = _adapters(tmp_path / ("ref-fp8" if name.endswith("fp8") else "ref"))
        assert ref and any(v.abs().max() > 0 for k, v in ref.items() if ".lora_B." in k)
        got = _adapters(tmp_path / name)
        assert got.keys() == ref.keys(), name
        if not name.endswith("fp8"):
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=f"{name} {k}")
            continue
        # fp8 GEMMs write bf16: a float-rounding difference between half and whole batches flips
        # some of those roundings, and 4 steps at lr 1e-2 carry it on (0.2% on a 2-core CPU). The
        # same adapter means far closer to the single-process fp8 run than fp8 is to bf16 (~10%).
        bf16 = _adapters(tmp_path / "ref")
        to_fp8, fp8_to_bf16 = _distance(got, ref), _distance(bf16, ref)
        assert to_fp8 < 0.01 and to_fp8 < fp8_to_bf16 / 10, (name, to_fp8, fp8_to_bf16)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance of adapter ``a`` from ``b`` over all their tensors."""
    diff = sum((a[k].float() - b[k].float()).pow(2).sum() for k in b)
    return (diff / sum(b[k].float().pow(2).sum() for k in b)).sqrt().item()
