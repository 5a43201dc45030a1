"""Building a recipe's method with its weights: what validation, submission, search and
notebooks start from (`cir_cli.api.load_model` is this)."""

from __future__ import annotations

from pathlib import Path

from cir_cli.config import Recipe
from cir_cli.engine.distributed import resolve_device
from cir_cli.engine.seeding import seed_everything
from cir_cli.methods import build_method
from cir_cli.methods.base import CIRMethod
from cir_cli.recipes import apply_overrides, load_recipe, validate_recipe
from cir_cli.runs import resolve_checkpoint_ref, resolve_finetune_checkpoint


def resolve_recipe(recipe: Recipe | str, overrides: list[str] | None = None) -> Recipe:
    """A recipe object or a recipe name/path, with `overrides` (--set lines) applied."""
    if isinstance(recipe, Recipe):
        if overrides:
            return validate_recipe(apply_overrides(recipe.to_dict(), overrides), recipe.name)
        return recipe
    return load_recipe(recipe, overrides)


def load_model(
    recipe: Recipe | str,
    overrides: list[str] | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = "cpu",
    load_finetuned: bool = True,
) -> CIRMethod:
    """Build the recipe's method with its backbone weights (+ a trained checkpoint), eval mode."""
    resolved = resolve_finetune_checkpoint(resolve_recipe(recipe, overrides))
    checkpoint = resolve_checkpoint_ref(
        None if checkpoint is None else str(checkpoint),
        resolved.output.dir,
        resolved.name,
        ("combiner", "finetune"),
    )
    seed_everything(resolved.seed)
    model = build_method(resolved)
    if resolved.finetune.checkpoint and load_finetuned:
        # The stage-I weights later stages and validation start from.
        model.load_checkpoint(resolved.finetune.checkpoint)
    if checkpoint is not None:
        model.load_checkpoint(str(checkpoint))
    # What the weights came from, resolved ("latest" -> a run folder), for run manifests.
    model.loaded_from = {"finetune": resolved.finetune.checkpoint, "checkpoint": checkpoint}
    model.to(resolve_device(device))
    model.eval()
    return model
