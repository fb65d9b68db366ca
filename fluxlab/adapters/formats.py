"""LoRA weight files in the layouts other tools load, and merging an adapter into a Flux.

In memory an adapter is ``LoraWeights``: for each adapted Linear (by BFL name) the down matrix
A [rank, in], the up matrix B [out, rank] and alpha, so that ΔW = alpha / rank · B·A. On disk:

* ``diffusers``: ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` with the
  scale baked into B (``pytorch_lora_weights.safetensors``, for ``FluxPipeline.load_lora_weights``).
  A fused BFL projection splits exactly: A is copied to each part and B's rows are split as the
  weight converter splits the weight. Separate parts fuse back by stacking the A's and a
  block-diagonal B (or, when every part shares one A, by concatenating the B's).
* ``bfl``: ``diffusion_model.<bfl module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  what ComfyUI loads for a BFL-layout FLUX (and diffusers' kohya converter, at FLUX.1 sizes).
* ``kohya``: sd-scripts' ``lora_unet_<bfl module, dots as underscores>`` with the same suffixes.

Reading also accepts ``lora_A``/``lora_B`` for down/up in any of them, peft's ``base_model.model.``
prefix and fluxlab's own adapter checkpoints (bare BFL names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fluxlab.adapters import lokr, names
from fluxlab.adapters.lokr import LokrFactors

Layout = Literal["diffusers", "bfl", "kohya"]
LAYOUTS: tuple[Layout, ...] = ("diffusers", "bfl", "kohya")
DIFFUSERS_FILENAME = "pytorch_lora_weights.safetensors"
_DOWN = (".lora_down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora_B.weight")
_ALPHA = ".alpha"


@dataclass
class LoraPair:
    """One adapted Linear: ΔW = alpha / rank · up @ down."""

    down: Tensor  # A [rank, in]
    up: Tensor  # B [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the Linear this adapts."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def delta(self) -> Tensor:
        """ΔW in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


LoraWeights = dict[str, LoraPair]
# What a file or run may hold: LoRA pairs or LoKr factors (adapters/lokr.py); both merge by delta().
AdapterWeights = LoraWeights | lokr.LokrWeights


# ----------------------------------------------------------------------------------- state dicts
def _split_key(key: str) -> tuple[str, str] | None:
    """(module, "down" / "up" / "alpha") of a LoRA key, None for anything else."""
    key = key.replace(".default.", ".")  # peft's adapter name
    for suffixes, part in ((_DOWN, "down"), (_UP, "up"), ((_ALPHA,), "alpha")):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    return None


