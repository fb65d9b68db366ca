"""WebDataset tar shards as a streaming dataset: split over ranks × workers, shuffled, resumable.

The order is a pure function of (seed, epoch, slot), where a slot is one (rank, dataloader
worker): each epoch the shard list is permuted by (seed, epoch) and dealt to the slots (whole
shards when there are at least as many shards as slots, else every slot reads all shards and keeps
every S-th sample), then each slot shuffles its stream through a buffer seeded by (seed, epoch,
slot). So every sample is seen exactly once per epoch across ranks × workers, and a reader
restarted at sample k replays the same stream from sample k (+1 in 1-based counting) on.

Construction is cheap; the first use of ``captions``/``len()``/iteration reads every shard once
without decoding images (the *index pass*): it yields each shard's sample count (whole epochs are
skipped on resume without reading them), the captions (the text-to-image task encodes all of them
once) and the class names. That pass costs one sequential read of the data, which is fine up to a
few hundred GB on local disk; beyond that, encode captions per batch instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from fluxlab.data.common import check_limit, check_split, keep_for_split
from fluxlab.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_MEMBERS", "ShardDataset", "expand_shards", "is_shard_spec"]

# Member suffixes that hold the image, in order of preference when a sample has several.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{\d+\.\.\d+\}")


def is_shard_spec(spec: str | os.PathLike[str]) -> bool:
    """Whether a `data.dataset` value names WebDataset shards: a `pipe:` URL, a path ending in
    .tar or a brace range like `data/{00000..00127}.tar`; several may be joined with `::`."""
    text = str(spec)
    if text.startswith("pipe:"):
        return True
    return any(part.endswith(".tar") or _BRACES.search(part) for part in text.split("::"))


def expand_shards(spec: str | os.PathLike[str]) -> list[str]:
    """Brace-expanded shard URLs; local paths get `~` expanded and must exist (a typo in a pattern
    should fail at startup, not after hours of training on half the data)."""
    urls = []
    for url in wds.shardlists.expand_urls(str(spec)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", url) and not url.startswith("file:"):
            urls.append(url)  # pipe:, http:, s3: ... are opened by webdataset's gopen
            continue
        urls.append(str(Path(re.sub(r"^file://?", "", url)).expanduser()))
    if not urls:
        raise ValueError(f"shard spec {str(spec)!r} expands to no shards")
    missing = [
        u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {str(spec)!r} do not exist, "
            f"e.g. {missing[0]}; check the path and the brace range"
        )
    return urls


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(sample: dict[str, Any]) -> str:
    """`.txt` member, else `.json`'s "caption" or "text", else ""."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    meta = _meta(sample)
    text = meta.get("caption", meta.get("text"))
    return "" if text is None else str(text).strip()


def sample_label(sample: dict[str, Any]) -> int:
    """`.cls` member, else `.json`'s "label", else -1 (unlabelled)."""
    try:
        if "cls" in sample:
            return int(sample["cls"].decode().strip())
        return int(_meta(sample).get("label", -1))
    except (ValueError, TypeError, UnicodeDecodeError):
        return -1


