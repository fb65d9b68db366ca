"""The latent cache (``data.cache_dir``): its layout, its fingerprint, and the dataset reading it.

Layout (docs/latent.md)::

    index.json                      format, fingerprint, per split × bucket: sizes, shards, counts
    text.safetensors                embeddings of the sample prompts, the negative prompt and ""
    train/64x64/000000.safetensors  latent (or mean + logvar), txt, vec, index; captions in metadata
    val/64x64/000000.safetensors

The fingerprint holds everything that determines the contents, read from the config and file stats
only (no model is loaded to check it), so training can refuse a stale cache before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from fluxlab.config.schema import Config
from fluxlab.data.buckets import BucketBatchSampler, bucket_name, resolve_buckets
from fluxlab.data.openmoji_render import render_identity
from fluxlab.models.weights.autoencoder_spec import AE_JSON, AE_WEIGHTS, _fluxlab_folder

FORMAT = "fluxlab-latent-cache-v1"
INDEX = "index.json"
TEXT = "text.safetensors"
META_KEY = "fluxlab"  # safetensors metadata: one JSON object (captions, bad images, names)
# Caches under this size move onto the GPU: OpenMoji 64² with MiniLM is ~0.1 GB, T5-512 captions
# reach it at ~2,000 images.
GPU_RESIDENT_BYTES = 8 << 30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cache_splits(cfg: Config) -> list[str]:
    """The splits training reads: train (+ val when data.val_fraction > 0); without a held-out part
    the whole dataset is cached as "train"."""
    return ["train", "val"] if cfg.data.val_fraction > 0 else ["train"]


def _file_stat(path: Path, content_hash: bool) -> dict[str, Any]:
    st = path.stat()
    out: dict[str, Any] = {"file": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    # Hashed where asked: autoencoders are small (FLUX's is 335 MB), text encoders can be 10 GB.
    if content_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        out["sha256"] = digest.hexdigest()
    return out


def _weight_files(path: Path) -> list[Path]:
    folder = _fluxlab_folder(path)
    if folder is not None:  # a train-ae run, its ae/ folder or its ae.safetensors
        return [folder / AE_WEIGHTS, folder / AE_JSON]
    if path.is_file():
        return [path]
    # a diffusers folder: only its VAE matters
    root = path / "vae" if (path / "vae").is_dir() else path
    return sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json", ".bin", ".pt"))


def autoencoder_identity(spec: str | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    if spec.startswith(
        "preset:"
    ):  # random init from a fixed private seed (fluxlab.models.weights.autoencoder_spec)
        return {"spec": spec}
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"encoding.autoencoder={spec!r} does not exist; "
            "train one with `fluxlab train-ae` or fix the path"
        )
    return {"spec": spec, "files": [_file_stat(p, content_hash=True) for p in _weight_files(path)]}


def text_encoder_identity(spec: str, max_length: int) -> dict[str, Any]:
    out: dict[str, Any] = {"spec": spec, "max_length": max_length}
    path = Path(spec).expanduser()
    if path.is_dir():
        out["files"] = [
            _file_stat(p, content_hash=False) for p in sorted(path.glob("text_encoder*/*"))
        ]
    return out


def fingerprint(cfg: Config) -> dict[str, Any]:
    """Everything that determines the cache's contents, as JSON-able values."""
    d, e = cfg.data, cfg.encoding
    dataset = d.dataset
    if dataset.lower() == "openmoji":
        dataset = render_identity()  # new pixels (another renderer or version) need a new cache
    elif Path(dataset).expanduser().exists():
        dataset = str(Path(dataset).expanduser().resolve())
    return {
        "dataset": dataset,
        "split": {
            "val_fraction": d.val_fraction,
            "seed": cfg.train.seed,
            "limit": d.limit,
            "openmoji_subset": d.openmoji_subset,
            # only when set, so caches written before these fields existed still match
            **{k: v for k, v in (("include", d.include), ("exclude", d.exclude)) if v is not None},
        },
        "resolution": d.resolution,
        "buckets": [list(b) for b in resolve_buckets(d.buckets, d.resolution)],
        "space": e.space,
        "autoencoder": autoencoder_identity(e.autoencoder) if e.space == "latent" else None,
        "latents": cfg.cache.latents,
        "text_encoder": text_encoder_identity(e.text_encoder, e.text_max_length),
        "dtype": cfg.cache.dtype,
        "shard_size": cfg.cache.shard_size,
    }


