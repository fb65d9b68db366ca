"""``fluxlab cache``: encode a dataset once into the latent cache (layout in ``data/cache.py``).

The plan (which example goes to which bucket and shard) is a pure function of the config, so a
rerun after an interruption recomputes it, keeps every finished shard (each written to a temporary
name and renamed, so a shard either exists whole or not at all) and continues at the first missing
one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.config.schema import Config
from fluxlab.data import build_dataset
from fluxlab.data.buckets import bucket_tensor, nearest_bucket, resolve_buckets
from fluxlab.data.cache import (
    DTYPES,
    FORMAT,
    INDEX,
    META_KEY,
    TEXT,
    bucket_dir,
    cache_splits,
    fingerprint,
    fingerprint_mismatch,
    read_index,
    shard_meta,
    write_json_atomic,
)
from fluxlab.data.folder import ImageCaptionFolder
from fluxlab.data.images import BadImageError, load_image
from fluxlab.data.openmoji import OpenMoji
from fluxlab.pipelines.build import build_codec

logger = logging.getLogger(__name__)


class Source:
    """Raw images of one split with their captions: what buckets need (datasets return squares)."""

    def __init__(self, cfg: Config, split: str) -> None:
        d = cfg.data
        if d.task != "text_to_image":
            raise ValueError(
                "fluxlab cache handles data.task=text_to_image; "
                "train edit runs without data.cache_dir"
            )
        ds = build_dataset(
            d.dataset,
            resolution=d.resolution,
            split=split,  # the trainer's rule: with val_fraction=0, "train" holds every example
            val_fraction=d.val_fraction,
            seed=cfg.train.seed,
            limit=d.limit,
            openmoji_subset=d.openmoji_subset,
            max_pixels=d.max_pixels,
            include=d.include,
            exclude=d.exclude,
        )
        self.captions: list[str] = list(ds.captions)
        self.max_pixels = d.max_pixels
        if isinstance(ds, OpenMoji):
            self.images, self.paths = ds.images, None
            self.names = [f"openmoji:{c}" for c in ds.codes]
        elif isinstance(ds, ImageCaptionFolder):
            self.images, self.paths = None, list(ds.paths)
            self.names = [str(p) for p in self.paths]
        else:
            raise ValueError(
                f"fluxlab cache reads OpenMoji or an image folder, not {type(ds).__name__} "
                f"({d.dataset!r}); cache the folder the shards were written from"
            )

    def __len__(self) -> int:
        return len(self.captions)

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) from the header only; EXIF rotations by 90° swap them."""
        if self.paths is None:
            return self.images.shape[1], self.images.shape[2]
        try:
            with Image.open(self.paths[i]) as im:
                w, h = im.size
                rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
        except (OSError, ValueError, SyntaxError) as err:
            raise BadImageError(self.paths[i], f"{type(err).__name__}: {err}") from None
        return (w, h) if rotated else (h, w)

    def load(self, i: int) -> Image.Image:
        if self.paths is None:
            return Image.fromarray(self.images[i])
        return load_image(self.paths[i], max_pixels=self.max_pixels)


@dataclass
class _Shard:
    path: Path
    source: Source
    items: list[int]
    size: tuple[int, int]


class _PendingImages(Dataset):
    """Every image of the unfinished shards, shard after shard.

    One DataLoader (its workers start once) feeds the whole run, with batches cut at shard
    boundaries.
    """

    def __init__(self, shards: list[_Shard]) -> None:
        self.where = [(s, i) for s, shard in enumerate(shards) for i in shard.items]
        self.shards = shards

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, j: int) -> tuple[int, int, Tensor | None, str | None]:
        s, i = self.where[j]
        shard = self.shards[s]
        try:
            return s, i, bucket_tensor(shard.source.load(i), shard.size), None
        except BadImageError as err:
            return s, i, None, str(err)

    def batches(self, batch_size: int) -> list[list[int]]:
        out: list[list[int]] = []
        start = 0
        for shard in self.shards:
            end = start + len(shard.items)
            out += [list(range(b, min(b + batch_size, end))) for b in range(start, end, batch_size)]
            start = end
        return out


@dataclass
class CacheReport:
    cache_dir: Path
    encoded: int = 0  # images encoded by this run (resumed shards excluded)
    reused_shards: int = 0
    written_shards: int = 0
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def build_cache_codec(cfg: Config, device: torch.device) -> nn.Module:
    """The config's codec (pixels, or the frozen autoencoder: bf16 on CUDA, fp32 elsewhere)."""
    return build_codec(cfg, device).eval().requires_grad_(False)


