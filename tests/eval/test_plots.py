"""``fluxlab plot``: one run's curves, several runs overlaid, and clear errors for bad logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'fluxlab[plot]'")

from fluxlab.cli import main  # noqa: E402
from fluxlab.eval.plots import plot_runs  # noqa: E402


def write_run(folder: Path, scale: float, with_val: bool = True) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, 21):
        row = {
            "step": step,
            "loss": scale / step,
            "loss_per_t_bin": [scale * (i + 1) for i in range(4)],
        }
        if with_val and step % 10 == 0:
            row["val_loss"] = scale / step + 0.01
        rows.append(row)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_one_run_and_two_overlaid(tmp_path: Path) -> None:
    bf16, fp8 = write_run(tmp_path / "loss-bf16", 1.0), write_run(tmp_path / "loss-fp8", 1.1, False)
    assert main(["plot", "--run", str(bf16), "--out", str(tmp_path / "one.png")]) == 0
    assert (
        main(
            [
                "plot",
                "--run",
                str(bf16),
                "--run",
                str(fp8 / "log.jsonl"),
                "--out",
                str(tmp_path / "two.png"),
            ]
        )
        == 0
    )
    for name in ("one.png", "two.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size == (1210, 440)  # 11×4 inches at 110 dpi
    # The overlay draws more than the single run: a second curve in each panel and two legends.
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert one.tobytes() != two.tobytes()


def test_a_missing_run_is_named_before_anything_is_drawn(tmp_path: Path) -> None:
    good = write_run(tmp_path / "good", 1.0)
    with pytest.raises(FileNotFoundError, match="nope not found"):
        plot_runs([good, tmp_path / "nope"], tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
