"""Tests for fluxlab.data: decoding, transforms, the folder dataset and the OpenMoji dataset."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlab.data import (
    BadImageError,
    ImageCaptionFolder,
    ImageTransform,
    OpenMoji,
    build_dataset,
    collate_skip_bad,
    load_image,
    make_grid,
    openmoji_names,
    openmoji_render,
    to_pil,
)
from fluxlab.data.common import in_val


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    )


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    return img.getpixel(xy)  # type: ignore[return-value]


# ---------------------------------------------------------------- images.py


def test_rgba_half_transparent_red_composites_to_pink(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    r, g, b = _pixel(img)
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135


def test_la_transparent_is_white_and_opaque_gray_kept(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[0, 0] = (10, 0)  # fully transparent dark pixel
    arr[1, 1] = (60, 255)
    Image.fromarray(arr, mode="LA").save(path)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (1, 1)) == (60, 60, 60)


def test_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(path, transparency=0)
    out = load_image(path)
    assert _pixel(out, (0, 0)) == (255, 255, 255)
    assert _pixel(out, (1, 0)) == (0, 0, 255)


def test_cmyk_red(tmp_path: Path) -> None:
    path = tmp_path / "c.tif"
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(path)
    assert _pixel(load_image(path)) == (255, 0, 0)


def test_16bit_gray_scaled_to_8bit(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[65535, 32896, 0]], dtype=np.uint16)).save(path)
    img = load_image(path)
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [255, 128, 0]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge ends up on top
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    r, g, b = _pixel(out, (10, 5))
    assert r > 200 and b < 60


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(BadImageError, match="max_pixels"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpeg", "empty", "text", "missing"])
def test_bad_files_raise_naming_the_file(tmp_path: Path, kind: str) -> None:
    ext = ".jpg" if kind == "truncated_jpeg" else ".png"
    path = tmp_path / f"bad_{kind}{ext}"
    if kind.startswith("truncated"):
        _noise().save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    with pytest.raises(BadImageError, match=path.name) as info:
        load_image(path)
    assert isinstance(info.value, ValueError) and info.value.path == path


# ---------------------------------------------------------------- transforms.py


def test_transform_shape_range_and_crop() -> None:
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 100, 100))  # left third black
    center = ImageTransform(32)(img)
    assert center.shape == (3, 32, 32) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    assert center.mean() > 0.9  # centre crop of a 96x32 resize sees only the white middle
    random_t = ImageTransform(32, crop="random", hflip=True, color_jitter=0.3)
    a = random_t(img, torch.Generator().manual_seed(1))
    b = random_t(img, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    crops = {
        round(float(random_t(img, torch.Generator().manual_seed(s)).mean()), 2) for s in range(8)
    }
    assert len(crops) > 1


def test_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(32, crop="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)


def test_to_pil_round_trip_and_grid() -> None:
    t = torch.full((3, 8, 8), -1.0)
    t[0] = 1.0
    assert _pixel(to_pil(t)) == (255, 0, 0)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    grid = make_grid(images, nrow=3, captions=["a very long caption that must wrap onto lines"] * 5)
    plain = make_grid(images, nrow=3)
    assert grid.width >= 3 * 96 and grid.height > plain.height  # upscaled tiles, room for captions
    with pytest.raises(ValueError, match="captions"):
        make_grid(images, nrow=3, captions=["x"])


# ---------------------------------------------------------------- folder.py


def _make_folder(root: Path) -> None:
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    _noise(seed=1).save(root / "cats" / "c1.png")
    (root / "cats" / "c1.txt").write_text("a cat\n", encoding="utf-8")
    _noise(seed=2).save(root / "cats" / "c2.jpg")
    (root / "cats" / "c2.txt").write_bytes(b"caf\xe9 cat")  # latin-1, not UTF-8
    _noise(seed=3).save(root / "dogs" / "d1.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dogs" / "notes.md").write_text("not an image")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "dogs/d1.png", "text": "a dog"}) + "\n"
    )


def test_folder_captions_labels_and_bad_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, ImageTransform(16))
    assert [p.name for p in ds.paths] == ["c1.png", "c2.jpg", "broken.png", "d1.png"]
    assert ds.classes == ["cats", "dogs"] and ds.labels == [0, 0, 1, 1]
    assert ds.captions[0] == "a cat" and ds.captions[3] == "a dog"
    assert ds.captions[1] == "caf\ufffd cat" and "c2.txt" in caplog.text
    assert ds.captions[2] == "" and ds.n_missing_captions == 1
    item = ds[0]
    assert (
        item is not None
        and item["image"].shape == (3, 16, 16)
        and item["label"] == 0
        and item["index"] == 0
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ds[2] is None
    assert "broken.png" in caplog.text
    batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert batch is not None and batch["skipped"] == 1
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["caption"] == ["a cat", "caf\ufffd cat", "a dog"] and batch["label"].tolist() == [
        0,
        0,
        1,
    ]
    assert collate_skip_bad([None, None]) is None


def test_folder_flat_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageCaptionFolder(tmp_path / "nope", ImageTransform(8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="empty"):
        ImageCaptionFolder(tmp_path / "empty", ImageTransform(8))
    flat = tmp_path / "flat"
    flat.mkdir()
    _noise().save(flat / "x.webp")
    (flat / "metadata.jsonl").write_text('{"file_name": "x.webp", "text": "noise"}\n')
    ds = ImageCaptionFolder(flat, ImageTransform(8))
    assert ds.captions == ["noise"] and ds.labels == [0] and len(ds.classes) == 1
    (flat / "metadata.jsonl").write_text("{broken json\n")
    with pytest.raises(ValueError, match="metadata.jsonl line 1"):
        ImageCaptionFolder(flat, ImageTransform(8))


def test_folder_split_disjoint_and_stable(tmp_path: Path) -> None:
    for i in range(40):
        Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / f"{i:02d}.png")
    parts = {
        s: build_dataset(tmp_path, 8, split=s, val_fraction=0.25) for s in ("train", "val", "all")
    }
    train, val = ({p.name for p in parts[s].paths} for s in ("train", "val"))  # type: ignore[attr-defined]
    assert train and val and not train & val
    assert train | val == {p.name for p in parts["all"].paths}  # type: ignore[attr-defined]
    assert val == {p.name for p in build_dataset(tmp_path, 8, split="val", val_fraction=0.25).paths}  # type: ignore[attr-defined]
    assert in_val("a", 0.5, seed=0) == in_val("a", 0.5, seed=0)


# ---------------------------------------------------------------- openmoji.py


def test_emoji_names_and_groups() -> None:
    cases = {
        "2764": ("red heart", "faces/smileys"),
        "1F600": ("grinning face", "faces/smileys"),
        "1F44B-1F3FD": ("waving hand: medium skin tone", "people & body"),
        "1F1E9-1F1EA": ("flag: Germany", "flags"),
        "0023-FE0F-20E3": ("keycap: #", "symbols"),
        "1F436": ("dog face", "animals & nature"),
        "1F355": ("pizza", "food & drink"),
        "E0AD": ("openmoji extra e0ad", "extras"),
    }
    for code, (name, group) in cases.items():
        assert (openmoji_names.emoji_name(code), openmoji_names.emoji_group(code)) == (name, group)
    # not an emoji: the unicodedata name
    assert openmoji_names.emoji_name("2654") == "white chess king"


def _color_fraction(img: torch.Tensor, rgb_test) -> float:
    arr = ((img.permute(1, 2, 0) + 1) * 127.5).numpy()
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    ink = (np.abs(arr - 255).max(-1) > 40) & (arr.max(-1) > 80)  # not background, not outline
    return float(rgb_test(r, g, b)[ink].mean())


def test_openmoji_render_captions_colours_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUXLAB_CACHE", str(tmp_path))
    include = ["❤️", "😀", "1F44B-1F3FD", "1F1E9-1F1EA", "E0AD"]
    ds = OpenMoji(32, include=include)
    assert ds.captions == [
        "red heart",
        "grinning face",
        "waving hand: medium skin tone",
        "flag: Germany",
        "openmoji extra e0ad",
    ]
    assert ds.classes[ds[0]["label"]] == "faces/smileys" and ds.classes[ds[3]["label"]] == "flags"
    heart, face = ds[0]["image"], ds[1]["image"]
    assert heart.shape == (3, 32, 32) and heart.min() >= -1 and heart.max() <= 1
    assert float(heart[:, 0, 0].mean()) > 0.95  # white corner background
    assert _color_fraction(heart, lambda r, g, b: (r > 150) & (g < 110) & (b < 110)) > 0.8
    assert _color_fraction(face, lambda r, g, b: (r > 190) & (g > 170) & (b < 130)) > 0.5
    assert "OpenMoji" in OpenMoji.credit and "CC BY-SA 4.0" in OpenMoji.credit

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("second load must come from the cache")

    monkeypatch.setattr(openmoji_render, "render_all", no_render)
    start = time.perf_counter()
    again = OpenMoji(32, include=include)
    assert time.perf_counter() - start < 1.0
    assert again.captions == ds.captions and np.array_equal(again.images, ds.images)


def test_openmoji_splits_disjoint_deterministic(tmp_path: Path) -> None:
    kw = {"resolution": 16, "limit": 150, "cache": tmp_path, "val_fraction": 0.2}
    train, val, full = (OpenMoji(split=s, **kw) for s in ("train", "val", "all"))  # type: ignore[arg-type]
    assert len(val) > 0 and not set(train.codes) & set(val.codes)
    assert sorted(train.codes + val.codes) == sorted(full.codes) and len(full) == 150
    assert OpenMoji(split="val", **kw).codes == val.codes  # type: ignore[arg-type]
    assert OpenMoji(split="val", seed=1, **kw).codes != val.codes  # type: ignore[arg-type]
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and isinstance(item["caption"], str)
