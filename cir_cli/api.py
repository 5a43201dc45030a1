"""The Python API the CLI is a thin layer over (and what notebooks and later tools call).

from cir_cli.api import load_model
model = load_model("clip_sum_cirr", overrides=["backbone.pretrained=/w/RN50x4.pt"])
q = model.encode_queries(torch.stack([model.preprocess(img)]), ["is red"])
g = model.encode_targets(gallery_pixels)
scores = model.score(q, g)            # (Q, N)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.config import Recipe
from cir_cli.errors import CirError
from cir_cli.recipes import load_recipe

if TYPE_CHECKING:
    import torch

    from cir_cli.cache import FeatureCache
    from cir_cli.data.base import CIRSplit
    from cir_cli.evaluation import Evaluation
    from cir_cli.methods.base import CIRMethod


def resolve_recipe(recipe: Recipe | str, overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            from cir_cli.recipes import apply_overrides, validate_recipe

            return validate_recipe(apply_overrides(recipe.to_dict(), overrides), recipe.name)
        return recipe
    return load_recipe(recipe, overrides)


def resolve_device(device: str | None) -> torch.device:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CirError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CirError(f"--device {device}: CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise CirError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise CirError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    return resolved


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(
    recipe: Recipe | str,
    overrides: list[str] | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = "cpu",
    load_finetuned: bool = True,
) -> CIRMethod:
    """Build the recipe's method with its backbone weights (+ a trained checkpoint), eval mode."""
    from cir_cli.engine.checkpointing import resolve_checkpoint_ref
    from cir_cli.methods import build_method

    resolved = resolve_recipe(recipe, overrides)
    base = resolve_checkpoint_ref(
        resolved.finetune.checkpoint, resolved.output.dir, resolved.name, ("finetune",)
    )
    if base != resolved.finetune.checkpoint:  # `latest` or hf://
        resolved = resolved.model_copy(deep=True)
        resolved.finetune.checkpoint = base
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


def load_eval_splits(recipe: Recipe, split: str | None = None) -> list[CIRSplit]:
    from cir_cli.data import load_split, recipe_categories

    data = recipe.data
    root = Path(data.root).expanduser()
    categories = recipe_categories(data.dataset, data.categories)
    return load_split(data.dataset, root, split or recipe.eval.split, categories)


def default_cache(recipe: Recipe) -> FeatureCache:
    from cir_cli.cache import FeatureCache

    root = recipe.output.cache_dir or str(Path(recipe.output.dir) / ".cache")
    return FeatureCache(Path(root).expanduser())


def validate(
    model: CIRMethod,
    recipe: Recipe,
    split: str | None = None,
    use_cache: bool = True,
    depth: int | None = None,
) -> Evaluation:
    """Evaluate `model` on the recipe's dataset split with the dataset's protocol.

    `depth`: keep this many ranked names per query (default: the servers' 50)."""
    from cir_cli.evaluation import RANKING_DEPTH, evaluate

    splits = load_eval_splits(recipe, split)
    return evaluate(
        model,
        splits,
        cache=default_cache(recipe) if use_cache else None,
        batch_size=recipe.eval.batch_size,
        num_workers=recipe.data.num_workers,
        rank_chunk=recipe.eval.rank_chunk,
        depth=depth or RANKING_DEPTH,
    )
