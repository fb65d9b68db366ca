"""The memory estimate: a quantized LoRA model's bytes exactly, its activations as a real CPU
step keeps them (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_helpers import fluxlab_twin, tiny_diffusers
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxlab.adapters.lora import add_lora
from fluxlab.adapters.memory import adapter_params, estimate, weight_bytes
from fluxlab.adapters.quantize import quantized_bytes
from fluxlab.bench.lora import smoke_params
from fluxlab.bench.transformer import make_inputs
from fluxlab.cli import main
from fluxlab.config.adapters import LoraConfig
from fluxlab.models.flux.model import Flux

pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")
pytest.importorskip("torchao", reason="int8/float8 bases need torchao (the quant extra)")


@pytest.mark.parametrize("kind", ["none", "int8", "float8", "nf4"])
def test_parameter_bytes_are_exact(kind: str) -> None:
    if kind == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (optional)")
    base = fluxlab_twin(tiny_diffusers())
    cfg = LoraConfig(enabled=True, rank=4, base_quant=kind, targets=["linear1", "img_attn.qkv"])
    model = add_lora(copy.deepcopy(base), cfg)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_params(base.params, cfg) == n_adapter
    measured = quantized_bytes(model) - 4 * n_adapter
    assert weight_bytes(base.params, kind, torch.float32) == measured
    if kind != "none":  # and the quantized base is the smaller
        assert measured < weight_bytes(base.params, "none", torch.float32)


def test_estimate_orders_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    base = fluxlab_twin(tiny_diffusers())
    rows = estimate(base.params, LoraConfig(enabled=True, rank=4), 64, 8)
    by = {r.quant: r for r in rows}
    assert by["nf4"].weights < by["float8"].weights < by["int8"].weights < by["none"].weights
    assert all(0 < r.activations_checkpointed < r.activations for r in rows)
    argv = ["train", "--config", "flux-dev-lora", "--estimate-memory", "--lora.rank=8"]
    assert main(argv) == 0  # the placeholders may stay: nothing is read
    out = capsys.readouterr().out
    assert "flux-dev, 1024² (4096 image + 512 text tokens)" in out and "| nf4 |" in out


@pytest.mark.parametrize("kind", ["none", "int8"])
def test_traced_activations_match_a_real_cpu_step(kind: str) -> None:
    """The meta-device trace against the bytes autograd really keeps in a bf16-autocast forward
    of a whole tiny Flux on the CPU with SDPA's flash kernel (the embedders' few on top)."""
    params = smoke_params(depth=2, depth_single_blocks=3)
    torch.manual_seed(0)
    model = Flux(params).to(torch.bfloat16)
    cfg = LoraConfig(enabled=True, rank=4, base_dtype="bfloat16", base_quant=kind)
    add_lora(model, cfg)
    x = make_inputs(params, 1, 256, 256, 32, torch.device("cpu"))  # 256 image tokens
    del x["target"]
    seen = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    measured = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal measured
        if t.untyped_storage()._cdata not in seen:
            seen.add(t.untyped_storage()._cdata)
            measured += t.untyped_storage().nbytes()
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(**x)
    (row,) = estimate(params, cfg, 256, 32, kinds=(kind,))
    assert 0.95 < measured / row.activations < 1.05, (measured, row.activations)


def test_checkpointing_fewer_blocks_keeps_more_activations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fluxlab.models.flux.presets import flux_params

    params, lora = flux_params("flux-dev"), LoraConfig(enabled=True, rank=16)
    acts = [
        estimate(params, lora, 4096, 512, kinds=("none",), checkpoint_every=n)[0]
        for n in (1, 2, 3, 10_000)
    ]
    kept = [a.activations_checkpointed for a in acts]
    assert kept[0] < kept[1] < kept[2] < kept[3]  # block 0 is always checkpointed
    argv = ["train", "--config", "flux-dev-lora", "--estimate-memory"]
    assert main([*argv, "--parallel.checkpoint_every=2"]) == 0
    assert "checkpointing one block in 2" in capsys.readouterr().out
