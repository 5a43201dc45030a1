"""A throwaway dataset added from this one file: what adding a dataset to `cir` takes.

Layout: `ROOT/tiny.json` = {"images": {name: relpath}, "val": [{"id", "reference", "caption",
"target"}]}. The file parses that layout into a `CIRSplit` and declares the dataset's
`DatasetSpec` (its loader and protocol: selection metric, recall ks, summary); the fixture
registers it. Nothing in `cir_cli/` names it: recipes (`data.dataset = "tiny_json"`), `load_split`,
`api.load_eval_splits` and evaluation find it through the registry.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cir_cli.data import DATASETS, CIRSplit, DatasetSpec, Triplet, register_dataset
from cir_cli.errors import CirError

NAME = "tiny_json"
SPLITS = ("val",)
LAYOUT = "ROOT/tiny.json with images and val queries"


def load(root: Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    if split not in SPLITS:
        raise CirError(f"unknown tiny_json split '{split}'; expected one of {', '.join(SPLITS)}")
    ann = json.loads((Path(root) / "tiny.json").read_text(encoding="utf-8"))
    images = {name: Path(root) / rel for name, rel in ann["images"].items()}
    triplets = [
        Triplet(q["id"], q["reference"], q["target"], (q["caption"],)) for q in ann[split]
    ]
    return [CIRSplit(NAME, split, triplets, list(images), images, remove_reference=True)]


def files(root: Path, split: str, categories: Sequence[str] | None):
    return [("", (Path(root) / "tiny.json",) * 2)]


def summarize(results) -> dict[str, float]:
    recall = results[0].recall
    out = {f"recall_at{k}": v for k, v in recall.items()}
    out["tiny_score"] = statistics.fmean(recall.values())  # the headline: mean over ks
    return out


SPEC = DatasetSpec(
    name=NAME,
    title="Tiny",
    splits=SPLITS,
    categories=(),
    layout=LAYOUT,
    load=load,
    files=files,
    selection_metric="tiny_score",
    recall_ks=(1, 2),
    summarize=summarize,
)


@pytest.fixture()
def tiny_dataset() -> Iterator[DatasetSpec]:
    spec = register_dataset(SPEC)
    try:
        yield spec
    finally:
        del DATASETS[spec.name]
