"""OpenMoji from its SVGs: the full set, the same pixels everywhere (by checksum), cached."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import features

from fluxlab.data import openmoji_checksums, openmoji_render
from fluxlab.data.edit_pairs import OpenMojiEditPairs, find_edit_pairs
from fluxlab.data.openmoji_render import checksum, load_rendered, openmoji_codes, render_emoji

SUBSET = ["2764", "1F44B-1F3FD", "1F1E9-1F1EA", "1F468-200D-1F469-200D-1F467-200D-1F466"]


@pytest.fixture(scope="module")
def full_16px(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """Every emoji at 16 px rendered with Pillow reporting no libraqm (as on the project's GPU
    image): (cache folder, the render, what was logged)."""
    cache = tmp_path_factory.mktemp("openmoji-full")
    check = features.check
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "check", lambda name: False if name == "raqm" else check(name))
        assert not features.check("raqm")
        handler = _Collect()
        logging.getLogger(openmoji_render.__name__).addHandler(handler)
        try:
            data = load_rendered(16, cache=cache)
        finally:
            logging.getLogger(openmoji_render.__name__).removeHandler(handler)
    return cache, data, "\n".join(handler.messages)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_full_set_without_raqm_has_the_recorded_checksum(
    full_16px: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, logged = full_16px
    codes = [str(c) for c in data["codes"]]
    assert len(codes) >= 4400 and codes == openmoji_codes()  # nothing left out
    assert len(codes) == openmoji_checksums.COUNT
    assert data["images"].shape == (len(codes), 16, 16, 3) and data["images"].dtype == np.uint8
    assert checksum(data["images"], codes) == openmoji_checksums.SHA256[16]
    assert "differs from the reference" not in logged and "left out" not in logged


def test_a_subset_is_cut_from_the_full_cache_and_equals_its_own_render(
    full_16px: tuple[Path, dict[str, Any], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, data, _ = full_16px
    alone = load_rendered(16, SUBSET, cache=tmp_path)  # rendered on its own
    assert list(alone["codes"]) == SUBSET
    monkeypatch.setattr(openmoji_render, "render_all", _no_render)
    cut = load_rendered(16, SUBSET, cache=cache)
    for key in ("images", "codes", "captions", "groups"):
        assert np.array_equal(cut[key], alone[key]), key
    rows = [openmoji_codes().index(c) for c in SUBSET]
    assert np.array_equal(cut["images"], data["images"][rows])


def test_edit_pairs_keep_every_pair_of_the_full_set(
    full_16px: tuple[Path, dict[str, Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _, _ = full_16px
    monkeypatch.setattr(openmoji_render, "render_all", _no_render)
    pairs = OpenMojiEditPairs(16, split="all", cache=cache).pairs
    # The font path without libraqm lost every pair with a ZWJ or skin-tone member.
    assert pairs == find_edit_pairs(openmoji_codes())
    assert sum(p.family == "skin_tone" for p in pairs) > 1000
    assert any(p.family == "gender" and "200D" in p.target for p in pairs)


def _no_render(*args: object, **kwargs: object) -> None:
    raise AssertionError("expected the cache to answer, not a render")


def test_a_mismatch_names_resolution_and_both_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A "full set" of two emoji cannot have the recorded checksum of 4,495.
    monkeypatch.setattr(openmoji_render, "openmoji_codes", lambda: ["2764", "1F600"])
    with caplog.at_level(logging.WARNING, logger=openmoji_render.__name__):
        data = load_rendered(16, cache=tmp_path)
    actual = checksum(data["images"], ["2764", "1F600"])
    assert "OpenMoji at 16px differs from the reference set" in caplog.text
    assert actual in caplog.text and openmoji_checksums.SHA256[16] in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=openmoji_render.__name__):
        load_rendered(24, cache=tmp_path)  # no checksum is recorded at 24 px: said, not warned
    assert "no OpenMoji checksum is recorded for 24px" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_cache_is_keyed_by_renderer_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_rendered(16, SUBSET, cache=tmp_path)
    (written,) = tmp_path.glob("*.npz")
    assert "resvg-py" in written.name and f"v{openmoji_render.RENDER_VERSION}" in written.name
    calls: list[int] = []
    real = openmoji_render.render_all

    def counting(codes: list[str], resolution: int) -> Any:
        calls.append(len(codes))
        return real(codes, resolution)

    monkeypatch.setattr(openmoji_render, "render_all", counting)
    load_rendered(16, SUBSET, cache=tmp_path)
    assert calls == []  # same renderer: the cache answers
    monkeypatch.setattr(openmoji_render, "RENDERER", "resvg-py 9.9.9")
    load_rendered(16, SUBSET, cache=tmp_path)
    assert calls == [len(SUBSET)] and len(list(tmp_path.glob("*.npz"))) == 2


def test_an_svg_that_draws_nothing_is_left_out_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    svgs = tmp_path / "svg"
    svgs.mkdir()
    real = openmoji_render.svg_dir() / "2764.svg"
    (svgs / "2764.svg").write_text(real.read_text(encoding="utf-8"), encoding="utf-8")
    (svgs / "E000.svg").write_text('<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"/>')
    (svgs / "E001.svg").write_text("<svg this is not xml")
    monkeypatch.setattr(openmoji_render, "svg_dir", lambda: svgs)
    assert render_emoji("E000", 16) is None
    with caplog.at_level(logging.WARNING, logger=openmoji_render.__name__):
        images, kept, excluded = openmoji_render.render_all(openmoji_render.openmoji_codes(), 16)
    assert kept == ["2764"] and excluded == ["E000", "E001"] and images.shape == (1, 16, 16, 3)
    assert "E001.svg does not render" in caplog.text
    assert "2 OpenMoji SVGs draw nothing and are left out: E000, E001" in caplog.text


def test_renders_are_white_squares_with_the_emoji_filling_them() -> None:
    heart = render_emoji("2764", 32)
    assert heart is not None and heart.shape == (32, 32, 3)
    assert (heart[0, 0] == 255).all() and (heart[-1, -1] == 255).all()  # white margin
    red = (heart[..., 0] > 150) & (heart[..., 1] < 110) & (heart[..., 2] < 110)
    assert red.mean() > 0.3  # the heart fills the square (its ink box is scaled up)
    assert np.array_equal(render_emoji("2764", 32), heart)  # deterministic
