"""Bad data thrown at the datasets, each with the answer a user should get (issue 23)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlab.config.loading import load_config
from fluxlab.data import (
    BadImageError,
    ImageCaptionFolder,
    ImageTransform,
    OpenMoji,
    ShardDataset,
    build_dataset,
    load_image,
)
from fluxlab.data.folder import find_images
from fluxlab.data.shard_writer import folder_samples, write_shards
from fluxlab.data.training import train_batches, train_dataset

CPU = torch.device("cpu")


def _images(folder: Path, n: int, size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:02d}.png")
        Image.new("RGB", (size, size), (i * 10 % 256, 0, 0)).save(paths[-1])
    return paths


# ---------------------------------------------------------------- folder scans


def test_a_symlink_loop_counts_each_image_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _images(tmp_path / "a", 3)
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["a/00.png", "a/01.png", "a/02.png"]
    assert "1 folders under" in caplog.text and "a/up" in caplog.text


def test_two_symlink_loops_end(tmp_path: Path) -> None:
    _images(tmp_path / "a", 2)
    _images(tmp_path / "b", 2)
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "b" / "to_a").symlink_to(tmp_path / "a", target_is_directory=True)
    result: list[list[Path]] = []
    scan = threading.Thread(target=lambda: result.append(find_images(tmp_path)), daemon=True)
    scan.start()
    scan.join(timeout=60)
    assert not scan.is_alive(), "the scan of two symlink loops did not end"
    assert len(result[0]) == 4


def test_a_symlinked_folder_outside_the_root_is_read(tmp_path: Path) -> None:
    _images(tmp_path / "elsewhere", 2)
    root = tmp_path / "root"
    _images(root, 1)
    (root / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == [
        "00.png",
        "more/00.png",
        "more/01.png",
    ]


# ---------------------------------------------------------------- captions


def test_a_metadata_row_naming_a_missing_file_is_named_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _images(tmp_path, 2)
    rows = [{"file_name": "00.png", "text": "zero"}, {"file_name": "gone.png", "text": "lost"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, ImageTransform(8))
    assert ds.n_unmatched_rows == 1 and "gone.png" in caplog.text and "1 of 2 rows" in caplog.text
    assert ds.captions == ["zero", ""] and ds.n_missing_captions == 1


def test_empty_captions_are_named_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _images(tmp_path, 3)
    (tmp_path / "00.txt").write_text("  \n")  # an empty sidecar
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "01.png", "text": ""})
        + "\n"
        + json.dumps({"file_name": "02.png", "text": "red"})
        + "\n"
    )
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, ImageTransform(8))
    assert ds.captions == ["", "", "red"]
    assert ds.n_empty_captions == 2 and ds.n_missing_captions == 0 and ds.n_unmatched_rows == 0
    assert "2 of 3 images" in caplog.text and "empty caption" in caplog.text
    assert "00.png" in caplog.text and "01.png" in caplog.text


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("limit", [-1, 0])
def test_a_limit_below_one_is_refused(tmp_path: Path, limit: int) -> None:
    _images(tmp_path, 2)
    for dataset in (tmp_path, "openmoji"):
        with pytest.raises(ValueError, match=f"data.limit={limit} must be at least 1"):
            build_dataset(dataset, 16, limit=limit)
    with pytest.raises(ValueError, match="data.limit"):
        OpenMoji(16, limit=limit)


def test_the_max_pixels_hint_names_a_real_setting(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40), "red").save(big)
    with pytest.raises(BadImageError, match="raise data.max_pixels") as err:
        load_image(big, max_pixels=1000)
    assert "1600 pixels exceeds max_pixels=1000" in str(err.value)
    cfg = load_config("debug", [f"--data.dataset={tmp_path}", "--data.max_pixels=1000"])
    assert cfg.data.max_pixels == 1000
    assert train_dataset(cfg, CPU)[0] is None  # skipped (and counted by the collate)
    lifted = load_config("debug", [f"--data.dataset={tmp_path}", "--data.max_pixels=null"])
    assert lifted.data.max_pixels is None
    item = train_dataset(lifted, CPU)[0]
    assert item is not None and item["image"].shape == (3, 16, 16)


# ---------------------------------------------------------------- val_fraction = 0


def test_val_fraction_zero_trains_a_folder_as_the_training_split(tmp_path: Path) -> None:
    _images(tmp_path, 6, size=24)
    overrides = [f"--data.dataset={tmp_path}", "--data.hflip=true", "--data.crop=random"]
    held_out = train_dataset(load_config("debug", overrides), CPU)
    everything = train_dataset(load_config("debug", [*overrides, "--data.val_fraction=0"]), CPU)
    assert len(everything) == 6 and len(held_out) <= 6
    for ds in (held_out, everything):  # augmented in both cases
        assert ds.transform.hflip and ds.transform.crop == "random"


def test_val_fraction_zero_keeps_openmoji_augmented() -> None:
    cfg = load_config("debug", ["--data.val_fraction=0", "--data.hflip=true"])
    ds = train_dataset(cfg, CPU)
    assert len(ds) == 64 and ds.transform is not None and ds.transform.hflip


def test_val_fraction_zero_streams_shards_shuffled_past_one_epoch(tmp_path: Path) -> None:
    _images(tmp_path / "images", 6)
    count, samples = folder_samples(tmp_path / "images")
    paths = write_shards(samples, tmp_path / "shards", shard_size=3, total=count)
    spec = str(tmp_path / "shards" / "{000000..000001}.tar")
    assert len(paths) == 2
    cfg = load_config(
        "debug", [f"--data.dataset={spec}", "--data.val_fraction=0", "--optim.batch_size=2"]
    )
    ds = train_dataset(cfg, CPU)
    assert isinstance(ds, ShardDataset) and ds.split == "train"
    assert ds.epochs is None and ds.shuffle_buffer > 1 and ds.rank is None
    batches = list(itertools.islice(train_batches(ds, cfg, 0, 0, 1, CPU), 9))  # 3 epochs
    seen = [int(i) for b in batches for i in b["index"]]
    assert sorted(seen) == sorted(list(range(6)) * 3)
    assert seen[:6] != list(range(6)) or seen[6:12] != list(range(6))  # shuffled


def test_val_fraction_zero_splits_folders_over_ranks(tmp_path: Path) -> None:
    _images(tmp_path, 8)
    cfg = load_config(
        "debug", [f"--data.dataset={tmp_path}", "--data.val_fraction=0", "--optim.batch_size=2"]
    )
    ds = train_dataset(cfg, CPU)
    per_rank = [
        [
            int(i)
            for batch in itertools.islice(train_batches(ds, cfg, 0, rank, 2, CPU), 2)
            for i in batch["index"]
        ]
        for rank in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(8))


def test_symlinked_images_in_a_loop_train_once(tmp_path: Path) -> None:
    _images(tmp_path / "x", 4)
    os.symlink(tmp_path, tmp_path / "x" / "loop")
    ds = ImageCaptionFolder(tmp_path, ImageTransform(8))
    assert len(ds) == 4 and np.unique([str(p) for p in ds.paths]).size == 4
