"""How much GPU memory a LoRA run needs, per frozen-base format, before renting the GPU.

Weights and adapters are counted exactly from the model's shapes (a Flux on the meta device) and
each format's storage (``quantize.py``). Activations are traced, not guessed: one double and one
single block at the real width and sequence length run forward on the meta device under
``saved_tensors_hooks``, which sum the bytes autograd keeps for backward (distinct storages,
weights excluded). Attention is counted as FlashAttention saves it (q, k, v, output and the
fp32 log-sum-exp), not as the math kernel a meta tensor would pick.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlab.adapters.quantize import FrozenQuantLinear, quantizable
from fluxlab.config.adapters import BASE_QUANTS, LoraConfig
from fluxlab.models.flux.layers import DoubleStreamBlock, SingleStreamBlock
from fluxlab.models.flux.model import Flux, FluxParams

GIB = 2**30
# Per trainable (float32) adapter parameter: the gradient, AdamW's two moments and the EMA copy.
STATE_BYTES_PER_ADAPTER_PARAM = 4 + 8 + 4


def quantized_linear_bytes(out_f: int, in_f: int, kind: str, dtype_bytes: int) -> int:
    """Storage of one quantized weight [out, in] (its bias stays in the base dtype, apart)."""
    n = out_f * in_f
    if kind == "none":
        return n * dtype_bytes
    if kind == "int8":  # int8 data, a float32 scale and an int8 zero point per row
        return n + out_f * 5
    if kind == "float8":  # e4m3 data, a float32 scale per row
        return n + out_f * 4
    # NF4 (bitsandbytes, blocks of 64, double quantization): 4 bits each, a uint8 absmax per
    # block, a float32 absmax per 256 blocks, the two code tables (16 and 256 float32) and
    # the float32 offset.
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 16 + 4 * 256 + 4


@dataclass
class MemoryEstimate:
    quant: str
    weights: int  # the frozen base as stored
    adapters: int  # float32 LoRA parameters
    training_state: int  # their gradients, AdamW moments and EMA
    activations: int  # saved for backward, every block kept
    activations_checkpointed: int  # block inputs + one block recomputed at a time

    def total(self, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.adapters + self.training_state + acts


def _meta_model(params: FluxParams) -> Flux:
    with torch.device("meta"):
        return Flux(params)


def weight_bytes(params: FluxParams, kind: str, dtype: torch.dtype) -> int:
    """The frozen base's bytes: block Linears in ``kind``, the rest in ``dtype``."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    model = _meta_model(params)
    quantized = {n for n, m in model.named_modules() if quantizable(n, m)} if kind != "none" else ()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if name in quantized and pname == "weight":
                total += quantized_linear_bytes(p.shape[0], p.shape[1], kind, size)
            else:
                total += p.numel() * size
    return total


def adapter_params(params: FluxParams, cfg: LoraConfig) -> int:
    """rank · (in + out) for every Linear whose name ends with one of ``cfg.targets``, as peft
    matches them."""
    model = _meta_model(params)
    return sum(
        cfg.rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and any(name == t or name.endswith("." + t) for t in cfg.targets)
    )


