"""``fluxlab cache``: encode a dataset once into data.cache_dir (latents + text embeddings,
docs/latent.md)."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="encode a dataset into latent + text-embedding shards (data.cache_dir)",
        description="Encode the config's dataset with its autoencoder and text encoder into "
        "safetensors shards under data.cache_dir; rerun the same command to resume an interrupted "
        "run. Training with the same config then reads the shards and builds no encoder.",
    )
    p.add_argument(
        "--config", required=True, help="preset name (e.g. openmoji-latent-gpu) or a YAML file"
    )
    p.add_argument(
        "--device", default="auto", help="where the encoders run (auto, cpu, cuda, cuda:1)"
    )


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from fluxlab.config.loading import load_config
    from fluxlab.data.cache_writer import write_cache
    from fluxlab.pipelines.build import resolve_device

    cfg = load_config(args.config, overrides)
    report = write_cache(cfg, resolve_device(args.device))
    print(
        f"cache: {report.cache_dir} ({report.written_shards} shards written, "
        f"{report.reused_shards} kept from an earlier run)"
    )
    if report.encoded:
        print(
            f"encoded {report.encoded} images in {report.seconds:.1f}s: {report.images_per_s:.1f} "
            "images/s"
        )
    if report.bad:
        print(f"skipped {len(report.bad)} unreadable images:")
        for line in report.bad[:20]:
            print(f"  {line}")
    print(f"train on it: fluxlab train --config {args.config} {' '.join(overrides)}".rstrip())
    return 0