def fingerprint_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per differing field: ``autoencoder: stored {...} ≠ now {...}``."""
    keys = sorted(set(stored) | set(current))

    def short(value: Any) -> str:
        return json.dumps(value)[:200]

    return [
        f"{k}: cache has {short(stored.get(k))}, config gives {short(current.get(k))}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


def read_index(cache_dir: str | Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def check_cache(cfg: Config, need_complete: bool = True) -> dict[str, Any]:
    """The cache's index for this config, or a ValueError saying what to do."""
    root = Path(cfg.data.cache_dir or "")
    index = read_index(root)
    if index is None:
        raise ValueError(
            f"data.cache_dir={str(root)!r} holds no {INDEX}; build it with "
            "`fluxlab cache --config ...` (same config and overrides as training)"
        )
    if index.get("format") != FORMAT:
        raise ValueError(
            f"{root / INDEX} has format {index.get('format')!r}, expected {FORMAT!r}; "
            "rebuild the cache"
        )
    diff = fingerprint_mismatch(index["fingerprint"], fingerprint(cfg))
    if diff:
        raise ValueError(
            f"data.cache_dir={str(root)!r} was built with other settings; delete it or choose "
            "another data.cache_dir, then run `fluxlab cache`. Differences:\n  " + "\n  ".join(diff)
        )
    if need_complete and not index.get("complete"):
        raise ValueError(
            f"the cache in {root} is unfinished; "
            "run `fluxlab cache` again with the same config to finish it"
        )
    return index


def shard_meta(f: Any) -> dict[str, Any]:
    """The JSON metadata of an open shard (``safe_open`` handle)."""
    return json.loads((f.metadata() or {}).get(META_KEY, "{}"))


