"""The method registry: `method.name` -> the method class and the class of its [method] section.

A method registers itself with a decorator on its class, naming its section class:

    @register_method("mine", config=MineConfig)
    class Mine(CIRMethod): ...

An out-of-tree method does exactly this in one file; importing that file makes
`[method] name = "mine"` a valid recipe (its keys validated by `MineConfig`) and
`build_method(recipe)` build it. The built-in methods are listed below as import strings, so
listing them or validating a recipe never imports torch: a recipe's [method] section needs only
its section class, which lives in a torch-free module beside the method
(`cir_cli/methods/<name>_config.py`); the method's own module is imported when it is built.

This module sits at the bottom of the package (standard library and `errors` only).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from cir_cli.errors import CirError

T = TypeVar("T")

# name -> (method class, [method] section class) as "module:attribute" import strings.
_M = "cir_cli.methods."
BUILTIN_METHODS: dict[str, tuple[str, str]] = {
    "clip4cir": (_M + "clip4cir:Clip4Cir", _M + "clip4cir_config:Clip4CirMethodConfig"),
    "lincir": (_M + "lincir:LinCir", _M + "lincir_config:LinCirMethodConfig"),
    "blip4cir": (_M + "blip4cir:Blip4Cir", _M + "blip4cir_config:Blip4CirMethodConfig"),
    "sprc": (_M + "sprc:Sprc", _M + "sprc_config:SprcMethodConfig"),
    "cala": (_M + "cala:Cala", _M + "cala_config:CalaMethodConfig"),
    "rerank": (_M + "rerank:Rerank", _M + "rerank_config:RerankMethodConfig"),
}

# Methods whose class has been registered (built-ins once imported, plugins when imported):
# name -> (the CIRMethod subclass, its MethodSection subclass). Typed loosely: this module
# sits below both and imports neither.
_REGISTERED: dict[str, tuple[type, type]] = {}


def _import(target: str) -> Any:
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def method_names() -> list[str]:
    """Every method a recipe may name: the built-ins, then registered plug-ins."""
    return list(dict.fromkeys([*BUILTIN_METHODS, *_REGISTERED]))


def _unknown(name: str) -> CirError:
    return CirError(f"unknown method '{name}'; known: {', '.join(sorted(method_names()))}")


def register_method(name: str, *, config: type) -> Callable[[type[T]], type[T]]:
    """Class decorator: make `cls` the method `name` (sets `cls.name`), its [method] section
    validated by `config` (a `cir_cli.config.MethodSection` whose `name` is `Literal[name]`)."""

    field = getattr(config, "model_fields", {}).get("name")
    if field is None or field.default != name:
        # Otherwise `[method] name = "<name>"` would fail validation with a puzzling message.
        raise ValueError(
            f"method '{name}': {config.__qualname__} needs `name: Literal[{name!r}] = {name!r}`"
        )

    def decorate(cls: type[T]) -> type[T]:
        builtin = BUILTIN_METHODS.get(name)
        if builtin is not None and _import(builtin[1]) is not config:
            raise ValueError(f"method '{name}' is built in with the section class {builtin[1]}")
        previous = _REGISTERED.get(name)
        # Re-importing the same module (a reload, a test fixture) replaces its own entry; a
        # second, different class under a taken name is a mistake.
        if previous is not None and _qualified(previous[0]) != _qualified(cls):
            raise ValueError(f"method '{name}' is already registered by {_qualified(previous[0])}")
        _REGISTERED[name] = (cls, config)
        cls.name = name  # type: ignore[attr-defined]  # what manifests and messages call it
        return cls

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_config(name: str) -> type:
    """The [method] section class of `name` (imports no method code for built-ins)."""
    if name in _REGISTERED:
        return _REGISTERED[name][1]
    if name in BUILTIN_METHODS:
        return _import(BUILTIN_METHODS[name][1])
    raise _unknown(name)


def method_class(name: str) -> type:
    """The method class of `name`; a built-in's module is imported (and registers) on lookup."""
    if name not in _REGISTERED and name in BUILTIN_METHODS:
        _import(BUILTIN_METHODS[name][0])
    if name not in _REGISTERED:
        raise _unknown(name)
    return _REGISTERED[name][0]