def _group(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """module → {"down", "up"[, "alpha"]}, the first matching prefix stripped from each key."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        split = _split_key(key)
        if split is None:
            raise ValueError(f"{key!r} is not a LoRA tensor (lora_A/B, lora_down/up or alpha)")
        modules.setdefault(split[0], {})[split[1]] = value
    incomplete = [m for m, parts in modules.items() if not {"down", "up"} <= parts.keys()]
    if incomplete:
        raise ValueError(f"LoRA modules without both down and up matrices: {incomplete[:3]}")
    return modules


def _pair(parts: dict[str, Tensor]) -> LoraPair:
    rank = parts["down"].shape[0]
    alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
    return LoraPair(parts["down"], parts["up"], alpha)


def detect_lora_layout(keys: list[str]) -> Layout:
    """Which layout a LoRA state dict is in, from its key names."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("lora_transformer_", "lora_te")) for k in keys):
        raise ValueError(
            "this LoRA holds text-encoder or 'lora_transformer_' (mixed kohya/diffusers) keys, "
            "which fluxlab does not read; convert it with diffusers first"
        )
    diffusers_heads = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")
    diffusers_heads += ("context_embedder.", "proj_out.", "norm_out.", "time_text_embed.")
    stripped = [k.removeprefix("transformer.").removeprefix("base_model.model.") for k in keys]
    if any(k.startswith(diffusers_heads) for k in stripped):
        return "diffusers"
    return "bfl"


def from_state_dict(sd: dict[str, Tensor], mlp_ratio: float = 4.0) -> AdapterWeights:
    """``LoraWeights`` from a LoRA state dict in any layout this module reads (``mlp_ratio``: the
    model's, to fuse diffusers LoRAs that leave out a single block's MLP part); a LyCORIS LoKr
    file gives ``LokrWeights``."""
    if any(lokr.is_lokr_key(k) for k in sd):
        return lokr.lokr_from_state_dict(sd)
    layout = detect_lora_layout(list(sd))
    if layout == "kohya":
        modules = _group(sd, ("lora_unet_",))
        return {names.from_kohya(m): _pair(p) for m, p in modules.items()}
    if layout == "bfl":
        modules = _group(sd, ("diffusion_model.", "base_model.model."))
        for module in modules:
            names.to_diffusers(module)  # raises on a name that is not a Flux Linear
        return {m: _pair(p) for m, p in modules.items()}
    return _from_diffusers(_group(sd, ("transformer.", "base_model.model.")), mlp_ratio)


def _from_diffusers(modules: dict[str, dict[str, Tensor]], mlp_ratio: float) -> LoraWeights:
    by_bfl: dict[str, dict[int, LoraPair]] = {}
    for module, parts in modules.items():
        bfl, index = names.from_diffusers(module)
        by_bfl.setdefault(bfl, {})[index] = _pair(parts)
    out: LoraWeights = {}
    for bfl, parts in by_bfl.items():
        target = names.to_diffusers(bfl)
        if target.rows == "same":
            out[bfl] = parts[0]
        elif target.rows == "swap_halves":
            out[bfl] = LoraPair(parts[0].down, _swap_halves(parts[0].up), parts[0].alpha)
        else:
            out[bfl] = _fuse(parts, len(target.modules), mlp_ratio)
    return out


def _fuse(parts: dict[int, LoraPair], count: int, mlp_ratio: float) -> LoraPair:
    """One LoRA on a fused projection from LoRAs on some of its ``count`` parts (exact).

    Parts without a LoRA get zero rows: q, k and v are as wide as the input, the single blocks'
    MLP part ``mlp_ratio`` times that."""
    first = next(iter(parts.values()))
    shared = len(parts) == count and all(
        torch.equal(p.down, first.down) and p.alpha == first.alpha for p in parts.values()
    )
    if shared:  # what splitting a fused LoRA gives: the same rank back
        return LoraPair(first.down, torch.cat([parts[i].up for i in range(count)]), first.alpha)
    # Stacked A's and a block-diagonal B, each part's scale baked into its block: alpha = rank.
    width = first.down.shape[1]
    widths = [width] * 3 + [int(width * mlp_ratio)] * (count - 3)
    down = torch.cat([parts[i].down for i in sorted(parts)])
    up = torch.zeros(sum(widths), down.shape[0], dtype=first.up.dtype)
    col = 0
    for i in sorted(parts):
        p, row = parts[i], sum(widths[:i])
        if p.up.shape[0] != widths[i]:
            raise ValueError(
                f"a LoRA part has {p.up.shape[0]} output rows where the fused projection has "
                f"{widths[i]}: pass the model's mlp_ratio"
            )
        up[row : row + widths[i], col : col + p.rank] = p.up * p.scale
        col += p.rank
    return LoraPair(down, up, float(down.shape[0]))


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_state_dict(lora: AdapterWeights, layout: Layout) -> dict[str, Tensor]:
    """The tensors of ``lora`` under ``layout``'s names (new, contiguous tensors)."""
    if any(isinstance(p, LokrFactors) for p in lora.values()):
        return lokr.lokr_to_state_dict(lora, layout)  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    if layout in ("bfl", "kohya"):
        for bfl, p in lora.items():
            key = (
                f"diffusion_model.{bfl}" if layout == "bfl" else f"lora_unet_{names.to_kohya(bfl)}"
            )
            out[f"{key}.lora_down.weight"] = p.down.contiguous().clone()
            out[f"{key}.lora_up.weight"] = p.up.contiguous().clone()
            out[f"{key}{_ALPHA}"] = torch.tensor(p.alpha, dtype=torch.float32)
        return out
    if layout != "diffusers":
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {list(LAYOUTS)}")
    for bfl, p in lora.items():
        target = names.to_diffusers(bfl)
        up = p.up * p.scale  # diffusers' loader assumes alpha = rank when a file has no alphas
        if target.rows == "swap_halves":
            up = _swap_halves(up)
        chunks = [up]
        if target.rows == "split":
            chunks = list(up.split(names.split_sizes(bfl, up.shape[0], p.down.shape[1])))
        for module, chunk in zip(target.modules, chunks, strict=True):
            out[f"transformer.{module}.lora_A.weight"] = p.down.contiguous().clone()
            out[f"transformer.{module}.lora_B.weight"] = chunk.contiguous().clone()
    return out


# ------------------------------------------------------------------------------------------ files
def read_lora(path: str | Path, mlp_ratio: float = 4.0) -> AdapterWeights:
    """A LoRA ``.safetensors`` in any layout; a folder means its diffusers-named file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_FILENAME
    if not path.is_file():
        raise ValueError(f"no LoRA file at {path}: give a .safetensors file")
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if not sd:
        raise ValueError(f"{path} holds no tensors")
    return from_state_dict(sd, mlp_ratio)


def write_lora(
    lora: AdapterWeights, path: str | Path, layout: Layout, metadata: dict | None = None
) -> Path:
    """Writes ``lora`` in ``layout``; a folder ``path`` gets diffusers' file name."""
    state = to_state_dict(lora, layout)  # before any folder is made: a LoKr refuses diffusers
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "lokr" if any(isinstance(p, LokrFactors) for p in lora.values()) else "lora"
    meta = {"format": f"{kind}-{layout}", "written_by": "fluxlab"}
    if metadata:
        meta["fluxlab"] = json.dumps(metadata)
    save_file(state, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_into_state_dict(sd: dict[str, Tensor], lora: AdapterWeights, scale: float = 1.0) -> None:
    """W ← W + scale · ΔW for every adapted Linear of a BFL-named state dict, in place."""
    for bfl, p in lora.items():
        key = f"{bfl}.weight"
        if key not in sd:
            raise ValueError(f"the LoRA adapts {bfl!r}, which this Flux does not have")
        weight = sd[key]
        if tuple(weight.shape) != p.shape:
            raise ValueError(
                f"the LoRA on {bfl} makes a {p.shape[0]}×{p.shape[1]} update, but the "
                f"weight is {tuple(weight.shape)}: it was trained for another model size"
            )
        sd[key] = (weight.float() + scale * p.delta().to(weight.device)).to(weight.dtype)


@torch.no_grad()
def merge_into_model(model: nn.Module, lora: AdapterWeights, scale: float = 1.0) -> nn.Module:
    """``merge_into_state_dict`` on a plain (BFL-named) Flux's parameters, in place."""
    params = dict(model.named_parameters())
    missing = [bfl for bfl in lora if f"{bfl}.weight" not in params]
    if missing:
        raise ValueError(f"the LoRA adapts {missing[:3]}, which this Flux does not have")
    weights = {f"{bfl}.weight": params[f"{bfl}.weight"] for bfl in lora}
    merged = dict(weights)
    merge_into_state_dict(merged, lora, scale)
    for key, param in weights.items():
        param.copy_(merged[key])
    return model
