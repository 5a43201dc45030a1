"""Adding a dataset touches one file: tests/data/tiny_dataset.py registers a throwaway
dataset, which then loads, validates in a recipe and evaluates through the real path with
its own protocol."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cir_cli import api
from cir_cli.config import Recipe
from cir_cli.data import DATASETS, get_dataset, load_split, train_caption_policy
from cir_cli.errors import CirError
from cir_cli.evaluation import evaluate, selection_metric
from cir_cli.methods.base import CIRMethod
from cir_cli.recipes import load_recipe
from tests.data import tiny_dataset as tiny_module
from tests.data.tiny_dataset import tiny_dataset  # noqa: F401  (the fixture)

# Grey level per gallery image; the query is its reference's grey, the score -|difference|.
GREYS = {"a": 0, "b": 40, "c": 60, "d": 120, "e": 130, "f": 250}
QUERIES = [
    # ref c: b (d=20) is nearest once c itself is removed -> target rank 1
    {"id": "q1", "reference": "c", "caption": "darker", "target": "b"},
    # ref d: e (d=10) before c (d=60) -> rank 2
    {"id": "q2", "reference": "d", "caption": "much darker", "target": "c"},
    # ref a: b, c, d, e before f -> rank 5
    {"id": "q3", "reference": "a", "caption": "white", "target": "f"},
]


class GreyMethod(CIRMethod):
    """Query = the reference's mean pixel (text ignored); score = -|query - candidate|."""

    name = "grey"

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def image_size(self) -> int:
        return 16

    def image_cache_key(self) -> str | None:
        return None

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(1, 2, 3))[:, None]

    def queries_from_representation(self, reference, texts):
        return reference

    def targets_from_representation(self, representation):
        return representation

    def score(self, queries, targets):
        return -torch.cdist(queries, targets)


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    for name, grey in GREYS.items():
        Image.new("RGB", (16, 16), (grey,) * 3).save(tmp_path / f"{name}.png")
    ann = {"images": {n: f"{n}.png" for n in GREYS}, "val": QUERIES}
    (tmp_path / "tiny.json").write_text(json.dumps(ann), encoding="utf-8")
    return tmp_path


def test_a_dataset_is_added_from_one_file(tiny_dataset, tiny_root: Path) -> None:  # noqa: F811
    # Everything the dataset brings (loader, protocol, registration) lives in one file.
    fixture_file = inspect.getsourcefile(tiny_module)
    assert {inspect.getsourcefile(f) for f in (tiny_dataset.load, tiny_dataset.summarize)} == {
        fixture_file
    }
    package = Path(__file__).parents[2] / "cir_cli"
    assert not any('"tiny_json"' in p.read_text(encoding="utf-8") for p in package.rglob("*.py"))

    [split] = load_split("tiny_json", tiny_root, "val")
    assert [t.query_id for t in split.triplets] == ["q1", "q2", "q3"]
    assert train_caption_policy(split, None) == "verbatim"  # the DatasetSpec default

    # A recipe names it (validated against the registry) and evaluation follows its protocol.
    recipe = Recipe.model_validate(
        {"data": {"dataset": "tiny_json", "root": str(tiny_root), "transform": "squarepad"}}
    )
    assert selection_metric(recipe) == "tiny_score"
    splits = api.load_eval_splits(recipe, "val")
    result = evaluate(GreyMethod(recipe), splits)
    [split_result] = result.splits
    assert split_result.recall == pytest.approx({1: 100 / 3, 2: 200 / 3})  # ks (1, 2) only
    assert result.metrics == pytest.approx(
        {"recall_at1": 100 / 3, "recall_at2": 200 / 3, "tiny_score": 50.0}
    )
    assert split_result.target_ranks.tolist() == [0, 1, 4]


def test_an_unregistered_dataset_is_one_clear_error(tiny_root: Path) -> None:
    assert "tiny_json" not in DATASETS  # the fixture above unregistered it
    with pytest.raises(CirError, match="dataset = 'tiny_json' is not allowed; expected one of"):
        load_recipe("toy_clip4cir", ['data.dataset="tiny_json"'])
    with pytest.raises(CirError, match="unknown dataset 'tiny_json'"):
        load_split("tiny_json", tiny_root, "val")


def test_builtin_protocols_match_the_metrics_module() -> None:
    """The specs spell the ks out (the data package stays free of torch); they must agree."""
    from cir_cli import metrics

    assert get_dataset("cirr").recall_ks == metrics.CIRR_KS
    assert get_dataset("fashioniq").recall_ks == metrics.FASHIONIQ_KS
    assert get_dataset("circo").recall_ks == metrics.CIRCO_KS
    assert {n: s.selection_metric for n, s in DATASETS.items()} == {
        "cirr": "mean_r5_rs1",
        "fashioniq": "average_recall",
        "circo": "map_at10",
        "genecis": "average_recall_at1",
    }
    with pytest.raises(CirError, match="already registered"):
        from cir_cli.data import register_dataset

        register_dataset(get_dataset("cirr"))
