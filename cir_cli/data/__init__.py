"""Dataset registry: every CIR benchmark loads into `CIRSplit`s through `load_split`.

Importing this package stays cheap (JSON and pathlib only): the CLI imports it for `--help`,
argument validation and `cir prepare`, none of which need torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.data import circo, cirr, fashioniq, genecis
from cir_cli.data.base import CIRSplit, Triplet
from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.recipes import Recipe


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the tool needs to know about one dataset, without loading it."""

    name: str
    splits: tuple[str, ...]
    eval_splits: tuple[str, ...]
    # Splits whose captions carry no target (answers live on an evaluation server).
    unlabelled_splits: tuple[str, ...]
    # Empty for datasets evaluated as one set; otherwise one `CIRSplit` per category.
    categories: tuple[str, ...]
    layout: str
    load: Callable[[Path, str, Sequence[str] | None], list[CIRSplit]]
    files: Callable[[Path, str, Sequence[str] | None], list[tuple[str, tuple[Path, Path]]]]
    # Joins per-category splits into one training set; None when `load` returns one split.
    merge: Callable[[Sequence[CIRSplit]], CIRSplit] | None = None


def _cirr_files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    if categories:
        raise CirError(f"CIRR has no categories; got {', '.join(categories)}")
    return [("", cirr.annotation_files(Path(root), split))]


def _fiq_files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    cats = fashioniq.check_categories(categories)
    return [(c, fashioniq.annotation_files(Path(root), split, c)) for c in cats]


def _circo_files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    ann = circo.annotation_file(Path(root), split)
    return [("", (ann, Path(root) / circo.IMAGE_INFO))]


def _genecis_files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    cats = genecis.check_categories(categories)
    return [(c, (genecis.template_file(Path(root), c),) * 2) for c in cats]


DATASETS: dict[str, DatasetSpec] = {
    "cirr": DatasetSpec(
        name="cirr",
        splits=cirr.SPLITS,
        eval_splits=("val", "test1"),
        unlabelled_splits=("test1",),
        categories=(),
        layout=cirr.LAYOUT,
        load=cirr.load,
        files=_cirr_files,
    ),
    "fashioniq": DatasetSpec(
        name="fashioniq",
        splits=fashioniq.SPLITS,
        eval_splits=("val", "test"),
        unlabelled_splits=("test",),
        categories=fashioniq.CATEGORIES,
        layout=fashioniq.LAYOUT,
        load=fashioniq.load,
        files=_fiq_files,
        merge=fashioniq.merge,
    ),
    "circo": DatasetSpec(
        name="circo",
        splits=circo.SPLITS,
        eval_splits=circo.SPLITS,
        unlabelled_splits=("test",),
        categories=(),
        layout=circo.LAYOUT,
        load=circo.load,
        files=_circo_files,
    ),
    "genecis": DatasetSpec(
        name="genecis",
        splits=genecis.SPLITS,
        eval_splits=genecis.SPLITS,
        unlabelled_splits=(),
        categories=genecis.CATEGORIES,
        layout=genecis.LAYOUT,
        load=genecis.load,
        files=_genecis_files,
    ),
}


def get_dataset(dataset: str) -> DatasetSpec:
    """The registry entry for `dataset`, or a CirError listing the known names."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise CirError(
            f"unknown dataset '{dataset}'; expected one of {', '.join(DATASETS)}"
        ) from None


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


def load_eval_splits(recipe: Recipe, split: str | None = None) -> list[CIRSplit]:
    """The recipe's evaluation split (`split`, default eval.split) as `CIRSplit`s."""
    data = recipe.data
    root = Path(data.root).expanduser()
    categories = data.categories if data.dataset == "fashioniq" else None
    return load_split(data.dataset, root, split or recipe.eval.split, categories)


__all__ = [
    "DATASETS",
    "CIRSplit",
    "DatasetSpec",
    "Triplet",
    "get_dataset",
    "load_eval_splits",
    "load_split",
    "load_train_split",
]
