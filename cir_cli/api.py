"""The Python API the CLI is a thin layer over (and what notebooks and later tools call).

from cir_cli.api import load_model
model = load_model("clip_sum_cirr", overrides=["backbone.pretrained=/w/RN50x4.pt"])
q = model.encode_queries(torch.stack([model.preprocess(img)]), ["is red"])
g = model.encode_targets(gallery_pixels)
scores = model.score(q, g)            # (Q, N)
"""

from __future__ import annotations

# The front door: each name lives in its own layer (methods/loading.py, workflows.py, ...) and
# no module of the package imports this one.
from cir_cli.cache import default_cache
from cir_cli.config import Recipe
from cir_cli.data import load_eval_splits
from cir_cli.engine.distributed import resolve_device
from cir_cli.engine.seeding import seed_everything
from cir_cli.methods.loading import load_model, resolve_recipe
from cir_cli.recipes import load_recipe
from cir_cli.workflows import validate

__all__ = [
    "Recipe",
    "default_cache",
    "load_eval_splits",
    "load_model",
    "load_recipe",
    "resolve_device",
    "resolve_recipe",
    "seed_everything",
    "validate",
]
