"""Captions and coarse groups of OpenMoji emoji, from their codepoints alone (no network, no font).

Names follow CLDR's English short names ("waving hand: medium skin tone", "flag: Germany").
Groups are a rule over the codepoints that reproduces CLDR's groups closely enough to label a
class-conditional run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import emoji as emoji_pkg

GROUPS = (
    "faces/smileys",
    "people & body",
    "animals & nature",
    "food & drink",
    "travel & places",
    "activities",
    "objects",
    "symbols",
    "flags",
    "extras",
)

ZWJ, VS16, KEYCAP = 0x200D, 0xFE0F, 0x20E3
SKIN_TONES = {
    0x1F3FB: "light",
    0x1F3FC: "medium-light",
    0x1F3FD: "medium",
    0x1F3FE: "medium-dark",
    0x1F3FF: "dark",
}
_TONE_RE = re.compile(r"[ _,]*\b(light|medium-light|medium|medium-dark|dark) skin tone")

# Group of an emoji by the codepoint of its first character; first matching range wins. Unicode lays
# emoji out in themed runs, so ranges reproduce the CLDR groups closely though not exactly.
_RANGES: tuple[tuple[int, int, str], ...] = (
    # faces/smileys: faces, cat faces, monkeys, hearts, comic/emotion symbols
    (0x1F600, 0x1F644, "faces/smileys"),
    (0x1F648, 0x1F64A, "faces/smileys"),
    (0x1F910, 0x1F917, "faces/smileys"),
    (0x1F920, 0x1F925, "faces/smileys"),
    (0x1F927, 0x1F92F, "faces/smileys"),
    (0x1F970, 0x1F97A, "faces/smileys"),
    (0x1F9D0, 0x1F9D0, "faces/smileys"),
    (0x1FAE0, 0x1FAEF, "faces/smileys"),
    (0x2639, 0x263A, "faces/smileys"),
    (0x2620, 0x2620, "faces/smileys"),
    (0x1F479, 0x1F47F, "faces/smileys"),
    (0x1F480, 0x1F480, "faces/smileys"),
    (0x1F4A9, 0x1F4A9, "faces/smileys"),
    (0x1F916, 0x1F916, "faces/smileys"),
    (0x2763, 0x2764, "faces/smileys"),
    (0x1F48B, 0x1F48C, "faces/smileys"),
    (0x1F493, 0x1F49F, "faces/smileys"),
    (0x1F4A2, 0x1F4AD, "faces/smileys"),
    (0x1F4AF, 0x1F4AF, "faces/smileys"),
    (0x1F5A4, 0x1F5A4, "faces/smileys"),
    (0x1F90D, 0x1F90E, "faces/smileys"),
    (0x1F9E1, 0x1F9E1, "faces/smileys"),
    (0x1FA75, 0x1FA77, "faces/smileys"),
    (0x1F573, 0x1F573, "faces/smileys"),
    (0x1F5E8, 0x1F5E8, "faces/smileys"),
    (0x1F5EF, 0x1F5EF, "faces/smileys"),
    # people & body that take no skin tone (those that do are caught before this table)
    (0x1F440, 0x1F445, "people & body"),
    (0x1F464, 0x1F46F, "people & body"),
    (0x1F48F, 0x1F48F, "people & body"),
    (0x1F491, 0x1F491, "people & body"),
    (0x1F5E3, 0x1F5E3, "people & body"),
    (0x1F9DE, 0x1F9DF, "people & body"),
    (0x1F9E0, 0x1F9E0, "people & body"),
    (0x1F9B4, 0x1F9B7, "people & body"),
    (0x1FAC0, 0x1FAC8, "people & body"),
    (0x1F93C, 0x1F93C, "people & body"),
    (0x1F463, 0x1F463, "people & body"),
    (0x1F9CC, 0x1F9CC, "people & body"),
    (0x1F9B0, 0x1F9B3, "people & body"),
    (0x1F3FB, 0x1F3FF, "people & body"),
    (0x1F9D1, 0x1F9D1, "people & body"),
    # animals & nature
    (0x1F400, 0x1F43F, "animals & nature"),
    (0x1F980, 0x1F9AE, "animals & nature"),
    (0x1F331, 0x1F344, "animals & nature"),
    (0x1FAB0, 0x1FABF, "animals & nature"),
    (0x1FACE, 0x1FACF, "animals & nature"),
    (0x1F490, 0x1F490, "animals & nature"),
    (0x1F4AE, 0x1F4AE, "animals & nature"),
    (0x1F3F5, 0x1F3F5, "animals & nature"),
    (0x1F940, 0x1F940, "animals & nature"),
    (0x1F54A, 0x1F54A, "animals & nature"),
    (0x1F577, 0x1F578, "animals & nature"),
    (0x2618, 0x2618, "animals & nature"),
    # food & drink
    (0x1F32D, 0x1F330, "food & drink"),
    (0x1F345, 0x1F37F, "food & drink"),
    (0x1F950, 0x1F96F, "food & drink"),
    (0x1F9C0, 0x1F9CB, "food & drink"),
    (0x1FAD0, 0x1FADF, "food & drink"),
    (0x2615, 0x2615, "food & drink"),
    # travel & places: sky/weather, buildings, transport, time
    (0x1F300, 0x1F32C, "travel & places"),
    (0x1F3D4, 0x1F3F0, "travel & places"),
    (0x1F680, 0x1F6A9, "travel & places"),
    (0x1F6B2, 0x1F6B2, "travel & places"),
    (0x1F6E0, 0x1F6FF, "travel & places"),
    (0x1F5FA, 0x1F5FE, "travel & places"),
    (0x1F550, 0x1F567, "travel & places"),
    (0x1F3A0, 0x1F3A2, "travel & places"),
    (0x1F3AA, 0x1F3AA, "travel & places"),
    (0x26E9, 0x26FD, "travel & places"),
    (0x2600, 0x2604, "travel & places"),
    (0x26C4, 0x26C8, "travel & places"),
    (0x2614, 0x2614, "travel & places"),
    (0x26A1, 0x26A1, "travel & places"),
    (0x2744, 0x2744, "travel & places"),
    (0x2708, 0x2708, "travel & places"),
    (0x2693, 0x2693, "travel & places"),
    (0x231A, 0x231B, "travel & places"),
    (0x23F0, 0x23F3, "travel & places"),
    (0x1F6D5, 0x1F6DF, "travel & places"),
    (0x1F488, 0x1F488, "travel & places"),
    (0x1F54B, 0x1F54D, "travel & places"),
    (0x1FA90, 0x1FA90, "travel & places"),
    (0x2B50, 0x2B50, "travel & places"),
    # activities: events, sports, games, arts
    (0x1F380, 0x1F391, "activities"),
    (0x1F396, 0x1F39F, "activities"),
    (0x1F3A3, 0x1F3A8, "activities"),
    (0x1F3AB, 0x1F3B4, "activities"),
    (0x1F3BD, 0x1F3D3, "activities"),
    (0x1F93A, 0x1F94F, "activities"),
    (0x1FA80, 0x1FA86, "activities"),
    (0x1F9E7, 0x1F9E9, "activities"),
    (0x1F9F5, 0x1F9F6, "activities"),
    (0x2660, 0x2667, "activities"),
    (0x265F, 0x265F, "activities"),
    (0x26BD, 0x26BE, "activities"),
    (0x1F0CF, 0x1F0CF, "activities"),
    (0x1F004, 0x1F004, "activities"),
    (0x1F9FF, 0x1F9FF, "activities"),
    (0x1FAA9, 0x1FAA9, "activities"),
    (0x1F52E, 0x1F52E, "activities"),
    (0x1F579, 0x1F579, "activities"),
    (0x1F5BC, 0x1F5BC, "activities"),
    # symbols inside otherwise pictographic blocks
    (0x1F500, 0x1F509, "symbols"),
    (0x1F518, 0x1F525, "symbols"),
    (0x1F52F, 0x1F53D, "symbols"),
    (0x1F4F3, 0x1F4F6, "symbols"),
    (0x1F6AB, 0x1F6B1, "symbols"),
    (0x1F6B3, 0x1F6C5, "symbols"),
    (0x1F6D0, 0x1F6D0, "symbols"),
    (0x1F7E0, 0x1F7FF, "symbols"),
    (0x1F549, 0x1F549, "symbols"),
    (0x1F54E, 0x1F54E, "symbols"),
    (0x1F4DB, 0x1F4DB, "symbols"),
    (0x1F170, 0x1F2FF, "symbols"),
    # objects: the rest of the pictographic planes
    (0x1F300, 0x1FAFF, "objects"),
    (0x2328, 0x2328, "objects"),
    (0x2702, 0x2712, "objects"),
    (0x2692, 0x2697, "objects"),
    (0x2699, 0x269B, "objects"),
    (0x26B0, 0x26B1, "objects"),
    (0x260E, 0x260E, "objects"),
    (0x26CF, 0x26D3, "objects"),
)


def parse_code(code: str) -> list[int]:
    """'1F44B-1F3FD' -> [0x1F44B, 0x1F3FD]."""
    return [int(part, 16) for part in code.split("-")]


def _is_pua(cp: int) -> bool:
    return 0xE000 <= cp <= 0xF8FF


def _is_regional(cp: int) -> bool:
    return 0x1F1E6 <= cp <= 0x1F1FF


def _tag_text(cps: Sequence[int]) -> str:
    return "".join(chr(cp - 0xE0000) for cp in cps if 0xE0020 <= cp <= 0xE007E)


def is_flag(cps: Sequence[int]) -> bool:
    """Country (two regional indicators), subdivision (black flag + tags) or a flag pictograph
    (+ ZWJ)."""
    if len(cps) == 2 and all(_is_regional(cp) for cp in cps):
        return True
    return cps[0] in (0x1F3F3, 0x1F3F4, 0x1F6A9, 0x1F38C, 0x1F3C1)


def _emoji_entry(text: str) -> dict[str, Any] | None:
    for candidate in (text, text.replace("\ufe0f", ""), text + "\ufe0f"):
        entry = emoji_pkg.EMOJI_DATA.get(candidate)
        if entry is not None:
            return entry
    return None


def _char_name(cp: int) -> str:
    entry = _emoji_entry(chr(cp))
    if entry is not None:
        return entry["en"].strip(":").replace("_", " ")
    if _is_pua(cp):
        return f"openmoji extra {cp:04x}"  # private-use glyphs have no name offline
    return unicodedata.name(chr(cp), f"u+{cp:04x}").lower()


def emoji_name(code: str) -> str:
    """CLDR-style English name: 'red heart', 'waving hand: medium skin tone', 'flag: Germany'."""
    cps = parse_code(code)
    text = "".join(map(chr, cps))
    entry = _emoji_entry(text)
    if entry is None:
        if len(cps) == 2 and all(_is_regional(cp) for cp in cps):
            return "flag: " + "".join(chr(cp - 0x1F1E6 + ord("A")) for cp in cps)
        if cps[0] == 0x1F3F4 and _tag_text(cps):
            tag = _tag_text(cps)
            return f"flag: {tag[:2].upper()}-{tag[2:].upper()}"
        parts = [_char_name(cp) for cp in cps if cp not in (ZWJ, VS16)]
        return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")
    name = entry["en"].strip(":").replace("_", " ")
    if is_flag(cps) and (len(cps) == 2 and _is_regional(cps[0]) or _tag_text(cps)):
        return f"flag: {name}"
    if name.startswith("keycap "):
        return "keycap: " + name[len("keycap ") :]
    tones = [m.group(1) + " skin tone" for m in _TONE_RE.finditer(name)]
    if tones and len(cps) > 1:
        base = _TONE_RE.sub("", name).strip(" ,")
        return f"{base}: {', '.join(tones)}"
    return name


def emoji_group(code: str) -> str:
    """Coarse group, by rule, first match wins:
    flags (flag structure) > extras (private-use or not a Unicode emoji: OpenMoji's own additions) >
    people & body (carries or accepts a skin tone) > the codepoint range table above for the first
    character > symbols (anything left, mostly BMP arrows, shapes and enclosed letters)."""
    cps = parse_code(code)
    if is_flag(cps):
        return "flags"
    if any(_is_pua(cp) for cp in cps) or _emoji_entry("".join(map(chr, cps))) is None:
        return "extras"
    base = cps[0]
    if len(cps) > 1 and any(cp in SKIN_TONES for cp in cps):
        return "people & body"
    if base not in SKIN_TONES and _emoji_entry(chr(base) + chr(0x1F3FB)) is not None:
        return "people & body"
    for lo, hi, group in _RANGES:
        if lo <= base <= hi:
            return group
    return "symbols"
