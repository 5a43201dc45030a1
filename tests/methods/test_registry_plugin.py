"""A method added from one file: tests/methods/fixtures/throwaway_method.py registers a
method and its [method] section; a recipe then names it, its keys are validated, and the
real API builds, encodes and scores with it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest
import torch

from cir_cli import registry
from cir_cli.config import MethodSection
from cir_cli.errors import CirError
from cir_cli.methods import build_method, method_class
from cir_cli.recipes import load_recipe, validate_recipe

PLUGIN = Path(__file__).parent / "fixtures" / "throwaway_method.py"
RECIPE = '[method]\nname = "throwaway"\ndim = 4\n{extra}[data]\nroot = "unused"\n'


def _recipe(tmp_path: Path, extra: str = ""):
    path = tmp_path / "throwaway.toml"
    path.write_text(RECIPE.format(extra=extra))
    return load_recipe(str(path))


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import the plugin file as an out-of-tree module would be; the registration is undone
    after the test so the other tests see only the built-in methods."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    spec = importlib.util.spec_from_file_location("throwaway_method", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throwaway_method", module)
    spec.loader.exec_module(module)
    return module


def test_unregistered_method_is_a_one_line_error(tmp_path: Path) -> None:
    assert "throwaway" not in registry.method_names()
    with pytest.raises(CirError, match="method.name = 'throwaway' is not known; expected one of"):
        _recipe(tmp_path)
    with pytest.raises(CirError, match="unknown method 'throwaway'; known: blip4cir, cala"):
        method_class("throwaway")


def test_plugin_method_validates_its_own_keys(plugin: ModuleType, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    assert type(recipe.method) is plugin.ThrowawayConfig
    assert (recipe.method.dim, recipe.method.text_weight) == (4, 1.0)
    assert recipe.to_dict()["method"] == {"name": "throwaway", "dim": 4, "text_weight": 1.0}
    # A manifest (the resolved recipe as JSON) loads back to the same recipe.
    assert validate_recipe(json.loads(json.dumps(recipe.to_dict())), "manifest") == recipe
    with pytest.raises(CirError, match="unknown key 'method.dimm'; did you mean 'dim'"):
        _recipe(tmp_path, "dimm = 3\n")
    with pytest.raises(CirError, match="unknown key 'method.combining'"):
        _recipe(tmp_path, 'combining = "sum"\n')  # a clip4cir key is not a throwaway key
    with pytest.raises(CirError, match="x: method.dim: Input should be greater than or equal to 1"):
        validate_recipe({"method": {"name": "throwaway", "dim": 0}}, "x")
    assert "throwaway" in registry.method_names()


def test_plugin_method_builds_encodes_and_scores(plugin: ModuleType, tmp_path: Path) -> None:
    model = build_method(_recipe(tmp_path, "text_weight = 0.0\n"))
    assert type(model) is plugin.Throwaway and model.name == "throwaway"
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    texts = ["is red", "has stripes", ""]
    queries, targets = model.encode_queries(pixels, texts), model.encode_targets(pixels)
    scores = model.score(queries, targets)
    assert queries.shape == targets.shape == (3, 4) and scores.shape == (3, 3)
    # text_weight = 0: a query is its own reference's target, so the diagonal is the cosine
    # of a unit vector with itself; by hand: normalize(W mean(pixels) + b).
    by_hand = torch.nn.functional.normalize(
        pixels.mean(dim=(2, 3)) @ model.image_proj.weight.T + model.image_proj.bias, dim=-1
    )
    torch.testing.assert_close(targets, by_hand)
    torch.testing.assert_close(scores.diagonal(), torch.ones(3))
    # With the text in the query (the recipe's key reaches the method) the queries move.
    texted = build_method(_recipe(tmp_path, "text_weight = 1.0\n"))
    assert not torch.allclose(texted.encode_queries(pixels, texts), queries)


def test_a_plugin_cannot_take_a_builtin_name(plugin: ModuleType) -> None:
    with pytest.raises(ValueError, match="ThrowawayConfig needs `name: Literal\\['other'\\]"):
        registry.register_method("other", config=plugin.ThrowawayConfig)

    class Impostor(MethodSection):
        name: Literal["clip4cir"] = "clip4cir"

    with pytest.raises(ValueError, match="method 'clip4cir' is built in"):
        registry.register_method("clip4cir", config=Impostor)(plugin.Throwaway)
    with pytest.raises(ValueError, match="'throwaway' is already registered by throwaway_method"):

        @registry.register_method("throwaway", config=plugin.ThrowawayConfig)
        class Another(plugin.Throwaway):
            pass


def test_builtin_method_sections_load_without_torch() -> None:
    """Recipes validate (`cir recipes show`, dry runs) without importing any method's code."""
    import subprocess

    code = (
        "import sys; from cir_cli import registry\n"
        "for name in registry.BUILTIN_METHODS:\n"
        "    assert registry.method_config(name).model_fields['name'].default == name\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('cir_cli.methods.')"
        " and not m.endswith('_config')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(registry.BUILTIN_METHODS))
def test_builtin_method_registers_the_listed_section(name: str) -> None:
    cls = method_class(name)
    assert cls.name == name
    assert registry._REGISTERED[name] == (cls, registry.method_config(name))
