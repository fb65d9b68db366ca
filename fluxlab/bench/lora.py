"""LoRA training step on a frozen base: fluxlab (bf16, int8, float8, nf4 bases) against diffusers'
recipe (peft LoRA on ``FluxTransformer2DModel``, gradient checkpointing), in one process.

Both start from the same random weights and inputs; both checkpoint every block, train rank-r
float32 adapters with AdamW under bf16 autocast and freeze the rest in bf16. diffusers adapts the
modules its FLUX DreamBooth LoRA script names; fluxlab its default BFL targets (the same
projections, q/k/v fused). ``smoke`` runs a tiny model on the CPU for the tests.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxlab.adapters.lora import add_lora
from fluxlab.bench.impls import DiffusersImpl, Impl
from fluxlab.bench.transformer import make_inputs
from fluxlab.config.adapters import LoraConfig
from fluxlab.config.sections import ParallelConfig
from fluxlab.models.flux.model import FluxParams
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.attention_kernels import for_training, training_attention, use_attention
from fluxlab.parallel.parallelize import wrap_blocks

CASES = ("bf16", "int8", "float8", "nf4", "diffusers")
# diffusers' train_dreambooth_lora_flux.py default targets (attention and MLPs of the double
# blocks, the single blocks' q/k/v), plus the single blocks' proj_mlp and proj_out: the same
# projections fluxlab's default targets adapt (linear1 = q, k, v, proj_mlp; linear2 = proj_out).
DIFFUSERS_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]


def smoke_params(**overrides: object) -> FluxParams:
    """The tiny guidance-embedded Flux of ``--smoke`` (flux-debug with its own input widths)."""
    return flux_params(
        "flux-debug",
        in_channels=16,
        vec_in_dim=32,
        context_in_dim=32,
        guidance_embed=True,
        **overrides,
    )


def parse_case(case: str) -> tuple[str, ParallelConfig]:
    """``BASE[:compile][:acN]`` → (base, how fluxlab wraps its blocks). ``acN`` checkpoints every
    N-th block (``ac0``: none; default ``ac1``, every block, as diffusers' recipe)."""
    base, *mods = case.split(":")
    if base not in CASES or (base == "diffusers" and mods):
        raise ValueError(
            f"--lora-cases: {case!r} is not BASE[:compile][:acN] with BASE in {list(CASES)} "
            "(diffusers takes no modifiers)"
        )
    wrap = ParallelConfig(activation_checkpointing=True)
    for mod in mods:
        if mod == "compile":
            wrap.compile = True
        elif mod.startswith("ac") and mod[2:].isdigit():
            every = int(mod[2:])
            wrap.activation_checkpointing = every > 0
            wrap.checkpoint_every = max(every, 1)
        else:
            raise ValueError(f"--lora-cases: {case!r}: unknown modifier {mod!r} (compile, acN)")
    return base, wrap


def _build(case: str, params: FluxParams, rank: int, device: torch.device) -> nn.Module:
    case, wrap = parse_case(case)
    if device.type == "cpu":
        wrap.compile_backend = "aot_eager"  # the smoke test: no C compiler needed
    if case == "diffusers":
        from peft import LoraConfig as PeftLoraConfig  # optional, as the lora extra

        model = DiffusersImpl().build(params, device, torch.bfloat16, seed=0).requires_grad_(False)
        model.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=DIFFUSERS_TARGETS))
        for p in model.parameters():  # the script's cast_training_params(float32)
            if p.requires_grad:
                p.data = p.data.float()
        model.enable_gradient_checkpointing()
        return model.train()
    model = Impl().build(params, device, torch.bfloat16, seed=0)
    quant = "none" if case == "bf16" else case
    cfg = LoraConfig(enabled=True, rank=rank, base_dtype="bfloat16", base_quant=quant)
    add_lora(model, cfg)
    use_attention(model, training_attention(device))
    return wrap_blocks(model, wrap).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def bench_case(
    case: str,
    params: FluxParams,
    device: torch.device,
    resolution: int = 1024,
    txt_tokens: int = 512,
    rank: int = 16,
    iters: int = 5,
) -> dict[str, Any]:
    """Median seconds of one AdamW step (batch 1) and the peak GPU memory of ``case``."""
    if device.type == "cuda":  # the previous case's model is garbage by now
        gc.collect()
        torch.cuda.empty_cache()
    model = _build(case, params, rank, device)
    if device.type == "cuda":  # training's peak, not the build's (bf16 weights before quantizing)
        torch.cuda.reset_peak_memory_stats()
    impl = DiffusersImpl() if case == "diffusers" else Impl()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    x = make_inputs(params, 1, resolution, resolution, txt_tokens, device)

    def kernels() -> contextlib.AbstractContextManager[None]:
        """fluxlab runs as its trainer does (its SDPA kernels); diffusers with flash or efficient
        SDPA (PyTorch's own pick, cuDNN, hits an illegal memory access in this checkpointed
        backward on an H200). A fresh context each step: ``for_training``'s is single-use."""
        if not case == "diffusers":
            return for_training(device)
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])

    def step() -> Tensor:
        # The backward inside the kernel choice too: checkpointing recomputes the forward there.
        with kernels():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = impl.forward(model, x)
            loss = F.mse_loss(out.float(), x["target"])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step().item() for _ in range(2)]  # warm-up: kernels chosen, optimizer state made
    # The peak over the first steps (compiling included) and over the steady steps alone.
    first_peak = _peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    steady = _peak_gib(device)
    result = {
        "case": case,
        "step_s": sorted(times)[len(times) // 2],
        "peak_mem_gb": max(first_peak, steady) if device.type == "cuda" else None,
        "steady_peak_gb": steady,
        "adapter_params_m": sum(p.numel() for p in trainable) / 1e6,
        "first_losses": losses,
    }
    return result  # the model and its optimizer go with this frame, before the next case


def run(cases: list[str], smoke: bool, rank: int = 16) -> list[dict[str, Any]]:
    """Every case in turn; ``smoke``: the tiny model on the CPU at 64² (for the tests)."""
    for case in cases:
        parse_case(case)  # every name checked before the first model is built
    if smoke:
        params, device, res, txt = smoke_params(), "cpu", 64, 8
    else:
        if not torch.cuda.is_available():
            raise ValueError("fluxlab bench --what lora measures a GPU; add --smoke on a CPU")
        params, device, res, txt = flux_params("flux-dev"), "cuda", 1024, 512
    rows = []
    for case in cases:  # each row printed as it comes: a cut-off run keeps the cases it finished
        rows.append(
            bench_case(case, params, torch.device(device), res, txt, rank, 2 if smoke else 5)
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r["case"] == "diffusers"), None)
    lines = [
        "| base | step (s) | peak GiB | adapter params (M) | diffusers step / this | this peak / "
        "diffusers' |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{ref['step_s'] / r['step_s']:.2f}×" if ref else "–"
        peak = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "–"
        mem = (
            f"{r['peak_mem_gb'] / ref['peak_mem_gb']:.2f}"
            if ref and r["peak_mem_gb"] is not None
            else "–"
        )
        lines.append(
            f"| {r['case']} | {r['step_s']:.3f} | {peak} | {r['adapter_params_m']:.3f} | {speed} "
            f"| {mem} |"
        )
    return "\n".join(lines)
