"""Choosing OpenMoji emoji for a run: ``data.include`` / ``data.exclude``, and ``HELDOUT_50``.

An item names an emoji by hex code (``1F98A``, ``2764-FE0F``), by the emoji itself (``🦊``), by
its caption, the CLDR name (``fox``, ``flag: Japan``), or names a whole set (``heldout-50``). An
emoji always brings its skin-tone variants along, as the val split keeps them together, so an
excluded emoji is never seen in any tone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from fluxlab.data.openmoji import base_codes
from fluxlab.data.openmoji_names import emoji_name
from fluxlab.data.openmoji_render import openmoji_codes

# 50 recognisable emoji that the held-out LoRA experiment (docs/lora.md) keeps from its base model
# and then teaches with a LoRA: distinct shapes and colours across the groups (8 faces, 10 animals,
# 4 plants, 10 foods, 6 places and weather, 4 activities, 5 objects, 3 flags), none with skin
# tones, none among the default sample prompts. Code → caption (the prompt that names it).
HELDOUT_50: dict[str, str] = {
    "1F60D": "smiling face with heart-eyes",
    "1F631": "face screaming in fear",
    "1F92F": "exploding head",
    "1F975": "hot face",
    "1F976": "cold face",
    "1F921": "clown face",
    "1F47B": "ghost",
    "1F916": "robot",
    "1F427": "penguin",
    "1F418": "elephant",
    "1F992": "giraffe",
    "1F993": "zebra",
    "1F419": "octopus",
    "1F98B": "butterfly",
    "1F422": "turtle",
    "1F433": "spouting whale",
    "1F984": "unicorn",
    "1F98A": "fox",
    "1F335": "cactus",
    "1F33B": "sunflower",
    "1F344": "mushroom",
    "1F332": "evergreen tree",
    "1F34C": "banana",
    "1F349": "watermelon",
    "1F353": "strawberry",
    "1F355": "pizza",
    "1F354": "hamburger",
    "1F369": "doughnut",
    "1F951": "avocado",
    "1F955": "carrot",
    "1F346": "eggplant",
    "1F966": "broccoli",
    "1F680": "rocket",
    "1F692": "fire engine",
    "1F3E0": "house",
    "1F30B": "volcano",
    "1F308": "rainbow",
    "1F319": "crescent moon",
    "1F383": "jack-o-lantern",
    "26BD": "soccer ball",
    "1F3C0": "basketball",
    "1F388": "balloon",
    "1F4A1": "light bulb",
    "1F511": "key",
    "2602": "umbrella",
    "1F451": "crown",
    "1F48E": "gem stone",
    "1F1EF-1F1F5": "flag: Japan",
    "1F1E8-1F1E6": "flag: Canada",
    "1F1F8-1F1EA": "flag: Sweden",
}

# Items that stand for several emoji at once (`--data.exclude=heldout-50`).
NAMED_SETS: dict[str, tuple[str, ...]] = {"heldout-50": tuple(HELDOUT_50)}

_HEX = re.compile(r"[0-9A-Fa-f]{2,6}(-[0-9A-Fa-f]{2,6})*")
_TONE = re.compile(r"-1F3F[B-F]")


def tone_free(code: str) -> str:
    """The code without skin-tone modifiers: the key an emoji and its variants share."""
    return _TONE.sub("", code)


def _norm(code: str) -> str:
    """Hex code compared without VS16 (``2764-FE0F`` and ``2764`` are one emoji)."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


@functools.cache
def _lookup() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(normalised hex → code, lower-case caption → codes) over every OpenMoji emoji."""
    by_hex: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    for code in openmoji_codes():
        by_hex[_norm(code)] = code
        by_name.setdefault(emoji_name(code).lower(), []).append(code)
    return by_hex, by_name


def _codes_of(item: str, field: str) -> list[str]:
    """The OpenMoji codes ``item`` names (before skin-tone variants are added)."""
    if item in NAMED_SETS:
        return list(NAMED_SETS[item])
    by_hex, by_name = _lookup()
    text = item.strip()
    if _HEX.fullmatch(text) and _norm(text) in by_hex:
        return [by_hex[_norm(text)]]
    if text and not text.isascii():  # the emoji itself
        key = _norm("-".join(f"{ord(ch):04X}" for ch in text))
        if key in by_hex:
            return [by_hex[key]]
    if text.lower() in by_name:
        return list(by_name[text.lower()])
    raise ValueError(
        f"{field}: {item!r} is not an OpenMoji emoji; give a hex code (1F98A), the emoji itself, "
        f"its name as captioned ('fox', 'flag: Japan') or one of {sorted(NAMED_SETS)}"
    )


def resolve_emoji(items: Sequence[str], field: str) -> set[str]:
    """The tone-free keys of the emoji ``items`` name; an unknown item is a ValueError naming
    ``field`` and the item."""
    return {tone_free(code) for item in items for code in _codes_of(item, field)}


def select_openmoji(
    subset: str, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str] | None:
    """The OpenMoji codes a run uses (sorted), or None for every emoji.

    ``subset`` "base" starts from the emoji without skin-tone variants or extras; ``include``
    keeps only the emoji named (with their tones, within the subset), ``exclude`` then drops
    those named. Both apply before the split, so an excluded emoji is in neither train nor val.
    """
    if subset == "all" and include is None and exclude is None:
        return None
    codes = base_codes() if subset == "base" else openmoji_codes()
    if include is not None:
        keep = resolve_emoji(include, "data.include")
        codes = [c for c in codes if tone_free(c) in keep]
    if exclude is not None:
        drop = resolve_emoji(exclude, "data.exclude")
        codes = [c for c in codes if tone_free(c) not in drop]
    if not codes:
        raise ValueError(
            f"data.include={include} and data.exclude={exclude} leave no emoji in "
            f"data.openmoji_subset={subset!r}; include more or exclude fewer"
        )
    return codes


def openmoji_only(
    dataset: str, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """``data.include``/``data.exclude`` choose OpenMoji emoji: other datasets refuse them."""
    if (include is not None or exclude is not None) and dataset.lower() != "openmoji":
        raise ValueError(
            f"data.include and data.exclude choose OpenMoji emoji, but data.dataset={dataset!r}; "
            "remove them, or choose a folder's images by copying them into a new folder"
        )


def check_selection(
    dataset: str, subset: str, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """The config's checks: OpenMoji only, known emoji, and at least one left."""
    if include is None and exclude is None:
        return
    openmoji_only(dataset, include, exclude)
    select_openmoji(subset, include, exclude)
