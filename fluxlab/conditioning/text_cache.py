"""Encode a dataset's captions once and keep the embeddings on disk.

One safetensors file per (encoder, max_length, storage dtype, set of unique captions), named by a
hash of those, so a rerun over the same captions loads instead of running T5-XXL again, and any
change to the encoder or the captions misses the cache rather than returning stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fluxlab.conditioning.text_encoders import TextEncoder

CACHE_FORMAT = "fluxlab-text-embeddings-v1"
# float16 halves the size of the token tensors, the bulk of the file (T5: 512 x 4096 per caption);
# encoder outputs are layer-normed, far inside its range, and the check below catches exceptions.
DEFAULT_STORAGE_DTYPE = torch.float16


def text_cache_key(
    encoder: TextEncoder, unique_captions: list[str], storage_dtype: torch.dtype
) -> str:
    """sha256 over everything that changes the stored tensors; captions must be sorted and
    unique."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "encoder": encoder.name,
            "max_length": encoder.max_length,
            "storage_dtype": str(storage_dtype),
            "captions": unique_captions,
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def text_cache_path(
    encoder: TextEncoder,
    captions: list[str],
    cache_dir: Path,
    storage_dtype: torch.dtype = DEFAULT_STORAGE_DTYPE,
) -> Path:
    """Where ``encode_captions_cached`` keeps the embeddings of ``captions`` (order and repeats do
    not matter)."""
    key = text_cache_key(encoder, sorted(set(captions)), storage_dtype)
    return Path(cache_dir) / f"text-{key[:32]}.safetensors"


def encode_captions_cached(
    encoder: TextEncoder,
    captions: list[str],
    cache_dir: Path,
    batch_size: int = 256,
    show_progress: bool = True,
    storage_dtype: torch.dtype = DEFAULT_STORAGE_DTYPE,
) -> tuple[Tensor, Tensor]:
    """Embeddings of ``captions`` in their order: ([N, L, D], [N, P]) float32 on the CPU.

    Each distinct caption is encoded once; the tokens are stored in ``storage_dtype`` and the pooled
    vectors (small) in float32. A second call with the same captions reads the file and never runs
    the encoder.
    """
    if isinstance(captions, str):
        raise ValueError("encode_captions_cached takes a list of captions, got a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    unique = sorted(set(captions))
    path = text_cache_path(encoder, unique, Path(cache_dir), storage_dtype)
    stored = _load(path, encoder, len(unique))
    if stored is None:
        stored = _encode_unique(encoder, unique, batch_size, show_progress, storage_dtype)
        _save_atomic(path, stored, encoder, len(unique))
    row = {caption: i for i, caption in enumerate(unique)}
    index = torch.tensor([row[c] for c in captions], dtype=torch.long)
    tokens, pooled = stored
    return tokens[index].float(), pooled[index].float()


def empty_caption_embeddings(
    encoder: TextEncoder, cache_dir: Path | None = None
) -> tuple[Tensor, Tensor]:
    """The "" embedding ([1, L, D], [1, P] float32, CPU): the unconditional input of CFG and
    caption dropout.

    With ``cache_dir`` it goes through the same cache (and float16 rounding) as the dataset's
    captions, so dropped captions look exactly like the ones the model is trained on.
    """
    if cache_dir is not None:
        return encode_captions_cached(encoder, [""], cache_dir, show_progress=False)
    tokens, pooled = encoder.encode([""])
    return tokens.float().cpu(), pooled.float().cpu()


def _encode_unique(
    encoder: TextEncoder,
    unique: list[str],
    batch_size: int,
    show_progress: bool,
    storage_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    tokens = torch.empty(len(unique), encoder.max_length, encoder.context_dim, dtype=storage_dtype)
    pooled = torch.empty(len(unique), encoder.pooled_dim, dtype=torch.float32)
    finite_max = torch.finfo(storage_dtype).max
    desc = f"text embeddings ({encoder.name})"
    with tqdm(total=len(unique), desc=desc, unit="caption", disable=not show_progress) as bar:
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            batch_tokens, batch_pooled = encoder.encode(batch)
            if batch_tokens.abs().max() > finite_max:
                # Fail on the first bad batch instead of writing inf after hours of encoding.
                raise ValueError(
                    f"text encoder {encoder.name} produced values beyond {storage_dtype}'s range; "
                    "pass storage_dtype=torch.bfloat16 or torch.float32 to encode_captions_cached"
                )
            tokens[start : start + len(batch)] = batch_tokens.to("cpu", storage_dtype)
            pooled[start : start + len(batch)] = batch_pooled.to("cpu", torch.float32)
            bar.update(len(batch))
    return tokens, pooled


def _load(path: Path, encoder: TextEncoder, count: int) -> tuple[Tensor, Tensor] | None:
    """The stored tensors, or None when the file is absent, unreadable or not what its key says."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tokens, pooled = f.get_tensor("tokens"), f.get_tensor("pooled")
    except (OSError, SafetensorError):
        return None
    expected = (count, encoder.max_length, encoder.context_dim)
    if meta.get("encoder") != encoder.name:
        return None
    if tuple(tokens.shape) != expected or tuple(pooled.shape) != (count, encoder.pooled_dim):
        return None
    return tokens, pooled


def _save_atomic(
    path: Path, stored: tuple[Tensor, Tensor], encoder: TextEncoder, count: int
) -> None:
    # A crash or a second process mid-write must never leave a truncated file under the final name:
    # write beside it, then rename, which is atomic on one filesystem.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    tokens, pooled = stored
    metadata = {"format": CACHE_FORMAT, "encoder": encoder.name, "num_captions": str(count)}
    try:
        save_file(
            {"tokens": tokens.contiguous(), "pooled": pooled.contiguous()}, tmp, metadata=metadata
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