def _encode_latents(codec: nn.Module, images: Tensor, mode: str) -> dict[str, Tensor]:
    if mode == "mean":
        return {"latent": codec.encode(images).float()}
    ae = getattr(codec, "autoencoder", None)
    if ae is None:
        raise ValueError(
            "cache.latents=sample needs an autoencoder (encoding.space=latent); "
            "pixels have no posterior"
        )
    dtype = next(ae.parameters()).dtype
    mean, logvar = ae.encode_moments(images.to(dtype))
    # Stored in the diffusion latent's units: scale·(z − shift) has mean scale·(μ − shift) and
    # log-variance logvar + 2·log|scale|, so training draws mean + exp(logvar/2)·ε with no
    # autoencoder at hand.
    scale = float(ae.scale_factor)
    return {
        "mean": (scale * (mean.float() - ae.shift_factor)),
        "logvar": logvar.float() + 2 * math.log(abs(scale)),
    }


def _write_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Accumulator:
    """One shard's encoded examples until the shard is complete."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.kept: list[int] = []
        self.bad: list[str] = []
        self.seen = 0

    def finish(self, source: Source) -> tuple[dict[str, Tensor], dict[str, str]]:
        if not self.kept:  # every image of the shard was bad: an empty shard still marks it as done
            return {"index": torch.zeros(0, dtype=torch.long)}, _meta(
                captions=[], bad=self.bad, names=[]
            )
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        tensors["index"] = torch.tensor(self.kept, dtype=torch.long)
        meta = _meta(
            captions=[source.captions[i] for i in self.kept],
            bad=self.bad,
            names=[source.names[i] for i in self.kept],
        )
        return tensors, meta


@torch.no_grad()
def _encode_batch(
    batch: list,
    source: Source,
    acc: _Accumulator,
    codec: nn.Module,
    encoder: Any,
    cfg: Config,
    device: torch.device,
) -> None:
    dtype = DTYPES[cfg.cache.dtype]
    for _, _, _, err in batch:
        if err is not None:
            logger.warning("skipping %s", err)
            acc.bad.append(err)
    acc.seen += len(batch)
    good = [(i, t) for _, i, t, _ in batch if t is not None]
    if not good:
        return
    images = torch.stack([t for _, t in good]).to(device)
    latents = _encode_latents(codec, images, cfg.cache.latents)
    txt, vec = encoder.encode([source.captions[i] for i, _ in good])
    for k, v in {**latents, "txt": txt}.items():
        acc.parts.setdefault(k, []).append(v.to("cpu", dtype))
    acc.parts.setdefault("vec", []).append(vec.float().cpu())
    acc.kept += [i for i, _ in good]


def _meta(**fields: Any) -> dict[str, str]:
    # One key: safetensors writes a metadata map in hash order, so reruns would differ byte-wise.
    return {META_KEY: json.dumps(fields, sort_keys=True)}


def _plan(
    source: Source, buckets: list[tuple[int, int]], shard_size: int
) -> tuple[list[list[list[int]]], list[str]]:
    """Per bucket, its shards' example indices; and the images whose header could not be read."""
    members: list[list[int]] = [[] for _ in buckets]
    bad = []
    for i in range(len(source)):
        try:
            h, w = source.size(i)
        except BadImageError as err:
            logger.warning("skipping %s", err)
            bad.append(str(err))
            continue
        members[nearest_bucket(h, w, buckets)].append(i)
    shards = [[m[s : s + shard_size] for s in range(0, len(m), shard_size)] for m in members]
    return shards, bad