def load_text_table(cache_dir: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """caption → (txt [L, D], vec [P]) float32 for the prompts stored beside the data."""
    with safe_open(str(Path(cache_dir) / TEXT), framework="pt") as f:
        captions = shard_meta(f)["captions"]
        txt, vec = f.get_tensor("txt").float(), f.get_tensor("vec").float()
    return {c: (txt[i], vec[i]) for i, c in enumerate(captions)}


class CachedLatents(Dataset):
    """One split of the cache in memory.

    Items are {"latent" | "mean"+"logvar", "txt", "vec", "caption", "index"}.

    Examples are numbered bucket by bucket (in index.json order), so ``bucket_of`` is sorted and a
    sequential pass (validation) yields single-bucket batches through ``eval_batches``.
    """

    def __init__(self, cache_dir: str | Path, index: dict[str, Any], split: str) -> None:
        self.root = Path(cache_dir)
        info = index["splits"].get(split)
        if not info or not info["count"]:
            raise ValueError(
                f"the cache in {self.root} has no {split!r} examples; raise data.val_fraction "
                "and rebuild it or set train.eval_every=0"
                if split == "val"
                else f"the cache in {self.root} is empty"
            )
        self.keys = ["mean", "logvar"] if index["latents"] == "sample" else ["latent"]
        self.buckets: list[tuple[int, int]] = []
        self.latent_hw: list[tuple[int, int]] = []
        self.tensors: list[dict[str, Tensor]] = []  # per bucket
        txt, vec, self.captions, self.source_index, bucket_of, rows = [], [], [], [], [], []
        for b, entry in enumerate(info["buckets"].values()):
            parts: dict[str, list[Tensor]] = {k: [] for k in self.keys}
            for shard in entry["shards"]:
                with safe_open(str(self.root / shard), framework="pt") as f:
                    for k in self.keys:
                        parts[k].append(f.get_tensor(k))
                    txt.append(f.get_tensor("txt"))
                    vec.append(f.get_tensor("vec"))
                    self.source_index.extend(f.get_tensor("index").tolist())
                    self.captions.extend(shard_meta(f)["captions"])
            self.tensors.append({k: torch.cat(v) for k, v in parts.items()})
            n = len(self.tensors[-1][self.keys[0]])
            bucket_of += [b] * n
            rows += range(n)
            self.buckets.append(tuple(entry["size"]))
            self.latent_hw.append(tuple(entry["latent_hw"]))
        self.txt, self.vec = torch.cat(txt), torch.cat(vec)
        self.bucket_of, self.rows = bucket_of, torch.tensor(rows)

    def __len__(self) -> int:
        return len(self.bucket_of)

    def _all(self) -> list[Tensor]:
        return [t for per_bucket in self.tensors for t in per_bucket.values()] + [
            self.txt,
            self.vec,
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._all())

    def to(self, device: torch.device) -> CachedLatents:
        """Moves every tensor (and the row table) onto ``device``, in place."""
        self.tensors = [
            {k: v.to(device) for k, v in per_bucket.items()} for per_bucket in self.tensors
        ]
        self.txt, self.vec, self.rows = (
            self.txt.to(device),
            self.vec.to(device),
            self.rows.to(device),
        )
        return self

    def take(self, n: int | None) -> CachedLatents:
        """The first ``n`` examples only (data.val_limit), in place."""
        if n is not None and n < len(self):
            self.bucket_of, self.rows = self.bucket_of[:n], self.rows[:n]
            self.txt, self.vec, self.captions = self.txt[:n], self.vec[:n], self.captions[:n]
        return self

    def __getitem__(self, i: int) -> dict[str, Any]:
        b, r = self.bucket_of[i], int(self.rows[i])
        item: dict[str, Any] = {k: self.tensors[b][k][r] for k in self.keys}
        return {
            **item,
            "txt": self.txt[i],
            "vec": self.vec[i],
            "caption": self.captions[i],
            "index": i,
        }

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """A single-bucket batch gathered in one indexing op per tensor (no per-item collate)."""
        idx = torch.tensor(indices, device=self.txt.device)
        b = self.bucket_of[indices[0]]
        rows = self.rows[idx]
        out: dict[str, Any] = {k: self.tensors[b][k][rows] for k in self.keys}
        return {
            **out,
            "txt": self.txt[idx],
            "vec": self.vec[idx],
            "caption": [self.captions[i] for i in indices],
            "index": idx,
            "skipped": 0,
        }

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[dict[str, Any]]:
        """Training batches forever, single-bucket, shuffled per epoch (see BucketBatchSampler).

        With one bucket (a fixed-resolution cache) every batch is full, as the pixel loader's: a
        short last batch would cost a compiled run a recompile for its shape. With several, a
        bucket smaller than a batch would otherwise never train, so short batches stay.
        """
        one_bucket = len(self.buckets) == 1
        for indices in BucketBatchSampler(
            self.bucket_of, batch_size, seed, rank, world, start_batch, drop_last=one_bucket
        ):
            yield self.batch(indices)

    def eval_batches(self, batch_size: int) -> list[list[int]]:
        """Consecutive examples cut at bucket boundaries (a DataLoader's batch_sampler)."""
        out: list[list[int]] = []
        for i, b in enumerate(self.bucket_of):
            if not out or len(out[-1]) == batch_size or self.bucket_of[out[-1][0]] != b:
                out.append([])
            out[-1].append(i)
        return out


def open_cache(cfg: Config, split: str, device: torch.device | None = None) -> CachedLatents:
    """The cached split for this config, after checking the fingerprint.

    It moves onto a GPU ``device`` when it takes under GPU_RESIDENT_BYTES there (batches are then
    gathered on the GPU: no loader, no copies).
    """
    index = check_cache(cfg)
    ds = CachedLatents(cfg.data.cache_dir or "", index, split)
    if device is not None and device.type == "cuda" and ds.nbytes() < GPU_RESIDENT_BYTES:
        ds.to(device)
    return ds


def bucket_dir(split: str, size: tuple[int, int]) -> str:
    return f"{split}/{bucket_name(size)}"
