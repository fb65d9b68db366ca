"""The implementations ``fluxlab bench`` compares: our Flux, diffusers' ``FluxTransformer2DModel``
with the same weights, ours without the sampling GEMM epilogues, and fp8 variants of ours (torchao
float8 training, fp8 sampling) and of diffusers (the peers' torchao recipe, sampling only).

Each builds its model, applies what fluxlab's trainer or sampler would apply from outside (the
attention kernel, fp8, the epilogues), compiles it, and calls it on the benchmark's input dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.weights.flux_diffusers import bfl_to_diffusers
from fluxlab.parallel.attention_kernels import (
    attention_function,
    use_attention,
    use_sampling_attention,
)
from fluxlab.parallel.cuda_graphs import CUDAGraphed
from fluxlab.parallel.epilogues import use_inference_epilogues
from fluxlab.parallel.float8 import (
    convert_to_float8_training,
    float8_unsupported,
    quantize_for_sampling,
)
from fluxlab.parallel.fp8_gelu import use_fused_fp8_gelu


def diffusers_inputs(inputs: dict[str, Tensor]) -> dict[str, Any]:
    """The same tensors under diffusers' argument names (2-D ids, as current diffusers expects)."""
    return dict(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs["guidance"],
        return_dict=False,
    )


def parse_compile_spec(spec: str) -> tuple[str, dict[str, Any], bool]:
    """``spec`` (see :meth:`Impl.compile`) as (scope, torch.compile's keyword arguments, whether
    to wrap the forward in one CUDA graph); a ValueError for one that cannot run."""
    scope, *extras = spec.split("+")
    unknown = set(extras) - {"max", "graphs", "tune", "cudagraph"}
    exclusive = len(set(extras) & {"max", "graphs", "tune"}) > 1  # a mode, or options
    if scope not in ("eager", "block", "full") or unknown or exclusive:
        raise ValueError(
            f"compile spec {spec!r}: expected eager, block or full, optionally one of +max, "
            "+graphs, +tune, and +cudagraph"
        )
    mode = None
    if "max" in extras:
        mode = "max-autotune-no-cudagraphs"
    elif "graphs" in extras:
        mode = "reduce-overhead"
    options = {"coordinate_descent_tuning": True} if "tune" in extras else None
    return scope, dict(mode=mode, options=options), "cudagraph" in extras


class Impl:
    """One implementation under test: builds the model and calls it on our input dict."""

    name = "fluxlab"
    fullgraph = True
    trains = True  # False: an inference-only recipe

    def unsupported(self, device: torch.device) -> str | None:
        """Why this implementation cannot run on ``device`` (None: it can)."""
        return None

    def build(
        self, params: FluxParams, device: torch.device, dtype: torch.dtype, seed: int
    ) -> nn.Module:
        torch.manual_seed(seed)
        with torch.device(device), _default_dtype(dtype):
            return Flux(params)

    def set_attention(self, model: nn.Module, attention: Sequence[str]) -> None:
        """Sets the attention kernel named in ``attention`` (fa4, cudnn-forward, else SDPA) on our
        blocks."""
        use_attention(model, attention_function(attention))

    def prepare_training(self, model: nn.Module) -> None:
        """What fluxlab's trainer converts before building the optimizer and compiling."""

    def prepare_inference(self, model: nn.Module) -> None:
        """The sampling path fluxlab's pipeline runs on CUDA: the GEMM epilogues and its attention
        kernel (FA4 where installed); a case's explicit kernels override the latter."""
        use_inference_epilogues(model)
        use_sampling_attention(model)

    def forward(self, model: nn.Module, x: dict[str, Tensor]) -> Tensor:
        return model(
            x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"]
        )

    def compile(self, model: nn.Module, spec: str) -> nn.Module:
        """``spec``: ``eager``, ``block`` or ``full``, then optional ``+`` extras: ``max``
        (inductor's GEMM autotuning with epilogue fusion, no CUDA graphs), ``graphs`` (CUDA graphs
        per compiled graph, mode reduce-overhead), ``tune`` (inductor's coordinate-descent tuning
        of its Triton kernels), ``cudagraph`` (one CUDA graph around the whole forward, as
        ``fluxlab sample`` replays it)."""
        scope, kwargs, cudagraph = parse_compile_spec(spec)
        if scope == "full":
            model = torch.compile(model, **kwargs)
        elif scope == "block":
            for block in self.blocks(model):
                # The bound forward, not the module: hooks (FSDP2's all-gather) stay outside the
                # graph and the state-dict keys stay unchanged.
                block.forward = torch.compile(block.forward, fullgraph=self.fullgraph, **kwargs)
        return CUDAGraphed(model) if cudagraph else model

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.double_blocks, *model.single_blocks]


