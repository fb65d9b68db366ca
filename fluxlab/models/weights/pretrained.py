"""Released FLUX.1 checkpoints (dev, schnell, ...) loaded without a second copy of the weights.

The transformer is built on the meta device (no memory), then every tensor is read from its
safetensors shard (memory-mapped, straight onto the target device), renamed diffusers → BFL where
needed, cast and *assigned* as the parameter: a 12B model in bf16 costs its 24 GB once, plus at most
one fused q/k/v group in flight. Layouts:

* diffusers: ``FOLDER/transformer/`` (``config.json``, ``diffusion_pytorch_model*.safetensors``,
  perhaps an ``*.index.json``), ``FOLDER/vae/``, ``FOLDER/tokenizer*/``, ``FOLDER/text_encoder*/``
  (or the ``transformer/`` folder alone);
* BFL: ``flux1-dev.safetensors`` (``ae.safetensors`` beside it is the autoencoder).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from fluxlab.conditioning.text_encoders import FluxTextEncoder
from fluxlab.models.autoencoder import AutoEncoder
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.weights import flux_diffusers as convert
from fluxlab.models.weights.autoencoder_spec import load_autoencoder
from fluxlab.models.weights.flux_diffusers import flux_params_from_diffusers_config
from fluxlab.train.checkpoint import load_weights, read_description, resolve_checkpoint

# (BFL key, the diffusers keys it is made of, how they combine)
Plan = list[tuple[str, list[str], Callable[[list[Tensor]], Tensor]]]


def _single(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, dim=0)


def _swap(ts: list[Tensor]) -> Tensor:
    return convert._swap_halves(ts[0])


def diffusers_plan(params: FluxParams) -> Plan:
    """Where each BFL tensor comes from in a diffusers FluxTransformer2DModel (flux_diffusers'
    tables, per key)."""
    plan: Plan = []
    wb = ("weight", "bias")
    tops = dict(convert._TOP_LEVEL)
    if not params.guidance_embed:
        tops = {d: b for d, b in tops.items() if not b.startswith("guidance_in")}
    plan += [(f"{b}.{p}", [f"{d}.{p}"], _single) for d, b in tops.items() for p in wb]
    plan += [(f"final_layer.adaLN_modulation.1.{p}", [f"norm_out.linear.{p}"], _swap) for p in wb]
    groups = (
        (
            "transformer_blocks",
            "double_blocks",
            params.depth,
            convert._DOUBLE,
            convert._DOUBLE_NORMS,
            convert._DOUBLE_FUSED,
        ),
        (
            "single_transformer_blocks",
            "single_blocks",
            params.depth_single_blocks,
            convert._SINGLE,
            convert._SINGLE_NORMS,
            convert._SINGLE_FUSED,
        ),
    )
    for src, dst, n, renames, norms, fused in groups:
        for i in range(n):
            pre, out = f"{src}.{i}.", f"{dst}.{i}."
            plan += [
                (out + f"{b}.{p}", [pre + f"{d}.{p}"], _single)
                for d, b in renames.items()
                for p in wb
            ]
            plan += [(out + b, [pre + d], _single) for d, b in norms.items()]
            plan += [
                (out + f"{b}.{p}", [pre + f"{part}.{p}" for part in parts], _cat)
                for b, parts in fused.items()
                for p in wb
            ]
    return plan


def _weight_files(folder: Path) -> list[Path]:
    """The shards named by the index json (all of them, once), else every safetensors file."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder} has no *.safetensors weights: expected a diffusers transformer folder"
        )
    return files


class _Shards:
    """Lazy tensors from several safetensors files: key → file, read on demand onto ``device``."""

    def __init__(self, files: list[Path], device: str, stack: ExitStack):
        self.where: dict[str, Any] = {}
        self.meta: dict[str, str] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device=device))
            self.meta.update(handle.metadata() or {})
            for key in handle.keys():
                self.where[key] = handle

    def get(self, key: str) -> Tensor:
        return self.where[key].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return self.where[key].get_slice(key).get_shape()


