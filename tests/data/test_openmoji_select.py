"""data.include / data.exclude and HELDOUT_50: which OpenMoji emoji a run sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxlab.config.loading import load_config
from fluxlab.config.sections import SampleConfig
from fluxlab.data import build_dataset
from fluxlab.data.openmoji_names import emoji_group, emoji_name
from fluxlab.data.openmoji_render import openmoji_codes
from fluxlab.data.openmoji_select import HELDOUT_50, resolve_emoji, select_openmoji, tone_free

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "scripts" / "heldout50_prompts.txt"


def test_heldout_50_is_fifty_distinct_known_emoji_across_groups() -> None:
    every = set(openmoji_codes())
    assert len(HELDOUT_50) == 50 and set(HELDOUT_50) <= every
    # the captions recorded beside the codes are the ones the dataset gives them
    assert all(emoji_name(code) == name for code, name in HELDOUT_50.items())
    assert len(set(HELDOUT_50.values())) == 50
    # no skin-tone variants: the 50 images are all the LoRA run trains on
    assert not [c for c in every if c != tone_free(c) and tone_free(c) in HELDOUT_50]
    assert len({emoji_group(c) for c in HELDOUT_50}) >= 7
    assert not set(HELDOUT_50.values()) & set(SampleConfig().prompts)
    # the grid's prompts file is the 50 captions, in order
    assert PROMPTS_FILE.read_text().splitlines() == list(HELDOUT_50.values())


def test_exclude_drops_the_50_everywhere_and_keeps_the_rest() -> None:
    every = openmoji_codes()
    kept = select_openmoji("all", None, ["heldout-50", "waving hand"])
    assert kept is not None
    assert not {tone_free(c) for c in kept} & ({*HELDOUT_50, "1F44B"})
    # the 50 have no tones; waving hand goes with its five
    assert len(kept) == len(every) - 50 - 6
    only = select_openmoji("all", ["heldout-50"], None)
    assert only == sorted(HELDOUT_50)
    base = select_openmoji("base", None, ["heldout-50"])
    assert base is not None and not set(base) & set(HELDOUT_50)
    assert select_openmoji("all", None, None) is None


def test_items_name_emoji_by_code_text_or_caption() -> None:
    assert resolve_emoji(["1f98a", "🐧", "Flag: Japan", "2764-FE0F"], "data.include") == {
        "1F98A",
        "1F427",
        "1F1EF-1F1F5",
        "2764",
    }


def test_both_splits_honour_the_selection() -> None:
    """Excluded emoji (with their skin tones) are in neither split: the base never sees them."""
    chosen = ["1F98A", "1F427", "1F1EF-1F1F5", "waving hand", "1F600", "1F34C", "1F680", "2B50"]
    excluded = ["waving hand", "fox"]
    common = dict(resolution=16, val_fraction=0.3, include=chosen)
    train = build_dataset("openmoji", split="train", exclude=excluded, **common)
    val = build_dataset("openmoji", split="val", exclude=excluded, **common)
    seen = {tone_free(c) for c in [*train.codes, *val.codes]}
    assert seen == {"1F427", "1F1EF-1F1F5", "1F600", "1F34C", "1F680", "2B50"}
    assert len(train) and len(val)  # a real split, not everything on one side
    assert "flag: Japan" in train.captions + val.captions
    everything = build_dataset("openmoji", split="all", **common)
    assert len(everything) == 8 + 5  # waving hand's five tones come with it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.exclude=1F98A,ZZZZ"], "data.exclude: 'ZZZZ' is not an OpenMoji emoji"),
        (["--data.include=fox,no such emoji"], "data.include: 'no such emoji'"),
        (["--data.include=fox", "--data.exclude=fox"], "leave no emoji"),
        (["--data.include=fox", "--data.dataset=shards/{000000..000001}.tar"], "data.dataset="),
        (["--data.exclude=fox", "--data.task=edit"], "data.task='edit'"),
    ],
)
def test_bad_selection_is_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("debug", overrides)
