"""Annotation validation shared by the dataset loaders.

The loaders use `read_annotation_json` / `expect_*` so every malformed file produces the same
kind of one-line CirError (file, entry, what is expected). The `cir prepare` dataset check,
which needs the dataset registry above the loaders, is `cir_cli.data.check`.
"""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from cir_cli.errors import CirError
from cir_cli.io import read_text


def require_root(root: Path, dataset: str) -> None:
    root = Path(root)
    if not root.exists():
        raise CirError(
            f"{dataset} root {root} does not exist; point data.root at the dataset folder "
            f"(--set data.root=DIR; `cir prepare {dataset} --root DIR` checks one)"
        )
    if not root.is_dir():
        raise CirError(f"{dataset} root {root} is not a folder")


def read_annotation_json(path: Path, expected: type, what: str, layout: str) -> Any:
    """Parse one annotation file and check its top-level type; CirError naming the file."""
    if not path.is_file():
        raise CirError(f"annotation file {path} not found; expected {layout}")
    text = read_text(path, "UTF-8 JSON annotation file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CirError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected {what}"
        ) from None
    if not isinstance(data, expected):
        raise CirError(f"{path}: expected {what} at the top level, got a JSON {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def expect_str(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise CirError(f"{where}: expected {what}, got a JSON {_json_type(value)}")
    return value


def expect_relpath(value: Any, where: str) -> str:
    """An image path from an annotation file: relative to the dataset root and staying inside
    it. An absolute path or a `..` part would read (and cache, and index) files anywhere."""
    rel = expect_str(value, where, "a relative image path string")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if not rel or pure.is_absolute() or PureWindowsPath(rel).drive or ".." in pure.parts:
        raise CirError(
            f"{where}: image path {rel!r} must be relative to the dataset root, without '..'"
        )
    return rel


def expect_name(value: Any, names: Container[str], where: str, split_file: Path) -> str:
    """An image name that must be listed in the split's image file (the gallery)."""
    name = expect_str(value, where, "an image name string")
    if name not in names:
        raise CirError(f"{where}: image '{name}' is not listed in {split_file}")
    return name
