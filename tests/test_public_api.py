"""The stable Python surface scripts and notebooks import (README "Python API").

Each name must import from its documented path, be what the table says (a function or a
class), and be listed in that module's `__all__` where the module has one. The README's table
and PUBLIC_API below must agree, so the documentation cannot drift from what is tested.
Internal modules may move; these paths may not (change them only with the README).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# (name, import path, kind): "function" = a plain callable, "class" = a class.
PUBLIC_API: list[tuple[str, str, str]] = [
    ("load_recipe", "cir_cli.recipes", "function"),
    ("load_model", "cir_cli.api", "function"),
    ("validate", "cir_cli.api", "function"),
    ("build_method", "cir_cli.methods", "function"),
    ("Combiner", "cir_cli.modules", "class"),
    ("Phi", "cir_cli.modules", "class"),
    ("recall_at_k", "cir_cli.metrics", "function"),
    ("recall_from_ranks", "cir_cli.metrics", "function"),
    ("subset_recall_at_k", "cir_cli.metrics", "function"),
    ("average_precision_at_k", "cir_cli.metrics", "function"),
    ("mean_average_precision_at_k", "cir_cli.metrics", "function"),
    ("cirr_summary", "cir_cli.metrics", "function"),
    ("fashioniq_summary", "cir_cli.metrics", "function"),
    ("circo_summary", "cir_cli.metrics", "function"),
    ("genecis_summary", "cir_cli.metrics", "function"),
    ("cosine_score", "cir_cli.ranking", "function"),
    ("max_over_tokens_score", "cir_cli.ranking", "function"),
    ("rank_gallery", "cir_cli.ranking", "function"),
    ("rank_split", "cir_cli.ranking", "function"),
    ("target_ranks", "cir_cli.ranking", "function"),
    ("rank_within_groups", "cir_cli.ranking", "function"),
    ("build_cirr_submission", "cir_cli.submission", "function"),
    ("write_cirr_submission", "cir_cli.submission", "function"),
    ("validate_cirr_submission", "cir_cli.submission", "function"),
    ("write_circo_submission", "cir_cli.submission", "function"),
    ("validate_circo_submission", "cir_cli.submission", "function"),
    ("load_submission", "cir_cli.submission", "function"),
    ("load_split", "cir_cli.data", "function"),
    ("load_train_split", "cir_cli.data", "function"),
    ("get_dataset", "cir_cli.data", "function"),
    ("build_transform", "cir_cli.data.transforms", "function"),
]


@pytest.mark.parametrize(("name", "path", "kind"), PUBLIC_API, ids=[n for n, _, _ in PUBLIC_API])
def test_public_name_imports_from_its_documented_path(name: str, path: str, kind: str) -> None:
    module = importlib.import_module(path)
    assert hasattr(module, name), f"`from {path} import {name}` no longer works"
    obj = getattr(module, name)
    if kind == "class":
        assert inspect.isclass(obj), f"{path}.{name} is documented as a class, got {obj!r}"
    else:
        assert callable(obj) and not inspect.isclass(obj), f"{path}.{name} is not a function"
    exported = getattr(module, "__all__", None)
    if exported is not None:
        assert name in exported, f"{path}.__all__ does not list the public name {name}"


def _readme_table() -> list[tuple[str, str]]:
    """(name, import path) rows of the README's "Python API" table."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Python API' section"
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith("`cir_cli"):
            path = cells[1].strip("`")
            for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[0]):
                rows.append((name, path))
    return rows


def test_readme_documents_exactly_the_tested_surface() -> None:
    documented = set(_readme_table())
    tested = {(name, path) for name, path, _ in PUBLIC_API}
    assert documented == tested, (
        f"README only: {sorted(documented - tested)}; test only: {sorted(tested - documented)}"
    )
