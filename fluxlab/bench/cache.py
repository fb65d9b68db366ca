"""``fluxlab bench-cache``: what the latent cache buys, measured in one process.

(a) cache throughput: images/s encoded into a fresh cache (decode + resize + autoencoder + text
    encoder);
(b) training steps/s reading latents + text embeddings from that cache;
(c) training steps/s encoding each batch on the fly (autoencoder + text encoder inside the step).

(b) and (c) share one model, optimizer and loss function (the cached task's); they differ only in
where the latents and embeddings come from, so (b)/(c) is the speed-up of caching for this config.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.config.schema import Config
from fluxlab.data import build_dataset, collate_skip_bad
from fluxlab.data.cache_writer import write_cache
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.pipelines.build import build_codec
from fluxlab.train.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    trainer: Trainer, batches: Iterator[dict[str, Any]], steps: int, warmup: int, desc: str
) -> dict[str, float]:
    """Steps/s of the trainer's update (loss, backward, clip, AdamW, EMA) over ``steps`` after
    ``warmup``."""
    device = trainer.device
    trainer.model.train()
    images, start = 0, 0.0
    generator = torch.Generator(device=device).manual_seed(trainer.cfg.train.seed)
    for i in tqdm(range(warmup + steps), desc=desc, dynamic_ncols=True, leave=False):
        if i == warmup:
            _sync(device)
            start, images = time.perf_counter(), 0
        batch = next(batches)
        # trainer.net: DDP/FSDP/compile as configured.
        per_sample, _ = trainer.task.loss(trainer.net, batch, generator)
        per_sample.mean().backward()
        trainer.clip_gradients()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.update_ema()
        images += len(batch["caption"])
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "images_per_s": images / seconds,
    }


def on_the_fly_batches(cfg: Config, device: torch.device) -> Iterator[dict[str, Any]]:
    """Image batches encoded in the step: the loader gives pixels, the autoencoder and text encoder
    run here."""
    d = cfg.data
    ds = build_dataset(
        d.dataset,
        resolution=d.resolution,
        split="train" if d.val_fraction > 0 else "all",
        val_fraction=d.val_fraction,
        seed=cfg.train.seed,
        limit=d.limit,
        openmoji_subset=d.openmoji_subset,
        include=d.include,
        exclude=d.exclude,
    )
    loader = DataLoader(
        ds,
        batch_sampler=InfiniteBatchSampler(len(ds), cfg.optim.batch_size, cfg.train.seed),
        num_workers=d.num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
        persistent_workers=d.num_workers > 0,
        generator=torch.Generator(),
    )
    codec = build_codec(cfg, device).eval().requires_grad_(False)
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    for batch in loader:
        with torch.no_grad():
            latent = codec.encode(batch["image"].to(device, non_blocking=True))
            txt, vec = encoder.encode(list(batch["caption"]))
        yield {"latent": latent, "txt": txt, "vec": vec, "caption": batch["caption"]}


def bench_cache(
    cfg: Config,
    device: torch.device,
    steps: int,
    warmup: int,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measures (a), (b) and (c) of the module docstring for ``cfg``, in ``workdir``."""
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # (a) measures a full encode, never a resumed one
    cfg = replace(
        cfg,
        data=replace(cfg.data, cache_dir=str(cache)),
        cache=replace(cfg.cache, latents="mean"),
        train=replace(
            cfg.train,
            output_dir=str(workdir / "run"),
            eval_every=0,
            tensorboard=False,
            device=str(device),
        ),
    )
    log(f"(a) encoding {cfg.data.dataset} into {cache}")
    report = write_cache(cfg, device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch_size": cfg.optim.batch_size,
        "resolution": cfg.data.resolution,
        "cache": {
            "images": report.encoded,
            "seconds": report.seconds,
            "images_per_s": report.images_per_s,
        },
    }
    log(f"(b) training from the cache: {warmup} warm-up + {steps} timed steps")
    trainer = Trainer(cfg, quiet=True, overwrite=True)  # workdir/run is scratch: reruns reuse it
    result["train_cached"] = time_steps(trainer, trainer._loader(), steps, warmup, "cached")
    log(
        "(c) training with the autoencoder + text encoder in the step: "
        f"{warmup} warm-up + {steps} timed steps"
    )
    result["train_on_the_fly"] = time_steps(
        trainer, on_the_fly_batches(cfg, device), steps, warmup, "on the fly"
    )
    result["speedup"] = (
        result["train_cached"]["steps_per_s"] / result["train_on_the_fly"]["steps_per_s"]
    )
    return result


def format_report(r: dict[str, Any]) -> str:
    c, b, f = r["cache"], r["train_cached"], r["train_on_the_fly"]
    return "\n".join(
        [
            f"{r['device']}, torch {r['torch']}, batch {r['batch_size']} at {r['resolution']}²",
            "| measurement | value |",
            "|---|---:|",
            f"| (a) cache encode | {c['images_per_s']:.1f} images/s "
            f"({c['images']} images in {c['seconds']:.1f}s) |",
            f"| (b) train from cache | {b['steps_per_s']:.2f} steps/s "
            f"({b['images_per_s']:.0f} images/s) |",
            f"| (c) train encoding on the fly | {f['steps_per_s']:.2f} steps/s "
            f"({f['images_per_s']:.0f} images/s) |",
            f"| (b)/(c) | {r['speedup']:.2f}× |",
        ]
    )
