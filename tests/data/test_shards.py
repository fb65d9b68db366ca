"""WebDataset shards: written by `fluxlab shard`, read back exactly, split over ranks × workers,
resumable."""

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from fluxlab.bench.loader import workers_to_feed
from fluxlab.cli import main
from fluxlab.data import (
    ImageCaptionFolder,
    ImageTransform,
    OpenMoji,
    ShardDataset,
    build_dataset,
    collate_skip_bad,
)
from fluxlab.data.shards import expand_shards, is_shard_spec, worker_skip

RES = 16
N = 30


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def emoji_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """30 OpenMoji renders in 6 shards of 5, written through the CLI."""
    out = tmp_path_factory.mktemp("shards")
    args = [
        "shard",
        "--input",
        "openmoji",
        "--output",
        str(out),
        "--resolution",
        str(RES),
        "--shard-size",
        "5",
    ]
    assert main([*args, "--limit", str(N)]) == 0
    assert len(list(out.glob("*.tar"))) == 6
    return str(out / "{000000..000005}.tar")


def _reader(spec: str, **kw) -> ShardDataset:
    return ShardDataset(spec, ImageTransform(RES), **kw)


def test_shard_spec_detection_and_missing_shards(tmp_path: Path) -> None:
    assert is_shard_spec("data/{00000..00127}.tar") and is_shard_spec("pipe:curl -s http://x/a.tar")
    assert not is_shard_spec("openmoji") and not is_shard_spec(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="2 of 2 shards"):
        expand_shards(str(tmp_path / "{0..1}.tar"))


def test_openmoji_shards_read_back_pixel_exact(emoji_shards: str) -> None:
    reference = OpenMoji(RES, limit=N)
    items = list(_reader(emoji_shards, shuffle_buffer=0, epochs=1))
    assert [it["index"] for it in items] == list(range(N))  # unshuffled order = written order
    for it in items:
        ref = reference[it["index"]]
        assert torch.equal(it["image"], ref["image"])  # PNG is lossless
        assert (it["caption"], it["label"]) == (ref["caption"], ref["label"])
    ds = _reader(emoji_shards)
    assert len(ds) == N and ds.captions == reference.captions and ds.labels == reference.labels
    piped = list(
        _reader(f"pipe:cat {emoji_shards}", shuffle_buffer=0, epochs=1)
    )  # streamed like remote shards
    assert [it["index"] for it in piped] == list(range(N)) and torch.equal(
        piped[7]["image"], items[7]["image"]
    )


def test_folder_shards_keep_original_bytes_and_captions(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i, (cls, ext) in enumerate(
        [("cats", "jpg"), ("cats", "png"), ("dogs", "png"), ("dogs", "jpeg")]
    ):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(
            root / cls / f"im{i}.{ext}"
        )
        (root / cls / f"im{i}.txt").write_text(f"caption {i} ünïcode")
    out = tmp_path / "shards"
    assert main(["shard", "--input", str(root), "--output", str(out), "--shard-size", "3"]) == 0
    folder = ImageCaptionFolder(root, ImageTransform(RES))
    with tarfile.open(out / "000000.tar") as tar:  # stored as-is, not re-encoded
        assert tar.extractfile("000000000.jpg").read() == folder.paths[0].read_bytes()
    items = list(_reader(str(out / "{000000..000001}.tar"), shuffle_buffer=0, epochs=1))
    assert len(items) == len(folder) == 4
    for it in items:
        ref = folder[it["index"]]
        assert (
            torch.equal(it["image"], ref["image"])
            and it["caption"] == ref["caption"]
            and it["label"] == ref["label"]
        )
    assert _reader(str(out / "{000000..000001}.tar")).classes == folder.classes


@pytest.mark.parametrize(
    "shard_size", [5, 10]
)  # 6 shards: whole shards per slot; 3 shards < 4 slots: dealt
def test_two_ranks_two_workers_see_every_sample_once(tmp_path: Path, shard_size: int) -> None:
    out = tmp_path / "s"
    assert (
        main(
            [
                "shard",
                "--input",
                "openmoji",
                "--output",
                str(out),
                "--resolution",
                str(RES),
                "--shard-size",
                str(shard_size),
                "--limit",
                str(N),
            ]
        )
        == 0
    )
    spec = str(out / f"{{000000..{N // shard_size - 1:06d}}}.tar")
    seen: list[int] = []
    for rank in range(2):
        ds = _reader(spec, seed=5, shuffle_buffer=4, epochs=1, rank=rank, world=2)
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_bad)
        mine = [i for batch in loader for i in batch["index"].tolist()]
        assert 0 < len(mine) < N
        seen += mine
    assert sorted(seen) == list(range(N))


