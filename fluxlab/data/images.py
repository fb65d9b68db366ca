"""Decode any image file into an 8-bit RGB PIL image, or fail loudly with the file's name."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# PIL's own default (~89.5 M pixels, a 1024x1024x24-bit bomb at 256:1 compression).
DEFAULT_MAX_PIXELS = 89_478_485

RAISE_LIMIT_HINT = "if the file is trusted, raise data.max_pixels (null lifts the limit)"

_GLOBAL_LIMIT_LOCK = threading.Lock()


class BadImageError(ValueError):
    """An image file that cannot be decoded; `path` and `reason` are kept for the caller's log."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _open_full(path: Path, max_pixels: int | None, source: BinaryIO | None = None) -> Image.Image:
    # PIL raises its own DecompressionBombError above 2x its global limit; that global is shared by
    # every thread, so it is only lifted (under a lock) when the caller allows larger images.
    lift = max_pixels is None or (
        Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if not lift:
            img = Image.open(path if source is None else source)
        else:
            with _GLOBAL_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(path if source is None else source)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    n_pixels = img.width * img.height
    if max_pixels is not None and n_pixels > max_pixels:
        img.close()
        raise BadImageError(
            path,
            f"{img.width}x{img.height} = {n_pixels} pixels exceeds max_pixels={max_pixels} "
            f"(possible decompression bomb); {RAISE_LIMIT_HINT}",
        )
    # Decode every byte now so a truncated file fails here, not later inside a resize.
    img.load()
    return img


def _high_bit_gray_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        peak = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        scaled = np.nan_to_num(arr.astype(np.float64)) / peak * 255.0
    else:
        # 16-bit modes (and PNG 16-bit gray decoded as 32-bit "I") span 0..65535: 65535/257 = 255.
        scaled = arr.astype(np.float64)
        if img.mode.startswith("I;16") or float(arr.max(initial=0)) > 255:
            scaled = scaled / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to RGB, compositing transparency onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_bit_gray_to_l(img).convert("RGB")
    if mode == "P":
        has_alpha = (
            "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        )
        return _on_white(img.convert("RGBA")) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img.convert("RGBA"))
    if mode in ("L", "1") and "transparency" in img.info:
        return _on_white(img.convert("RGBA"))
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Fully decode `path` to an RGB image with EXIF orientation applied.

    Raises BadImageError (a ValueError naming the file) for a missing, empty, truncated,
    corrupt or non-image file, or one larger than `max_pixels` (None disables the check).
    Relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`.
    """
    path = Path(path)
    return _decode(path, None, max_pixels)


def decode_image(
    data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """`load_image` for bytes already in memory (a tar member).

    `name` (e.g. "shard.tar:key.jpg") is what a BadImageError reports, so a corrupt sample in a
    shard is as easy to find as a corrupt file.
    """
    return _decode(Path(name), io.BytesIO(data), max_pixels)


def _decode(path: Path, source: io.BytesIO | None, max_pixels: int | None) -> Image.Image:
    try:
        size = path.stat().st_size if source is None else source.getbuffer().nbytes
        if size == 0:
            raise BadImageError(path, "file is empty (0 bytes)")
        img = _open_full(path, max_pixels, source)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file does not exist") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"{err}; {RAISE_LIMIT_HINT}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as err:
        # PIL plugins signal corruption with a zoo of exception types; all mean "not decodable".
        raise BadImageError(path, f"{type(err).__name__}: {err}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, struct.error, KeyError, TypeError, SyntaxError):
        pass  # unreadable EXIF should not cost us an otherwise good image
    try:
        return to_rgb(img)
    except (OSError, ValueError) as err:
        raise BadImageError(path, f"cannot convert mode {img.mode} to RGB: {err}") from None