def _assign(
    model: Flux, items: Iterator[tuple[str, Tensor]], dtype: torch.dtype, total: int, where: Path
) -> Flux:
    """Assigns each tensor as the model's parameter (no copy when it already has ``dtype``)."""
    params = dict(model.named_parameters())
    for key, tensor in tqdm(
        items, total=total, desc=f"loading {where.name}", unit="tensor", leave=False
    ):
        if key not in params:
            raise ValueError(f"{where}: unexpected tensor {key!r} for a Flux of these params")
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(params[key].shape)}"
            )
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(
            module,
            leaf,
            torch.nn.Parameter(tensor.to(dtype), requires_grad=params[key].requires_grad),
        )
    left = [k for k, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{where} lacks {len(left)} of the model's tensors, e.g. {left[:3]}")
    return model


def flux_params_from_bfl_state_dict(sd: dict[str, Tensor]) -> FluxParams:
    """FluxParams from BFL-named weights; the head count comes from the QK-norm width (the head
    dimension)."""
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim != 128:
        raise ValueError(
            f"cannot infer the RoPE axes of a BFL checkpoint with head dimension {head_dim}; "
            "use a diffusers folder (its transformer/config.json names them)"
        )
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")}
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")}
    return FluxParams(
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=len(blocks),
        depth_single_blocks=len(singles),
        mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def load_flux(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> Flux:
    """A pretrained Flux (eval mode) from a diffusers folder or a BFL ``.safetensors``; see the
    module docstring."""
    path = Path(path).expanduser()
    device = str(torch.device(device))
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    with ExitStack() as stack:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"{path} has no transformer/config.json: expected a diffusers FLUX folder, its "
                    "transformer/ folder, or a BFL flux1-*.safetensors file"
                )
            params = flux_params_from_diffusers_config(
                json.loads((path / "config.json").read_text())
            )
            shards = _Shards(_weight_files(path), device, stack)
            plan = diffusers_plan(params)
            missing = [k for _, srcs, _ in plan for k in srcs if k not in shards.where]
            extra = set(shards.where) - {k for _, srcs, _ in plan for k in srcs}
            if missing or extra:
                raise ValueError(
                    f"{path}: weights do not match its config.json (missing {missing[:3]}, "
                    f"unexpected {sorted(extra)[:3]})"
                )
            items = ((bfl, combine([shards.get(k) for k in srcs])) for bfl, srcs, combine in plan)
            total = len(plan)
        elif path.is_file() and path.suffix == ".safetensors":
            shards = _Shards([path], device, stack)
            if convert.is_diffusers_flux(dict.fromkeys(shards.where)):  # type: ignore[arg-type]
                raise ValueError(
                    f"{path} holds diffusers names: load its folder (with config.json) instead"
                )
            if "fluxlab_params" in shards.meta:
                params = FluxParams(**json.loads(shards.meta["fluxlab_params"]))
            else:
                shapes = {k: torch.empty(shards.shape(k), device="meta") for k in shards.where}
                params = flux_params_from_bfl_state_dict(shapes)
            items = ((k, shards.get(k)) for k in shards.where)
            total = len(shards.where)
        else:
            raise ValueError(
                f"no FLUX transformer at {path}: give a diffusers FLUX folder, its transformer/ "
                "folder, or a BFL flux1-*.safetensors file"
            )
        with torch.device("meta"):
            model = Flux(params)
        return _assign(model, items, dtype, total, path).eval()


@dataclass
class PretrainedFlux:
    model: Flux
    autoencoder: AutoEncoder
    text_encoder: FluxTextEncoder | None  # T5 + CLIP when the folder has them


def load_pretrained(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    text_encoder: bool = True,
    t5_max_length: int = 512,
) -> PretrainedFlux:
    """Transformer + autoencoder (+ T5/CLIP) of a FLUX.1 diffusers folder, or a BFL file with
    ae.safetensors beside it."""
    path = Path(path).expanduser()
    model = load_flux(path, device, dtype)
    root = path if path.is_dir() else path.parent
    if path.is_dir() and path.name == "transformer":
        root = path.parent
    ae_spec = root / "ae.safetensors" if not (root / "vae").is_dir() else root
    if not ae_spec.exists():
        raise ValueError(
            f"no autoencoder beside {path}: expected {root / 'vae'}/ or {root / 'ae.safetensors'}"
        )
    ae = load_autoencoder(str(ae_spec), device=device, dtype=dtype)
    encoder = None
    if text_encoder and (root / "text_encoder_2").is_dir():
        encoder = FluxTextEncoder(root, t5_max_length=t5_max_length, device=device, dtype=dtype)
    return PretrainedFlux(model, ae, encoder)


def is_fluxlab_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "meta.json").is_file() or (p / "checkpoints").is_dir()


def load_init_weights(
    spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[FluxParams | None, dict[str, Tensor] | Flux]:
    """``model.init_from``: a fluxlab run/checkpoint (its EMA weights and saved params) or a
    released FLUX."""
    if is_fluxlab_checkpoint(spec):
        ckpt = resolve_checkpoint(spec)
        desc = read_description(ckpt)
        params = FluxParams(**desc["model_params"]) if "model_params" in desc else None
        return params, {k: v.to(device, dtype) for k, v in load_weights(ckpt, ema=True).items()}
    model = load_flux(spec, device, dtype)
    return model.params, model