class DiffusersImpl(Impl):
    """diffusers' model with our weights; its attention goes through SDPA's kernels only."""

    name = "diffusers"
    fullgraph = False

    def build(
        self, params: FluxParams, device: torch.device, dtype: torch.dtype, seed: int
    ) -> nn.Module:
        # diffusers is an optional dependency: only this implementation needs it.
        from diffusers import FluxTransformer2DModel

        # Ours is built on the GPU: a CPU init of flux-dev takes minutes.
        sd = bfl_to_diffusers(Impl().build(params, device, dtype, seed).state_dict(), params)
        with torch.device("meta"):
            model = FluxTransformer2DModel(
                in_channels=params.in_channels,
                num_layers=params.depth,
                num_single_layers=params.depth_single_blocks,
                attention_head_dim=params.hidden_size // params.num_heads,
                num_attention_heads=params.num_heads,
                joint_attention_dim=params.context_in_dim,
                pooled_projection_dim=params.vec_in_dim,
                guidance_embeds=params.guidance_embed,
                axes_dims_rope=tuple(params.axes_dim),
            )
        model.load_state_dict(sd, assign=True, strict=True)
        return model.to(device)

    def set_attention(self, model: nn.Module, attention: Sequence[str]) -> None:
        pass  # SDPA's kernels, restricted by sdpa_backends around the step

    def prepare_inference(self, model: nn.Module) -> None:
        pass

    def forward(self, model: nn.Module, x: dict[str, Tensor]) -> Tensor:
        # diffusers multiplies timestep and guidance by 1000 itself, as our embedder does.
        return model(**diffusers_inputs(x))[0]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.transformer_blocks, *model.single_transformer_blocks]


class PlainGemmImpl(Impl):
    """fluxlab without the sampling GEMM epilogues (the GELU as its own kernel, linear2 on a
    concatenation): what the epilogues buy."""

    name = "fluxlab-plain"

    def prepare_inference(self, model: nn.Module) -> None:
        use_sampling_attention(model)


class Float8Impl(Impl):
    """fluxlab with fp8 matmuls in the blocks: torchao float8 training (``parallel.float8``,
    tensorwise scales) and fp8 sampling (``fluxlab sample --fp8``)."""

    name = "fluxlab-fp8"
    recipe = "tensorwise"

    def unsupported(self, device: torch.device) -> str | None:
        return float8_unsupported(device)

    def prepare_training(self, model: nn.Module) -> None:
        convert_to_float8_training(model, self.recipe, _device_of(model))

    def prepare_inference(self, model: nn.Module) -> None:
        # As fluxlab sample --fp8: torchao's fp8 linears, each MLP's GELU quantized in one pass.
        # No epilogue classes: they would step aside for fp8 weights anyway (same function).
        quantize_for_sampling(model, _device_of(model))
        use_fused_fp8_gelu(model)
        use_sampling_attention(model)


class RowwiseFloat8Impl(Float8Impl):
    """``fluxlab-fp8`` training with row-wise scales (``parallel.float8=rowwise``); sampling is
    row-wise either way."""

    name = "fluxlab-fp8-rowwise"
    recipe = "rowwise"


class UnfusedFloat8Impl(Float8Impl):
    """``fluxlab-fp8`` sampling with torchao's fp8 linears alone, the GELU quantized by inductor
    (a bench variant: what the one-pass kernel of ``parallel/fp8_gelu.py`` buys)."""

    name = "fluxlab-fp8-unfused"

    def prepare_inference(self, model: nn.Module) -> None:
        quantize_for_sampling(model, _device_of(model))
        use_sampling_attention(model)


class TensorwiseSamplingFloat8Impl(Float8Impl):
    """``fluxlab-fp8`` sampling with one scale per activation and weight tensor instead of one
    per row (a bench variant: which quantisation and GEMM kernels are faster)."""

    name = "fluxlab-fp8-tensorwise"

    def prepare_inference(self, model: nn.Module) -> None:
        quantize_for_sampling(model, _device_of(model), granularity="tensorwise")
        use_sampling_attention(model)


class DiffusersFloat8Impl(DiffusersImpl):
    """diffusers with the peers' fp8 recipe: torchao's ``quantize_`` with
    ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` over every linear layer it takes."""

    name = "diffusers-fp8"
    trains = False

    def unsupported(self, device: torch.device) -> str | None:
        return float8_unsupported(device)

    def prepare_inference(self, model: nn.Module) -> None:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


IMPLS: dict[str, type[Impl]] = {
    "fluxlab": Impl,
    "diffusers": DiffusersImpl,
    "fluxlab-plain": PlainGemmImpl,
    "fluxlab-fp8": Float8Impl,
    "fluxlab-fp8-rowwise": RowwiseFloat8Impl,
    "fluxlab-fp8-tensorwise": TensorwiseSamplingFloat8Impl,
    "fluxlab-fp8-unfused": UnfusedFloat8Impl,
    "diffusers-fp8": DiffusersFloat8Impl,
}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
