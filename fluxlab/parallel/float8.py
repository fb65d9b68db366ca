"""fp8 matmuls for the transformer blocks' large linear layers, applied from outside the model.

Training (``parallel.float8``): torchao's ``convert_to_float8_training`` swaps the selected
``nn.Linear`` modules for ``Float8Linear`` (dynamic scales, tensorwise or rowwise), before
activation checkpointing, compile and FSDP (torchtitan's order: its model converters run right
after the model is built, then ``parallelize``). Weights, gradients, parameter names and
checkpoints stay as they were: only the matmuls run in fp8.

Sampling (``fluxlab sample --fp8``): torchao's ``quantize_`` with
``Float8DynamicActivationFloat8WeightConfig(PerRow())`` stores the same layers' weights in fp8 and
quantizes their inputs row by row at each call.

Both need an NVIDIA GPU of compute capability 8.9 or newer (``torch._scaled_mm``). Tests run the
training conversion on the CPU with torchao's ``emulate`` option.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

RECIPES = ("tensorwise", "rowwise")
# The repeated blocks' module lists (Flux, then DiT): only layers inside them are converted.
_BLOCK_LISTS = ("double_blocks", "single_blocks", "blocks")
# Conditioning-vector projections: matrix-vector products (one row per image), nothing for fp8 to
# speed up, and their weight-gradient matmul's inner dimension is the batch, below fp8's 16.
_MODULATION = ("img_mod", "txt_mod", "modulation", "adaLN_modulation")
_ALIGN = 16  # torch._scaled_mm needs both weight dimensions to be multiples of 16


def float8_layer(module: nn.Module, fqn: str) -> bool:
    """Whether the linear layer at ``fqn`` computes in fp8: the attention and MLP linears of the
    transformer blocks, with both dimensions multiples of 16.

    Embedders, modulations and the final layer stay bf16: <1% of the FLOPs, and the model's
    inputs, conditioning and output are where fp8's 3-bit mantissa would cost the most accuracy.
    """
    if not isinstance(module, nn.Linear):
        return False
    parts = fqn.split(".")
    if parts[0] not in _BLOCK_LISTS or any(p in _MODULATION for p in parts):
        return False
    return module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0


def float8_layer_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s linear layers that :func:`float8_layer` selects."""
    return [name for name, m in model.named_modules() if float8_layer(m, name)]


def float8_unsupported(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'fluxlab[quant]')"
    if device.type != "cuda":
        return f"this run is on {device.type}, and fp8 matmuls need an NVIDIA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability "
            f"{capability[0]}.{capability[1]}, and fp8 matmuls need 8.9 or newer (Ada, Hopper, "
            "Blackwell)"
        )
    return None


def require_float8(device: torch.device, setting: str, instead: str) -> None:
    """A ValueError naming ``setting`` (and what to do ``instead``) when fp8 matmuls cannot run on
    ``device``."""
    reason = float8_unsupported(device)
    if reason is not None:
        raise ValueError(
            f"{setting} computes the transformer's matmuls in fp8, but {reason}: {instead}"
        )


def float8_training_config(recipe: str, emulate: bool = False) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe`` (tensorwise or rowwise).

    ``pad_inner_dim``: the weight-gradient matmul's inner dimension is the token count, which text
    lengths and Kontext conditions make any number; torchao zero-pads it to 16 only when needed.
    ``emulate`` runs the matmuls in fp32 on fp8-rounded operands (CPU tests).
    """
    if recipe not in RECIPES:
        raise ValueError(f"parallel.float8={recipe!r}: choose off or one of {list(RECIPES)}")
    from torchao.float8 import Float8LinearConfig

    base = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(base, pad_inner_dim=True, emulate=emulate)


def convert_to_float8_training(
    model: nn.Module, recipe: str, device: torch.device, emulate: bool = False
) -> nn.Module:
    """Swaps the :func:`float8_layer` linears of ``model`` for torchao ``Float8Linear`` modules
    (in place); returns ``model``. ``emulate`` skips the device check (CPU tests).

    Call it before compiling, checkpointing or sharding the blocks, and before building the
    optimizer (``MasterWeightAdamW`` then swaps bf16 weights into the fp8 layers as into any
    ``nn.Linear``).
    """
    if not emulate:  # first: without torchao, the config below cannot even be imported
        require_float8(device, f"parallel.float8={recipe}", "set parallel.float8=off")
    config = float8_training_config(recipe, emulate)
    from torchao.float8 import convert_to_float8_training as convert

    if not float8_layer_names(model):
        raise ValueError(
            f"parallel.float8={recipe}: {type(model).__name__} has no block linear layer whose "
            "dimensions are multiples of 16; set parallel.float8=off"
        )
    return convert(model, module_filter_fn=float8_layer, config=config)


class AutocastInputLinear(nn.Linear):
    """An ``nn.Linear`` whose input is cast to autocast's dtype before its fp8 weight sees it.

    A quantized weight takes ``F.linear`` before autocast would cast its input, so an fp32
    activation (a LayerNorm's output under autocast) would otherwise make the output fp32 too.
    """

    def forward(self, input: Tensor) -> Tensor:
        kind = input.device.type
        if torch.is_autocast_enabled(kind):
            input = input.to(torch.get_autocast_dtype(kind))
        return super().forward(input)


def quantize_for_sampling(
    model: nn.Module, device: torch.device, granularity: str = "rowwise"
) -> nn.Module:
    """fp8 weights and row-wise dynamic fp8 activations for the :func:`float8_layer` linears of
    ``model`` (in place, for sampling only: quantized weights have no gradient); returns it.

    Those layers' weights and biases are cast to bf16 first, the precision fluxlab samples in.
    """
    require_float8(device, "--fp8", "sample without --fp8")
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    names = float8_layer_names(model)
    if not names:
        raise ValueError(
            f"--fp8: {type(model).__name__} has no block linear layer whose dimensions are "
            "multiples of 16; sample without --fp8"
        )
    for name in names:
        layer = model.get_submodule(name)
        layer.to(torch.bfloat16)
        if type(layer) is nn.Linear:  # a class swap: parameters and state-dict keys unchanged
            layer.__class__ = AutocastInputLinear
    # set_inductor_config=False: torchao would otherwise switch on coordinate-descent tuning for
    # every later compile in the process; apply_fp8 asks for it on the blocks it compiles.
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if granularity == "rowwise" else PerTensor(),
        set_inductor_config=False,
    )
    chosen = set(names)
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen)
    return model


def is_plain_weight(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor (not an fp8 or other quantized tensor subclass)."""
    return type(t) in (Tensor, nn.Parameter)