def worker_skip(start: int, batch_size: int, worker: int, workers: int) -> int:
    """Samples worker `worker`'s stream had produced when the loader handed out `start` samples.

    A DataLoader over an IterableDataset takes batch j from worker j % workers, so the loader's
    sample stream is the workers' batches interleaved round-robin.
    """
    full, rem = divmod(start, batch_size)
    mine = max(0, (full - worker + workers - 1) // workers)
    return mine * batch_size + (rem if full % workers == worker else 0)


class ShardDataset(IterableDataset):
    """Items {"image", "caption", "index", "label"} from tar shards, or None for an undecodable one.

    `index` is the sample's position in the unshuffled order (shards as listed), so
    ``captions[index] == item["caption"]``. `rank`/`world` default to torchrun's RANK/WORLD_SIZE;
    `epochs=None` streams forever. `resume_at(k, batch_size)` makes the next iteration start after
    the first k samples the DataLoader (with that batch size) would have produced.
    """

    def __init__(
        self,
        spec: str | os.PathLike[str],
        transform: Callable[..., torch.Tensor],
        split: str = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        limit: int | None = None,
        epochs: int | None = None,
        rank: int | None = None,
        world: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        check_split(split, val_fraction, f"ShardDataset({spec})")
        check_limit(limit)
        if shuffle_buffer < 0:
            raise ValueError(
                f"data.shuffle_buffer must be >= 0 (0 or 1 = no shuffle), got {shuffle_buffer}"
            )
        self.spec = str(spec)
        self.urls = expand_shards(spec)
        self.transform = transform
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.shuffle_buffer, self.limit, self.epochs = shuffle_buffer, limit, epochs
        self.rank, self.world = rank, world
        self.max_pixels = max_pixels
        self.augments = bool(
            getattr(transform, "crop", "center") == "random"
            or getattr(transform, "hflip", False)
            or getattr(transform, "color_jitter", 0.0) > 0
        )
        self.start_sample, self.batch_size = 0, 1
        # Tallies of this process (each loader worker keeps its own; the warnings name every case).
        self.bad_samples = 0
        self.broken_shards = 0
        self._counts: list[int] | None = None
        self._captions: list[str] = []
        self._labels: list[int] = []
        self._class_names: dict[int, str] = {}

    # ------------------------------------------------------------------ reading raw samples
    def _raw(self, shard: int, indexing: bool = False) -> Iterator[dict[str, Any]]:
        """Undecoded samples of one shard that belong to the split.

        A tar error ends the shard with a warning naming it (webdataset's handler mechanism)
        instead of ending the run. Breaks are counted while streaming only, so the index pass does
        not count each one twice.
        """
        url = self.urls[shard]
        failed = False

        def handler(exn: Exception) -> bool:
            nonlocal failed
            if not failed:
                self.broken_shards += 0 if indexing else 1
                when = "while indexing" if indexing else "while streaming"
                logger.warning(
                    "shard %s is broken (%s %s: %s); skipping the rest of it",
                    url,
                    type(exn).__name__,
                    when,
                    exn.args[0] if exn.args else exn,
                )
            failed = True
            return False  # stop this shard: after a tar error nothing later in it is trustworthy

        try:
            stream = wds.gopen(url, "rb")
        except Exception as exn:  # noqa: BLE001 - any opener failure (missing file, failed pipe) skips the shard
            handler(exn)
            return
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            for sample in group_by_keys(files, handler=handler):
                if self.split == "all":
                    yield sample
                    continue
                # OpenMoji shards name a split_key so skin-tone variants share their emoji's split.
                key = str(_meta(sample).get("split_key", sample["__key__"]))
                if keep_for_split(key, self.split, self.val_fraction, self.seed):
                    yield sample
        finally:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a pipe closed early reports SIGPIPE; the data was read
                pass

    def _ensure_index(self) -> list[int]:
        """Per-shard sample counts (and captions, labels, class names), read once."""
        if self._counts is not None:
            return self._counts
        counts: list[int] = []
        budget = self.limit
        bar = tqdm(
            self.urls, desc="indexing shards", unit="shard", leave=False, disable=len(self.urls) < 8
        )
        for shard in range(len(self.urls)):
            n = 0
            for sample in self._raw(shard, indexing=True) if budget != 0 else ():
                if budget is not None and n >= budget:
                    break
                self._captions.append(sample_caption(sample))
                label = sample_label(sample)
                self._labels.append(label)
                name = _meta(sample).get("class")
                if label >= 0 and name is not None:
                    self._class_names.setdefault(label, str(name))
                n += 1
            counts.append(n)
            if budget is not None:
                budget -= n
            bar.update(1)
        bar.close()
        if sum(counts) == 0:
            raise ValueError(
                f"shards {self.spec!r} hold no readable samples in the {self.split!r} split"
            )
        self._counts = counts
        return counts

    @property
    def captions(self) -> list[str]:
        self._ensure_index()
        return self._captions

    @property
    def labels(self) -> list[int]:
        self._ensure_index()
        return self._labels

    @property
    def classes(self) -> list[str]:
        self._ensure_index()
        n = max(self._labels, default=-1) + 1
        return [self._class_names.get(i, str(i)) for i in range(n)]

    def __len__(self) -> int:
        return sum(self._ensure_index())

    def take(self, n: int | None) -> ShardDataset:
        """The first `n` samples only (in unshuffled order), in place; None keeps all."""
        if n is None:
            return self
        check_limit(n)
        self.limit = n if self.limit is None else min(n, self.limit)
        if self._counts is not None:  # trim the index instead of reading the shards again
            budget, counts = self.limit, []
            for c in self._counts:
                counts.append(min(c, budget))
                budget -= counts[-1]
            self._counts = counts
            self._captions, self._labels = self._captions[: self.limit], self._labels[: self.limit]
        return self

    # ------------------------------------------------------------------ order
    def resume_at(self, samples: int, batch_size: int = 1) -> None:
        """Start the next iteration after `samples` samples, handed out in `batch_size` batches."""
        if samples < 0 or batch_size < 1:
            raise ValueError(
                f"resume_at needs samples >= 0 and batch_size >= 1, got {samples}, {batch_size}"
            )
        self.start_sample, self.batch_size = samples, batch_size

    def _who(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        rank = rank if self.rank is None else self.rank
        world = world if self.world is None else self.world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank, world, worker, workers

    def _plan(self, epoch: int, slot: int, slots: int) -> tuple[list[int], bool, int]:
        """(shards to read, whether to keep only every slots-th sample, samples this slot gets)."""
        counts = self._ensure_index()
        order = list(range(len(counts)))
        if (
            self.shuffle_buffer > 1
        ):  # 0/1 means the stored order, shards included (evaluation passes)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if len(order) >= slots:
            mine = order[slot::slots]
            return mine, False, sum(counts[i] for i in mine)
        # Fewer shards than slots: all slots read everything and deal samples round-robin.
        return order, True, len(range(slot, sum(counts), slots))

    def _epoch(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[int, dict[str, Any]]]:
        counts = self._ensure_index()
        offsets = [0, *itertools.accumulate(counts)]
        shards, deal, _ = self._plan(epoch, slot, slots)

        def stream() -> Iterator[tuple[int, dict[str, Any]]]:
            dealt = 0
            for shard in shards:
                for pos, sample in enumerate(self._raw(shard)):
                    if pos >= counts[shard]:  # `limit` cut this shard short
                        break
                    dealt += 1
                    if not deal or (dealt - 1) % slots == slot:
                        yield offsets[shard] + pos, sample

        if self.shuffle_buffer <= 1:
            return stream()
        seed = (self.seed * 1_000_003 + epoch) * 65_537 + slot
        return wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed)(stream())

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        rank, world, worker, workers = self._who()
        # A restarted DataLoader asks worker 0 first, but the next batch belongs to the stream of
        # the worker whose turn it was: rotate the roles so the interleaved order carries on.
        role = (worker + self.start_sample // self.batch_size) % workers
        slots, slot = world * workers, rank * workers + role
        skip = worker_skip(self.start_sample, self.batch_size, role, workers)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            length = self._plan(epoch, slot, slots)[2]
            if skip >= length:  # a whole epoch already seen: skip it without reading
                skip -= length
            else:
                for index, sample in self._epoch(epoch, slot, slots):
                    if skip:  # replayed through the shuffle buffer, never decoded
                        skip -= 1
                        continue
                    yield self._item(index, sample, epoch)
            epoch += 1

    # ------------------------------------------------------------------ decoding
    def _item(self, index: int, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        name = f"{sample['__url__']}:{sample['__key__']}"
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        try:
            if member is None:
                have = sorted(k for k in sample if not k.startswith("__"))
                raise BadImageError(name, f"sample has no image member (has {have})")
            img = decode_image(sample[member], f"{name}.{member}", self.max_pixels)
        except BadImageError as err:
            # One bad sample must not end a long run; collate_skip_bad drops the None and counts it.
            self.bad_samples += 1
            logger.warning("skipping %s", err)
            return None
        if (
            self.augments
        ):  # crops/flips depend on (seed, epoch, sample) only, so a resumed run matches
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch) * 10_000_019 + index
            )
            image = self.transform(img, gen)
        else:
            image = self.transform(img)
        return {
            "image": image,
            "caption": sample_caption(sample),
            "index": index,
            "label": sample_label(sample),
        }
