"""How fast a CPU worker turns stored images into training batches: image folder vs shards vs
cache.

Each source yields the same items (decode -> resize/crop -> float tensor) batched by a DataLoader
with `collate_skip_bad`, exactly as the trainer consumes them; the in-memory cache holds pre-decoded
uint8 tensors at the target resolution, so it measures the floor (conversion + batching + worker
IPC).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fluxlab.data.common import collate_skip_bad
from fluxlab.data.folder import ImageCaptionFolder
from fluxlab.data.images import load_image
from fluxlab.data.openmoji import OpenMoji
from fluxlab.data.shard_writer import folder_samples, shard_pattern, write_shards
from fluxlab.data.shards import ShardDataset
from fluxlab.data.transforms import ImageTransform, uint8_to_tensor


@dataclass
class BenchResult:
    source: str
    workers: int
    images: int
    seconds: float
    images_per_s: float
    images_per_s_per_worker: float
    # workers=0 only: images per CPU-second of the one process doing everything, which other jobs
    # sharing the CPU cannot inflate the way they inflate wall time (None when workers run apart)
    images_per_cpu_s: float | None


class TensorCache(Dataset):
    """Pre-decoded images (uint8 [N, R, R, 3]) + captions: what a decode-once cache serves."""

    def __init__(self, images: np.ndarray, captions: list[str]) -> None:
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": uint8_to_tensor(self.images[index]),
            "caption": self.captions[index],
            "index": index,
            "label": 0,
        }


def make_image_folder(
    root: Path,
    count: int,
    size: tuple[int, int],
    quality: int = 90,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """`count` OpenMoji renders upscaled to `size` (w, h) as JPEG + caption .txt under `root`.

    `noise` (std in 8-bit levels) adds film-grain-like texture: flat emoji compress far better than
    photos, and JPEG decode time grows with the entropy of the data.
    """
    root.mkdir(parents=True, exist_ok=True)
    if len(list(root.glob("*.jpg"))) == count:
        return root
    emoji = OpenMoji(128, limit=count)
    if len(emoji) < count:
        raise ValueError(f"OpenMoji has only {len(emoji)} renders; ask for fewer images")
    rng = np.random.default_rng(seed)
    for i in tqdm(range(count), desc=f"writing {count} JPEGs {size[0]}x{size[1]}", leave=False):
        img = Image.fromarray(emoji.images[i]).resize(size, Image.Resampling.BICUBIC)
        if noise > 0:
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (size[1], size[0], 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        img.save(root / f"{i:06d}.jpg", quality=quality)
        (root / f"{i:06d}.txt").write_text(emoji.captions[i])
    return root


def time_loader(
    dataset: Dataset, workers: int, batch_size: int, epochs: int, shuffle: bool
) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of this process) for `epochs` passes, not counting worker
    start-up and the first batch."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0) if shuffle else None,
    )
    images, start, cpu_start = 0, None, 0.0
    for _ in range(epochs):
        for batch in loader:
            if start is None:  # the first batch pays process start-up: time the steady state
                start, cpu_start = time.perf_counter(), time.process_time()
                continue
            images += 0 if batch is None else len(batch["caption"])
    if start is None or images == 0:
        raise ValueError("the benchmark needs more than one batch of images; raise --num-images")
    return images, time.perf_counter() - start, time.process_time() - cpu_start


def bench_data(
    workdir: Path,
    resolution: int,
    count: int,
    source_size: tuple[int, int],
    batch_size: int,
    workers: list[int],
    epochs: int,
    noise: float,
    repeats: int = 3,
) -> dict[str, Any]:
    """Every source × worker count, best of `repeats` runs (other jobs on a shared CPU only ever
    slow a run down, so the fastest is the closest to the loader's own speed)."""
    torch.set_num_threads(1)  # one core per loader process, as DataLoader workers run
    tag = f"{count}-{source_size[0]}x{source_size[1]}-n{noise:g}"
    folder = make_image_folder(workdir / f"folder-{tag}", count, source_size, noise=noise)
    shard_dir = workdir / f"shards-{tag}"
    shards = sorted(shard_dir.glob("*.tar"))
    if not shards:
        total, samples = folder_samples(folder)
        shards = write_shards(samples, shard_dir, shard_size=max(1, count // 8), total=total)
    transform = ImageTransform(resolution)
    folder_ds = ImageCaptionFolder(folder, transform)
    shard_ds = ShardDataset(shard_pattern(shards), transform, shuffle_buffer=count, epochs=epochs)
    start = time.perf_counter()
    n_indexed = len(shard_ds)  # the index pass (counts + captions) runs once, before any worker
    index_seconds = time.perf_counter() - start
    cached = np.stack([transform_to_uint8(transform, path) for path in folder_ds.paths])
    sources: dict[str, Dataset] = {
        "image folder": folder_ds,
        "shards": shard_ds,
        "in-memory cache": TensorCache(cached, [""] * len(cached)),
    }

    results = []
    for name, ds in sources.items():
        for w in workers:
            is_shards = name == "shards"
            runs = [
                time_loader(ds, w, batch_size, 1 if is_shards else epochs, shuffle=not is_shards)
                for _ in range(repeats)
            ]
            images, seconds, cpu = runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)
            rate, per_cpu = images / seconds, round(images / cpu, 1) if w == 0 else None
            results.append(
                BenchResult(
                    name,
                    w,
                    images,
                    round(seconds, 3),
                    round(rate, 1),
                    round(rate / max(1, w), 1),
                    per_cpu,
                )
            )
    return {
        "machine": machine(),
        "resolution": resolution,
        "source_size": list(source_size),
        "images": count,
        "jpeg_noise": noise,
        "batch_size": batch_size,
        "repeats": repeats,
        "shard_index_seconds": round(index_seconds, 3),
        "shard_index_samples": n_indexed,
        "shard_bytes": sum(p.stat().st_size for p in shards),
        "results": [asdict(r) for r in results],
    }


def transform_to_uint8(transform: ImageTransform, path: Path) -> np.ndarray:
    x = transform(load_image(path))
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def workers_to_feed(per_worker: float, batch: int, step_seconds: float, margin: float = 2.0) -> int:
    """Loader workers that sustain `batch` images every `step_seconds`, `margin` times over."""
    return math.ceil(margin * batch / step_seconds / per_worker)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "webdataset": webdataset.__version__,
        "numpy": np.__version__,
    }
