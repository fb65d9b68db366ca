"""``fluxlab compare-distill``: a distilled student beside its teacher, at the same seeds.

For each ``--scale`` w the teacher samples with classifier-free guidance w (two passes per step)
and the student with w as its guidance input (one pass); prints and writes per-image error, FID/KID
of both against the reference data, seconds per image, and a teacher | student grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fluxlab.pipelines.batches import BatchGenerator
    from fluxlab.pipelines.text_to_image import FluxTextToImage, TextEmbedding

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare-distill",
        help="a distilled student against its CFG teacher: error, FID/KID, sampling time",
    )
    c.add_argument("--teacher", required=True, help="the teacher's run or checkpoint folder")
    c.add_argument("--student", required=True, help="the `fluxlab distill` run or checkpoint")
    c.add_argument(
        "--scale", type=float, action="append", default=None, help="repeat (default 2, 4, 6)"
    )
    c.add_argument("--prompt", action="append", default=[], help="default: the reference captions")
    c.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    c.add_argument("--steps", type=int, default=None, help="default: the teacher's sample.steps")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--reference-dataset", default=None, help="default: the teacher's data.dataset")
    c.add_argument("--reference-split", choices=["train", "val", "all"], default="val")
    c.add_argument(
        "--features", default="inception", help="'inception' or a TorchScript extractor .pt"
    )
    c.add_argument("--fid-weights", default=None, help="as for `fluxlab eval`")
    c.add_argument("--kid-subset-size", type=int, default=1000)
    c.add_argument("--grid-rows", type=int, default=8, help="prompts in the grid")
    c.add_argument("--device", default="auto")
    c.add_argument("--out", required=True, help="folder for grid.png, results.json, results.md")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    from fluxlab.conditioning.text_encoders import build_text_encoder
    from fluxlab.data.common import cache_dir
    from fluxlab.eval import distillation as compare
    from fluxlab.eval.fid_inputs import (
        reference_dataset,
        reference_features,
        resolve_extractor,
        to_uint8,
    )
    from fluxlab.eval.metrics import extract_features
    from fluxlab.pipelines.build import encode_prompts, load_for_sampling, resolve_device
    from fluxlab.train.checkpoint import read_description

    scales = args.scale or [2.0, 4.0, 6.0]
    if min(args.batch_size, args.grid_rows, args.limit or 1) < 1:
        raise ValueError("--batch-size, --grid-rows and --limit must be at least 1")
    device = resolve_device(args.device)
    extractor, extractor_id = resolve_extractor(args.features, args.fid_weights)
    teacher_cfg, teacher, _ = load_for_sampling(args.teacher, device)
    student_cfg, student, student_path = load_for_sampling(args.student, device)
    if "distilled" not in read_description(student_path):
        raise ValueError(f"--student {args.student} is not a `fluxlab distill` run")
    if student_cfg.encoding != teacher_cfg.encoding:
        raise ValueError("--teacher and --student use different encodings or text encoders")

    name = args.reference_dataset or teacher_cfg.data.dataset
    dataset, key = reference_dataset(name, args.reference_split, teacher_cfg)
    prompts = args.prompt or [dataset[i]["caption"] for i in range(len(dataset))]
    prompts = prompts[: args.limit]
    ref_feats, _, _ = reference_features(
        extractor,
        extractor_id,
        dataset=dataset,
        dataset_key=key,
        cache=cache_dir() / "fid",
        device=device,
        batch_size=64,
    )
    encoder = build_text_encoder(
        teacher_cfg.encoding.text_encoder, teacher_cfg.encoding.text_max_length, device
    )
    text = encode_prompts(encoder, prompts)
    empty = encode_prompts(encoder, [teacher_cfg.sample.negative_prompt])
    del encoder
    steps = args.steps or teacher_cfg.sample.steps
    shift = teacher_cfg.sample.shift

    def sampler(pipe: FluxTextToImage, cfg_scale: float, embedded: float) -> BatchGenerator:
        return _generator(pipe, text, empty, steps, shift, cfg_scale, embedded)

    results, columns = [], []
    for w in scales:
        print(f"scale {w:g}: teacher (CFG, two passes per step), then student (one pass)")
        t = compare.timed_generation(
            sampler(teacher, w, 1.0), len(prompts), args.batch_size, args.seed, device
        )
        s = compare.timed_generation(
            sampler(student, 1.0, w), len(prompts), args.batch_size, args.seed, device
        )
        feats = {
            who: extract_features(to_uint8(x.images), extractor, device, batch_size=64)
            for who, x in (("teacher", t), ("student", s))
        }
        row: dict[str, float] = {"scale": w, **compare.pair_errors(t.images, s.images)}
        for who, x in (("teacher", t), ("student", s)):
            d = compare.distances(feats[who], ref_feats, args.kid_subset_size, args.seed)
            row.update({f"{who}_{k}": v for k, v in d.items()})
            row[f"{who}_seconds_per_image"] = x.seconds / len(prompts)
        row["time_ratio"] = s.seconds / t.seconds
        results.append(row)
        columns += [(f"teacher w={w:g}", t.images), (f"student w={w:g}", s.images)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compare.comparison_grid(columns, prompts, args.grid_rows).save(out / "grid.png")
    table = compare.markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    summary = {
        "teacher": args.teacher,
        "student": str(student_path),
        "prompts": len(prompts),
        "steps": steps,
        "reference": key,
        "features": extractor_id,
        "device": str(device),
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"wrote {out / 'grid.png'}, results.md and results.json")
    return 0


def _generator(
    pipe: FluxTextToImage,
    text: TextEmbedding,
    negative: TextEmbedding,
    steps: int,
    shift: bool,
    cfg_scale: float,
    embedded: float,
) -> BatchGenerator:
    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return pipe.generate(
            text[items],
            negative,
            steps=steps,
            guidance=cfg_scale,
            distilled_guidance=embedded,
            shift=shift,
            seed=seed,
            progress=progress,
        )

    return generate_batch
