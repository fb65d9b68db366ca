"""`fluxlab sample --prompts-file` and the before/after layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxlab.commands.sample_compare import pairs_per_row, read_prompts_file, side_by_side


def test_prompts_file_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("  fox \n\nflag: Japan\n\t\n", encoding="utf-8")
    assert read_prompts_file(f) == ["fox", "flag: Japan"]
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts_file(f)
    with pytest.raises(FileNotFoundError, match="--prompts-file"):
        read_prompts_file(tmp_path / "missing.txt")


def test_pairs_alternate_before_and_after() -> None:
    before, after = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
    images, captions = side_by_side(before, after, ["a", "b", "c"], ["a", "b", "c"])
    assert images[:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert captions[:2] == ["before: a", "after: a"] and captions[-1] == "after: c"
    with pytest.raises(ValueError, match="same resolution"):
        side_by_side(before, after[:, :, :2, :2], ["a", "b", "c"], ["a", "b", "c"])


def test_rows_never_split_a_pair() -> None:
    assert pairs_per_row(None, 1, 50) == 10 and pairs_per_row(None, 1, 3) == 6
    assert pairs_per_row(None, 4, 50) == 8  # one prompt's four pairs per row
    assert pairs_per_row(6, 1, 50) == 6
    with pytest.raises(ValueError, match="--nrow 5 with --before-after must be even"):
        pairs_per_row(5, 1, 50)
