"""Reading a config file: YAML (JSON is YAML too) in UTF-8, with no key given twice in a mapping.

Plain ``yaml.safe_load`` keeps the last of two equal keys without a word, so a section written twice
would silently lose its first half; here that is an error naming the key, its lines and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor` may be overridden by later keys


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping; lines are 1-based."""

    def __init__(self, key: object, first_line: int, second_line: int) -> None:
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"key {key!r} appears twice (lines {first_line} and {second_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises DuplicateKeyError for a key repeated within one mapping."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise DuplicateKeyError(key, first_line[key], line)
        first_line[key] = line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_config_file(path: Path) -> Any:
    """The parsed contents of a YAML/JSON config file; ValueError naming the file when it is not
    UTF-8, not valid YAML, or repeats a key."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no Python objects
    except DuplicateKeyError as err:
        raise ValueError(
            f"{path}: key {err.key!r} is given twice (lines {err.first_line} and "
            f"{err.second_line}); YAML would keep only the last, so merge them into one"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML/JSON: {err}") from None