class _FlashLike(torch.autograd.Function):
    """SDPA's result, saving what FlashAttention saves for backward."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _MetaFrozen(FrozenQuantLinear):
    """A quantized layer's autograd footprint on the meta device (it saves nothing)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.register_buffer("weight", linear.weight.detach(), persistent=False)

    def compute(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized(self) -> Tensor:
        return self.weight


@contextmanager
def _saved_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Sums the distinct storages autograd saves inside the block (``exclude``: weights)."""
    seen: set[int] = set(exclude)
    total = [0]

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def block_activation_bytes(
    block: nn.Module, inputs: dict[str, Tensor], lora: LoraConfig, quantized: bool
) -> int:
    """Bytes one block saves for backward, traced on the meta device.

    The token streams carry gradients (an adapter upstream); ``vec`` only when an embedder that
    makes it has an adapter: else the frozen modulations save nothing."""
    block = copy.deepcopy(block)
    block.requires_grad_(False)
    if any(isinstance(m, nn.Linear) for m in block.modules()):
        _inject(block, lora)
    if quantized:
        for name, m in list(block.named_modules()):
            if type(m) is nn.Linear and ".lora_" not in name and not name.startswith("lora_"):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, _MetaFrozen(m))
    for m in block.modules():
        if hasattr(m, "attention_fn"):
            m.attention_fn = _FlashLike.apply
    # pe is shared by every block: the caller counts it once.
    shared = [*block.parameters(), *block.buffers(), inputs["pe"]]
    weights = {t.untyped_storage()._cdata for t in shared}
    vec_grad = any(t.startswith(("time_in", "vector_in", "guidance_in")) for t in lora.targets)
    grads = {"img", "txt", "x"} | ({"vec"} if vec_grad else set())
    x = {k: v.detach().requires_grad_(k in grads) for k, v in inputs.items()}
    with _saved_bytes(weights) as total:
        block(**x)
    return total[0]


def _inject(block: nn.Module, lora: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig  # optional, as in lora.py
    from peft import inject_adapter_in_model

    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    targets = [t for t in lora.targets if any(n == t or n.endswith("." + t) for n in names)]
    if targets:
        inject_adapter_in_model(PeftLoraConfig(r=lora.rank, target_modules=targets), block)
        block.to(torch.bfloat16)  # under autocast the adapters compute in bf16 too


def estimate(
    params: FluxParams,
    lora: LoraConfig,
    img_tokens: int,
    txt_tokens: int,
    batch: int = 1,
    kinds: tuple[str, ...] = BASE_QUANTS,
    checkpoint_every: int = 1,
) -> list[MemoryEstimate]:
    """One ``MemoryEstimate`` per base format, bf16 compute (``lora.base_dtype`` for the rest);
    "checkpointed" checkpoints every ``checkpoint_every``-th block (``parallel.checkpoint_every``)
    and keeps the others' activations."""
    dtype = torch.bfloat16 if lora.base_dtype == "bfloat16" else torch.float32
    d, seq = params.hidden_size, img_tokens + txt_tokens
    heads, head_dim = params.num_heads, params.hidden_size // params.num_heads
    with torch.device("meta"):
        double = DoubleStreamBlock(d, heads, params.mlp_ratio, params.qkv_bias).to(torch.bfloat16)
        single = SingleStreamBlock(d, heads, params.mlp_ratio).to(torch.bfloat16)
        img = torch.empty(batch, img_tokens, d, dtype=torch.bfloat16)
        txt = torch.empty(batch, txt_tokens, d, dtype=torch.bfloat16)
        x = torch.empty(batch, seq, d, dtype=torch.bfloat16)
        vec = torch.empty(batch, d, dtype=torch.bfloat16)
        pe = torch.empty(batch, 1, seq, head_dim // 2, 2, 2)
    n_adapter = adapter_params(params, lora)
    out = []
    for kind in kinds:
        q = kind != "none"
        per_double = block_activation_bytes(
            double, {"img": img, "txt": txt, "vec": vec, "pe": pe}, lora, q
        )
        per_single = block_activation_bytes(single, {"x": x, "vec": vec, "pe": pe}, lora, q)
        stream = seq * d * batch * 2  # one bf16 residual stream: what a checkpointed block keeps
        pe_bytes = pe.numel() * 4
        out.append(
            MemoryEstimate(
                quant=kind,
                weights=weight_bytes(params, kind, dtype),
                adapters=4 * n_adapter,
                training_state=STATE_BYTES_PER_ADAPTER_PARAM * n_adapter,
                activations=params.depth * per_double
                + params.depth_single_blocks * per_single
                + pe_bytes,
                activations_checkpointed=sum(
                    stream if i % checkpoint_every == 0 else full
                    for i, full in enumerate(
                        [per_double] * params.depth + [per_single] * params.depth_single_blocks
                    )
                )
                + max(per_double, per_single)
                + pe_bytes,
            )
        )
    return out


def report(rows: list[MemoryEstimate], title: str) -> str:
    lines = [
        title,
        "| base | weights | LoRA params | grads + AdamW + EMA | activations | with checkpointing "
        "| total | total, checkpointed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.weights, r.adapters, r.training_state, r.activations]
        cells += [r.activations_checkpointed, r.total(False), r.total(True)]
        lines.append(f"| {r.quant} | " + " | ".join(f"{c / GIB:.2f} GiB" for c in cells) + " |")
    lines.append(
        "Activations are what autograd saves (FlashAttention's footprint); the allocator's slack, "
        "cuBLAS workspaces and a backward's transient tensors come on top."
    )
    return "\n".join(lines)
