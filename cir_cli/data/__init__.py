"""Dataset registry: every CIR benchmark loads into `CIRSplit`s through `load_split`.

Importing this package stays cheap (JSON and pathlib only): the CLI imports it for `--help`,
argument validation and `cir prepare`, none of which need torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.data import circo, cirr, fashioniq, genecis
from cir_cli.data.base import CIRSplit, DatasetSpec, Submission, Triplet
from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import DataConfig, Recipe

# Adding a dataset: one module that parses its layout into `CIRSplit`s and declares its
# `DatasetSpec` (loading and protocol), plus a line here (or `register_dataset` from outside).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (cirr.SPEC, fashioniq.SPEC, circo.SPEC, genecis.SPEC)
}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make `spec` known to `load_split`, recipes (data.dataset) and evaluation."""
    if spec.name in DATASETS:
        raise CirError(f"dataset '{spec.name}' is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(dataset: str) -> DatasetSpec:
    """The registry entry for `dataset`, or a CirError listing the known names."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise CirError(
            f"unknown dataset '{dataset}'; expected one of {', '.join(DATASETS)}"
        ) from None


def submission_benchmark(benchmark: str) -> DatasetSpec:
    """The dataset `cir submit <benchmark>` writes for, or a CirError naming those with a
    test server."""
    spec = DATASETS.get(benchmark)
    if spec is None or spec.submission is None:
        raise CirError(
            f"unknown benchmark {benchmark!r} for `cir submit`; expected {submission_names()}"
        )
    return spec


def submission_names() -> str:
    """The datasets with a test server, for messages: "cirr or circo"."""
    return " or ".join(n for n, s in DATASETS.items() if s.submission is not None)


def recipe_categories(dataset: str, categories: Sequence[str]) -> Sequence[str] | None:
    """The categories to load for a recipe's `data.categories`: those for datasets whose
    categories a recipe picks (FashionIQ), None (all, or none at all) for the others."""
    return categories if get_dataset(dataset).recipe_categories else None


def train_caption_policy(split: CIRSplit, configured: str | None) -> str:
    """data.train_caption_policy, or the dataset's own training default."""
    if configured is not None:
        return configured
    return get_dataset(split.dataset).train_caption_policy


def load_split(
    dataset: str, root: Path, split: str, categories: Sequence[str] | None = None
) -> list[CIRSplit]:
    """Load one split: a single `CIRSplit` for CIRR, one per category for FashionIQ.

    Raises CirError for an unknown dataset/split/category, a missing root or annotation file
    and malformed annotations. Images are not touched (see `CIRSplit.require_images`).
    """
    return get_dataset(dataset).load(Path(root), split, categories)


def load_train_split(
    dataset: str, root: Path, categories: Sequence[str] | None = None, split: str = "train"
) -> CIRSplit:
    """All training triplets of `dataset` as one `CIRSplit`.

    FashionIQ concatenates the requested categories (gallery = union, caption policy
    `fiq_random`, subset ""), as the seeds train on all categories at once.
    """
    spec = get_dataset(dataset)
    splits = spec.load(Path(root), split, categories)
    if spec.merge is None:
        return splits[0]
    return spec.merge(splits)


def load_data_split(data: DataConfig, split: str) -> list[CIRSplit]:
    """`split` of the [data] section's dataset as `CIRSplit`s (its categories where they apply)."""
    categories = recipe_categories(data.dataset, data.categories)
    return load_split(data.dataset, Path(data.root).expanduser(), split, categories)


def load_eval_splits(recipe: Recipe, split: str | None = None) -> list[CIRSplit]:
    """The recipe's evaluation split (`split`, default eval.split) as `CIRSplit`s."""
    return load_data_split(recipe.data, split or recipe.eval.split)


__all__ = [
    "DATASETS",
    "CIRSplit",
    "DatasetSpec",
    "Submission",
    "Triplet",
    "get_dataset",
    "load_data_split",
    "load_eval_splits",
    "load_split",
    "load_train_split",
    "recipe_categories",
    "register_dataset",
    "submission_benchmark",
    "submission_names",
    "train_caption_policy",
]
