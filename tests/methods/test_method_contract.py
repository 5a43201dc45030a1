"""The method contract, checked for every registered method from its toy recipe.

Each method builds a tiny model, encodes queries and targets, scores them, takes one stage-I
training step through the real training workflow (`run_training`: the task, the recipe's
optimizer, the trainer, the run checkpoint), and the saved weights load strictly into a fresh
model (`load_model(..., checkpoint=run)`), which then scores exactly as the trained one does.
A registered method without a built-in `toy_*` recipe fails: every method gets a CPU toy.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import toy_overrides


def registered_methods() -> list[str]:
    """The built-in method registry's names (the one place to update if the registry moves).

    Built-ins only: a plug-in another test registers at collection time ships no toy recipe.
    """
    import importlib

    places = (("cir_cli.methods", "METHODS"), ("cir_cli.registry", "BUILTIN_METHODS"))
    for module, attribute in places:
        try:
            registry = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            continue
        return sorted(registry)
    raise AssertionError("no method registry found: update registered_methods()")


def toy_recipe_for(method: str) -> str | None:
    """The built-in `toy_*` recipe whose method.name is `method` (the plain one, not a `_fixed`
    variant, when there are several)."""
    from cir_cli.recipes import builtin_dir

    found = []
    for path in sorted(builtin_dir().glob("toy_*.toml")):
        data = tomllib.loads(path.read_text())
        name = data.get("method", {}).get("name")
        if name is None and "extends" in data:
            continue  # a variant of another toy recipe (same method)
        if name == method:
            found.append(path.stem)
    return min(found, key=len) if found else None


# Per-method overrides that make the toy CPU-tiny here (on top of toy_overrides).
TINY = [
    "finetune.epochs=1", "finetune.max_steps=1", "finetune.batch_size=8",
    "finetune.validate_every=1", "eval.batch_size=64", "data.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller toy than conftest's (the two validations of a run dominate its time)."""
    from cir_cli.data.toy import generate_toy

    root = tmp_path_factory.mktemp("contract_toy")
    generate_toy(root, fmt="cirr", seed=0, n_train_triplets=64, n_val_queries=24,
                 n_test_queries=8)
    return root


def _skip_curve_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """curves.png (matplotlib) is no part of the method contract and costs seconds per
    validation on a busy CPU; everything else of the run is the real thing."""
    try:
        from cir_cli.engine.run_log import RunLog
    except ImportError:  # moved: the plots then simply run
        return
    monkeypatch.setattr(RunLog, "plot_curves", lambda self, selection_metric: None)


def _images(n: int) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    return [Image.new("RGB", (48 + 8 * i, 40), colours[i % len(colours)]) for i in range(n)]


@pytest.mark.parametrize("method", registered_methods())
def test_every_method_keeps_the_contract(
    method: str, tiny_toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cir_cli.api import load_model
    from cir_cli.checkpoints import load_weights
    from cir_cli.errors import CirError
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_training

    recipe_name = toy_recipe_for(method)
    assert recipe_name is not None, (
        f"method {method!r} is registered but no recipes/toy_*.toml uses it: add a CPU toy"
    )
    sets = [*toy_overrides(tiny_toy, tmp_path / "runs"), *TINY]
    if method == "lincir":
        # LinCIR trains Phi on text lines; its toy recipe points at a prepared tiny CLIP.
        from cir_cli.data.text_corpus import toy_text_lines

        texts = tmp_path / "texts.txt"
        texts.write_text("\n".join(toy_text_lines(16, seed=1)) + "\n")
        sets += ['backbone.pretrained=""', f'method.text_files=["{texts}"]',
                 "finetune.validate_every_steps=1"]
    recipe = load_recipe(recipe_name, sets)
    assert recipe.method.name == method
    _skip_curve_plots(monkeypatch)

    # -- build, encode, score ---------------------------------------------------------------
    model = load_model(recipe, device="cpu")
    assert model.name == method
    images = _images(5)
    pixels = torch.stack([model.preprocess(im) for im in images])
    assert pixels.shape[1:] == (3, model.image_size, model.image_size)
    texts = ["is red", "has two circles", "is larger"]
    queries = model.encode_queries(pixels[:3], texts)
    targets = model.encode_targets(pixels)
    scores = model.score(queries, targets)
    assert scores.shape == (3, 5)
    assert torch.isfinite(scores).all()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    # -- one training step through the real workflow, saved as a run checkpoint ---------------
    run = run_training(recipe, "finetune")
    assert run.steps == 1
    losses = [row["train_loss"] for row in run.history if "train_loss" in row]
    assert losses and all(math.isfinite(v) for v in losses)
    weights = run.run_dir / "checkpoints" / "last" / "weights.safetensors"
    state, meta = load_weights(weights)
    assert state and meta["stage"] == "finetune"
    changed = [k for k, v in state.items() if k in initial and not torch.equal(v, initial[k])]
    assert changed, f"{method}: one step changed none of the {len(state)} saved tensors"

    # -- strict load into a fresh model: same tensors, same scores ------------------------------
    loaded = load_model(recipe, checkpoint=str(run.run_dir), device="cpu")
    own = loaded.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), f"{method}: {key} did not load"
    again = loaded.score(loaded.encode_queries(pixels[:3], texts), loaded.encode_targets(pixels))
    assert again.shape == (3, 5) and torch.isfinite(again).all()

    # A checkpoint with a tensor this model does not have is refused, not silently skipped.
    from cir_cli.checkpoints import save_weights

    bad = tmp_path / "bad.safetensors"
    save_weights(bad, {**state, "not_a_parameter.weight": torch.zeros(2)}, meta)
    with pytest.raises(CirError, match="not_a_parameter"):
        load_model(recipe, checkpoint=str(bad), device="cpu")
