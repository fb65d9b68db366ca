"""``fluxlab export``: weights in the layouts diffusers, ComfyUI and kohya's tools load.

* ``transformer``: a fluxlab run/checkpoint (EMA weights by default; a LoRA run's adapter merged
  into its base) or a released FLUX.1 folder/BFL file, optionally with ``--merge-lora`` files
  merged in, as a diffusers folder (``OUT/transformer/``) or a BFL ``.safetensors`` file.
* ``lora``: a fluxlab LoRA run or a LoRA file in any layout, as diffusers
  (``pytorch_lora_weights.safetensors``), BFL/ComfyUI or kohya keys.
* ``autoencoder``: any autoencoder ``encoding.autoencoder`` accepts, as a BFL ``ae.safetensors`` or
  a diffusers ``AutoencoderKL`` folder (``OUT/vae/``, beside ``OUT/transformer/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ACCEPTS_OVERRIDES = False
FORMATS = {
    "transformer": ["diffusers", "bfl"],
    "lora": ["diffusers", "bfl", "kohya"],
    "autoencoder": ["diffusers", "bfl"],
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "export",
        help="write a transformer, LoRA or autoencoder for diffusers / ComfyUI / kohya",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("what", choices=sorted(FORMATS), help="which weights to write")
    s.add_argument(
        "--source",
        required=True,
        help="a fluxlab run or checkpoint, a FLUX.1 folder or BFL file, a LoRA file, or an "
        "autoencoder spec, by what is exported",
    )
    s.add_argument(
        "--format",
        required=True,
        choices=["diffusers", "bfl", "kohya"],
        help="transformer: diffusers|bfl; lora: diffusers|bfl|kohya; autoencoder: diffusers|bfl",
    )
    s.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors file")
    s.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    s.add_argument(
        "--merge-lora",
        action="append",
        default=[],
        help="transformer only: a LoRA file or fluxlab LoRA run to merge in; repeatable",
    )
    s.add_argument(
        "--lora-scale",
        type=float,
        action="append",
        default=None,
        help="strength of each --merge-lora (one value applies to all)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.format not in FORMATS[args.what]:
        raise ValueError(
            f"{args.what} exports as {' or '.join(FORMATS[args.what])}, not {args.format}"
        )
    if args.merge_lora and args.what != "transformer":
        raise ValueError("--merge-lora merges into a transformer: use it with `export transformer`")
    out = {"transformer": _transformer, "lora": _lora, "autoencoder": _autoencoder}[args.what](args)
    print(f"wrote {out}")
    return 0


def _transformer(args: argparse.Namespace) -> Path:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    import torch

    from fluxlab.adapters.runs import checkpoint_weights, merge_lora_files
    from fluxlab.models.flux.model import Flux
    from fluxlab.models.weights.flux_export import save_bfl_transformer, save_diffusers_transformer
    from fluxlab.models.weights.pretrained import is_fluxlab_checkpoint, load_flux

    if is_fluxlab_checkpoint(args.source):
        params, weights = checkpoint_weights(args.source, ema=not args.no_ema)
        with torch.device("meta"):
            model = Flux(params)
        model.load_state_dict(weights, strict=True, assign=True)
    else:  # a released FLUX.1: kept in its own bf16
        model = load_flux(args.source, "cpu", torch.bfloat16)
    merge_lora_files(model, args.merge_lora, args.lora_scale)
    state = model.state_dict()
    if args.format == "bfl":
        return save_bfl_transformer(state, model.params, args.out)
    return save_diffusers_transformer(state, model.params, Path(args.out) / "transformer")


def _lora(args: argparse.Namespace) -> Path:
    from fluxlab.adapters.formats import write_lora
    from fluxlab.adapters.runs import read_any_lora  # imported here: see _transformer

    return write_lora(read_any_lora(args.source), args.out, args.format)


def _autoencoder(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file  # imported here: see _transformer

    from fluxlab.models.weights.autoencoder_export import save_diffusers_autoencoder
    from fluxlab.models.weights.autoencoder_spec import load_autoencoder

    out = Path(args.out).expanduser()
    if args.format == "bfl" and out.suffix != ".safetensors":
        raise ValueError(f"{out}: a BFL autoencoder is one .safetensors file (ae.safetensors)")
    model = load_autoencoder(args.source)
    p = model.params
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if args.format == "diffusers":
        return save_diffusers_autoencoder(state, p, out / "vae")
    meta = {"scale_factor": repr(p.scale_factor), "shift_factor": repr(p.shift_factor)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={**meta, "resolution": str(p.resolution)})
    return out