def write_cache(
    cfg: Config,
    device: torch.device,
    codec: nn.Module | None = None,
    encoder: Any = None,
    progress: bool = True,
) -> CacheReport:
    """Encodes (or finishes encoding) data.cache_dir for ``cfg``; returns what this run did."""
    if not cfg.data.cache_dir:
        raise ValueError(
            "set data.cache_dir (e.g. --data.cache_dir=runs/my-cache) to say where the cache goes"
        )
    root = Path(cfg.data.cache_dir)
    fp = fingerprint(cfg)
    index = read_index(root)
    if index is not None:
        diff = fingerprint_mismatch(index.get("fingerprint", {}), fp)
        if diff or index.get("format") != FORMAT:
            raise ValueError(
                f"{root} already holds a cache built with other settings; delete it or choose "
                "another data.cache_dir. Differences:\n  " + "\n  ".join(diff or ["format"])
            )
    root.mkdir(parents=True, exist_ok=True)
    index = {
        "format": FORMAT,
        "fingerprint": fp,
        "complete": False,
        "latents": cfg.cache.latents,
        "splits": {},
    }
    write_json_atomic(root / INDEX, index)
    codec = codec if codec is not None else build_cache_codec(cfg, device)
    encoder = (
        encoder
        if encoder is not None
        else build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    )
    buckets = resolve_buckets(cfg.data.buckets, cfg.data.resolution)
    step = codec.downsample * cfg.encoding.patch_size
    for h, w in buckets:
        if h % step or w % step:
            raise ValueError(
                f"bucket {h}x{w} is not divisible by {step} (autoencoder {codec.downsample}× × "
                f"encoding.patch_size {cfg.encoding.patch_size}); change data.buckets"
            )
    sources, plans, report = {}, {}, CacheReport(root)
    for split in cache_splits(cfg):
        try:
            sources[split] = Source(cfg, split)
        except (
            ValueError
        ) as err:  # an empty held-out split: only validation needs it, and it says so then
            if split != "val":
                raise
            logger.warning("no val split cached: %s", err)
            continue
        plans[split], bad = _plan(sources[split], buckets, cfg.cache.shard_size)
        report.bad += bad
    pending: list[_Shard] = []
    for split, plan in plans.items():
        for size, shards in zip(buckets, plan):
            for k, items in enumerate(shards):
                path = root / bucket_dir(split, size) / f"{k:06d}.safetensors"
                if path.is_file():
                    report.reused_shards += 1
                else:
                    pending.append(_Shard(path, sources[split], items, size))
    total = sum(len(s) for p in plans.values() for b in p for s in b)
    work = _PendingImages(pending)
    loader = DataLoader(
        work,
        batch_sampler=work.batches(cfg.cache.batch_size),
        collate_fn=list,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator(),
    )
    start = time.perf_counter()
    acc = _Accumulator()
    with tqdm(
        total=total,
        initial=total - len(work),
        desc=f"cache {root.name}",
        unit="img",
        dynamic_ncols=True,
        disable=not progress,
    ) as bar:
        for batch in loader:
            shard = pending[batch[0][0]]
            _encode_batch(batch, shard.source, acc, codec, encoder, cfg, device)
            bar.update(len(batch))
            if acc.seen == len(shard.items):
                _write_shard(shard.path, *acc.finish(shard.source))
                report.encoded += len(acc.kept)
                report.written_shards += 1
                report.seconds = time.perf_counter() - start
                bar.set_postfix(img_s=f"{report.images_per_s:.1f}")
                acc = _Accumulator()
    report.seconds = time.perf_counter() - start
    _write_text_table(root, cfg, encoder)
    index["splits"] = {
        split: _split_entry(root, split, buckets, plan, codec.downsample, report)
        for split, plan in plans.items()
    }
    index["latent"] = {"channels": int(codec.channels), "downsample": int(codec.downsample)}
    index["text"] = {
        "context_dim": int(encoder.context_dim),
        "pooled_dim": int(encoder.pooled_dim),
        "max_length": int(encoder.max_length),
    }
    index["bad_images"] = report.bad
    index["complete"] = True
    write_json_atomic(root / INDEX, index)
    return report


def _split_entry(
    root: Path,
    split: str,
    buckets: list[tuple[int, int]],
    plan: list[list[list[int]]],
    downsample: int,
    report: CacheReport,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"buckets": {}, "count": 0}
    for size, shards in zip(buckets, plan):
        files, count = [], 0
        for k in range(len(shards)):
            rel = f"{bucket_dir(split, size)}/{k:06d}.safetensors"
            with safe_open(str(root / rel), framework="pt") as f:
                meta = shard_meta(f)
                n = len(meta["captions"])
                # read back, not kept in memory: shards of an interrupted earlier run count too
                report.bad += [b for b in meta["bad"] if b not in report.bad]
            if n:
                files.append(rel)
                count += n
        if count:
            entry["buckets"][f"{size[0]}x{size[1]}"] = {
                "size": list(size),
                "count": count,
                "shards": files,
                "latent_hw": [size[0] // downsample, size[1] // downsample],
            }
        entry["count"] += count
    return entry


def _write_text_table(root: Path, cfg: Config, encoder: Any) -> None:
    """Embeddings of the sample prompts, the negative prompt and "" (caption dropout): training
    and its sample grids then need no text encoder."""
    captions = sorted(set(cfg.sample.prompts) | {cfg.sample.negative_prompt, ""})
    txt, vec = encoder.encode(captions)
    _write_shard(
        root / TEXT,
        {"txt": txt.to("cpu", DTYPES[cfg.cache.dtype]), "vec": vec.float().cpu()},
        _meta(captions=captions),
    )
