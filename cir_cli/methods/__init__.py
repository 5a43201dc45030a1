"""Method registry: CIR methods keyed by the recipe's `method.name` (import strings, lazy)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import Recipe
    from cir_cli.methods.base import CIRMethod

METHODS: dict[str, str] = {
    "clip4cir": "cir_cli.methods.clip4cir:Clip4Cir",
    "lincir": "cir_cli.methods.lincir:LinCir",
    "blip4cir": "cir_cli.methods.blip4cir:Blip4Cir",
    "sprc": "cir_cli.methods.sprc:Sprc",
    "cala": "cir_cli.methods.cala:Cala",
    "rerank": "cir_cli.methods.rerank:Rerank",
}


def method_class(name: str) -> type[CIRMethod]:
    target = METHODS.get(name)
    if target is None:
        raise CirError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(recipe: Recipe) -> CIRMethod:
    return method_class(recipe.method.name)(recipe)
