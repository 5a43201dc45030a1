"""CIR methods, one file each, registered by `method.name` (see cir_cli/registry.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cir_cli.registry import method_class, method_names, register_method

if TYPE_CHECKING:
    from cir_cli.config import Recipe
    from cir_cli.methods.base import CIRMethod

__all__ = ["build_method", "method_class", "method_names", "register_method"]


def build_method(recipe: Recipe) -> CIRMethod:
    return method_class(recipe.method.name)(recipe)