def test_restart_at_sample_k_continues_in_the_same_order(emoji_shards: str) -> None:
    first = [
        it["index"] for it in itertools.islice(_reader(emoji_shards, seed=7, shuffle_buffer=8), 75)
    ]
    assert sorted(first[:N]) == list(range(N)) and sorted(first[N : 2 * N]) == list(range(N))
    assert first[:N] != first[N : 2 * N] and first[:N] != list(range(N))  # reshuffled every epoch
    for k in (1, 17, 37):  # within epoch 0, and past a whole skipped epoch
        again = _reader(emoji_shards, seed=7, shuffle_buffer=8)
        again.resume_at(k)
        assert [it["index"] for it in itertools.islice(again, 75 - k)] == first[k:]
    other_seed = [
        it["index"] for it in itertools.islice(_reader(emoji_shards, seed=8, shuffle_buffer=8), N)
    ]
    assert other_seed != first[:N]


def test_restart_through_a_two_worker_loader(emoji_shards: str) -> None:
    def loader_order(start_batch: int) -> list[int]:
        ds = _reader(emoji_shards, seed=3, shuffle_buffer=6)
        ds.resume_at(start_batch * 4, batch_size=4)
        batches = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad)
        return [
            i
            for batch in itertools.islice(batches, 12 - start_batch)
            for i in batch["index"].tolist()
        ]

    full = loader_order(0)
    assert loader_order(5) == full[5 * 4 :]
    assert [worker_skip(21, 4, w, 2) for w in (0, 1)] == [
        12,
        9,
    ]  # batches 0,2,4 + 1 of batch 5 | 1,3


def _corrupt_shards(tmp_path: Path) -> str:
    good = io.BytesIO()
    Image.new("RGB", (RES, RES), (200, 10, 10)).save(good, format="PNG")
    out = tmp_path / "bad"
    out.mkdir()
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(12):
            png = b"\x89PNG\r\n\x1a\n not really" if i == 5 else good.getvalue()
            sink.write({"__key__": f"{i:04d}", "png": png, "txt": f"red {i}", "cls": "0"})
    shard = out / "000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated mid-sample, as by a failed copy
    return str(out / "{000000..000002}.tar")


def test_broken_shard_and_corrupt_sample_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    spec = _corrupt_shards(tmp_path)
    ds = _reader(spec, shuffle_buffer=0, epochs=1)
    with caplog.at_level(logging.WARNING):
        n = len(ds)
        items = list(ds)
    assert 8 < n < 12  # the truncated shard still gave what preceded the cut
    assert len(items) == n and sum(it is None for it in items) == ds.bad_samples >= 1
    assert ds.broken_shards == 1
    assert "000002.tar" in caplog.text and "000001.tar:0005" in caplog.text
    good = [it for it in items if it is not None]
    assert all(it["caption"] == f"red {it['index']}" for it in good[:8])
    batch = collate_skip_bad(items[4:8])
    assert (
        batch is not None and batch["skipped"] == 1
    )  # the trainer counts it like a bad folder image


def test_debug_training_reads_shards_and_resumes_bitwise(emoji_shards: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    common = [
        "--config",
        "debug",
        f"--data.dataset={emoji_shards}",
        "--data.shuffle_buffer=8",
        "--optim.batch_size=4",
        "--train.tensorboard=false",
        "--train.checkpoint_every=2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, f"--train.output_dir={straight}"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--optim.steps=2"]) == 0
    assert main(["train", *common, f"--train.output_dir={resumed}", "--resume"]) == 0
    a = load_file(straight / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert build_dataset(emoji_shards, RES, split="val", val_fraction=0.3).epochs == 1


def test_workers_to_feed() -> None:
    assert (
        workers_to_feed(per_worker=100.0, batch=8, step_seconds=0.317) == 1
    )  # 2 × 25.2 = 50.5 images/s
    assert workers_to_feed(per_worker=20.0, batch=8, step_seconds=0.317) == 3
