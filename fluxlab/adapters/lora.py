"""LoRA (or LoKr) on a Flux with peft: adapters in the BFL-named Linears, every base weight frozen.

peft swaps each targeted ``nn.Linear`` for a LoRA layer that keeps it as ``base_layer``, so the
model's parameters become ``<module>.base_layer.weight`` (frozen) and
``<module>.lora_A.default.weight`` / ``lora_B.default.weight`` (trained). Checkpoints hold only
the adapter, named ``<module>.lora_A.weight`` / ``.lora_B.weight``; the base comes back from
``model.init_from``. ``lora.kind=lokr`` injects peft's LoKr layers instead: their parameters are
``<module>.lokr_w1.default`` etc., checkpointed as ``<module>.lokr_w1`` (adapters/lokr.py).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fluxlab.adapters.formats import AdapterWeights, LoraPair
from fluxlab.adapters.lokr import is_lokr_key, lokr_weights
from fluxlab.adapters.quantize import quantize_base
from fluxlab.config.adapters import LoraConfig
from fluxlab.models.flux.model import Flux

ADAPTER = "default"  # peft's adapter name; fluxlab trains one adapter at a time
_A, _B = ".lora_A.", ".lora_B."


def add_lora(model: Flux, cfg: LoraConfig) -> Flux:
    """Freezes ``model`` and injects peft LoRA layers into ``cfg.targets`` (in place).

    B starts at zero (peft's default), so the adapted model starts as the base; the adapter
    weights are float32 whatever ``cfg.base_dtype`` stores the base in; ``cfg.base_quant``
    then quantizes the frozen block Linears where the model lies (``adapters/quantize.py``)."""
    try:  # peft is optional (the `lora` extra) and slow to import, so loaded only for LoRA runs
        from peft import LoKrConfig, inject_adapter_in_model
        from peft import LoraConfig as PeftLoraConfig
    except ImportError as err:
        raise ValueError(
            "lora.enabled needs peft: pip install 'fluxlab[lora]' (or pip install peft)"
        ) from err
    model.requires_grad_(False)
    if cfg.base_dtype == "bfloat16":
        model.to(torch.bfloat16)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    peft_config: LoKrConfig | PeftLoraConfig
    if cfg.kind == "lokr":  # LoKr's dropout drops rows of ΔW: the nearest to LoRA's input dropout
        peft_config = LoKrConfig(
            r=cfg.rank,
            alpha=alpha,
            rank_dropout=cfg.dropout,
            target_modules=list(cfg.targets),
            decompose_both=cfg.lokr_decompose_both,
            decompose_factor=cfg.lokr_factor,
        )
    else:
        peft_config = PeftLoraConfig(
            r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets)
        )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        adapter = is_adapter_parameter(name)
        if adapter and param.dtype != torch.float32:
            param.data = param.data.float()
        param.requires_grad_(adapter)
    quantize_base(model, cfg.base_quant, next(model.parameters()).device)
    return model


def is_adapter_parameter(name: str) -> bool:
    return _A in name or _B in name or is_lokr_key(name)


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter_parameter(name) for name, _ in model.named_parameters())


def _checkpoint_name(name: str) -> str:
    # LoRA's are ``lora_A.default.weight``, LoKr's (ParameterDict entries) ``lokr_w1.default``
    return name.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights, named ``<module>.lora_A.weight`` / ``.lora_B.weight`` (LoKr:
    ``<module>.lokr_w1`` ...), on the CPU."""
    return {
        _checkpoint_name(name): param.detach().cpu()
        for name, param in model.named_parameters()
        if is_adapter_parameter(name)
    }


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copies checkpoint adapter weights into ``model``'s adapters; every one must be there."""
    params = {
        _checkpoint_name(name): param
        for name, param in model.named_parameters()
        if is_adapter_parameter(name)
    }
    adapters = {k: v for k, v in state.items() if is_adapter_parameter(k)}
    if adapters.keys() != params.keys():
        missing = sorted(params.keys() - adapters.keys())[:3]
        unexpected = sorted(adapters.keys() - params.keys())[:3]
        raise ValueError(
            f"the checkpoint's adapters do not match this model's (missing {missing}, unexpected "
            f"{unexpected}): resume with the same lora.targets and model"
        )
    for key, param in params.items():
        param.copy_(adapters[key])


def lora_weights(state: dict[str, Tensor], cfg: LoraConfig) -> AdapterWeights:
    """``LoraWeights`` of the adapter weights in ``state``, trained under ``cfg`` (its alpha);
    ``LokrWeights`` for ``lora.kind=lokr``."""
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    # FSDP checkpoints hold the whole model under peft's names: keep the adapters, renamed.
    state = {_checkpoint_name(k): v for k, v in state.items() if is_adapter_parameter(k)}
    if cfg.kind == "lokr":
        return lokr_weights(state, alpha / cfg.rank)
    modules = sorted({key.split(_A)[0] for key in state if _A in key})
    return {m: LoraPair(state[f"{m}{_A}weight"], state[f"{m}{_B}weight"], alpha) for m in modules}


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The frozen base's weights under the plain Flux names (peft's ``.base_layer`` removed)."""
    return {
        name.replace(".base_layer.", "."): param.detach()
        for name, param in model.named_parameters()
        if not is_adapter_parameter(name)
    }


def shared_base_copy(model: nn.Module) -> nn.Module:
    """A copy of a LoRA model sharing its frozen base tensors, with its own adapter weights.

    The EMA of a LoRA run: only the adapters differ from the trained model, so the base (all but a
    few MB of it) is not held twice."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        own = param.requires_grad
        memo[id(param)] = (
            nn.Parameter(param.detach().clone(), requires_grad=False) if own else param
        )
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo).eval()
