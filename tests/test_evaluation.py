"""validate / submit end to end on the toy data and on placeholder CIRR, checked by a 2nd path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir_cli import api
from cir_cli.data import load_split
from cir_cli.data.base import query_text
from cir_cli.recipes import load_recipe
from tests.conftest import toy_overrides


def _recall_by_hand(scores: np.ndarray, targets: list[int], excluded: list[int], ks):
    """Independent path: numpy stable argsort of -score, reference masked out."""
    hits = {k: 0 for k in ks}
    for row, (target, ref) in enumerate(zip(targets, excluded, strict=True)):
        order = [i for i in np.argsort(-scores[row], kind="stable") if i != ref]
        rank = order.index(target)
        for k in ks:
            hits[k] += rank < k
    return {k: 100.0 * v / len(targets) for k, v in hits.items()}


def test_validate_equals_a_direct_numpy_computation(toy_root: Path, tmp_path: Path) -> None:
    recipe = load_recipe("toy_clip4cir", toy_overrides(toy_root, tmp_path / "runs"))
    model = api.load_model(recipe)
    evaluation = api.validate(model, recipe)
    (split,) = load_split("cirr", toy_root, "val")

    def pixels(names: list[str]) -> torch.Tensor:
        return torch.stack([model.preprocess(Image.open(split.image_paths[n]).convert("RGB"))
                            for n in names])

    with torch.no_grad():
        gallery = model.encode_targets(pixels(split.gallery))
        refs = pixels([t.reference for t in split.triplets])
        queries = model.encode_queries(refs, [query_text(t, "verbatim") for t in split.triplets])
    scores = (queries @ gallery.T).numpy()
    index = split.gallery_index
    targets = [index[t.target] for t in split.triplets]
    excluded = [index[t.reference] for t in split.triplets]
    expected = _recall_by_hand(scores, targets, excluded, (1, 5, 10, 50))
    for k, value in expected.items():
        assert evaluation.metrics[f"recall_at{k}"] == pytest.approx(value), k
    # subset recall: the group members minus the reference, ordered by score
    hits = 0
    for row, t in enumerate(split.triplets):
        members = [index[m] for m in t.group if m != t.reference]
        best = max(members, key=lambda m: (scores[row, m], -m))
        hits += best == index[t.target]
    assert evaluation.metrics["group_recall_at1"] == pytest.approx(100 * hits / len(targets))
    assert evaluation.metrics["mean_r5_rs1"] == pytest.approx(
        (evaluation.metrics["recall_at5"] + evaluation.metrics["group_recall_at1"]) / 2
    )


def test_validate_twice_encodes_the_gallery_once(toy_root, tmp_path, monkeypatch) -> None:
    from cir_cli.methods.clip4cir import Clip4Cir
    from cir_cli.workflows import run_validation

    calls = []
    original = Clip4Cir.image_representation

    def counting(self, pixels):
        calls.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(Clip4Cir, "image_representation", counting)
    recipe = load_recipe("toy_clip4cir", toy_overrides(toy_root, tmp_path / "runs"))
    first = run_validation(recipe)
    encoded = sum(calls)
    assert encoded == 648  # the val gallery holds every reference and target
    second = run_validation(recipe, save_rankings=True)
    assert sum(calls) == encoded  # warm cache: nothing re-encoded
    assert first.metrics == second.metrics
    for name in ("metrics.json", "metrics.csv", "manifest.json"):
        assert (second.run_dir / name).is_file()
    manifest = json.loads((second.run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["recipe"]["name"] == "toy_clip4cir"
    assert "torch" in manifest["versions"]
    rankings = json.loads((second.run_dir / "rankings.json").read_text())
    assert len(rankings) == 120 and all(len(v) == 50 for v in rankings.values())


def test_fashioniq_layout_reports_per_category_metrics(tmp_path: Path) -> None:
    from cir_cli.data.toy import generate_toy

    root = tmp_path / "toy_fiq"
    generate_toy(root, fmt="fashioniq", n_train_triplets=200, n_val_queries=80,
                 n_test_queries=40)
    shapes = ["circle", "square", "triangle", "star"]
    overrides = toy_overrides(root, tmp_path / "runs") + [
        'data.dataset="fashioniq"', f"data.categories={json.dumps(shapes)}",
        'data.test_split="test"',
    ]
    recipe = load_recipe("toy_clip4cir", overrides)
    metrics = api.validate(api.load_model(recipe), recipe).metrics
    for shape in shapes:
        assert 0 <= metrics[f"{shape}_recall_at10"] <= metrics[f"{shape}_recall_at50"] <= 100
    avg10 = np.mean([metrics[f"{s}_recall_at10"] for s in shapes])
    assert metrics["average_recall_at10"] == pytest.approx(avg10)
    assert metrics["average_recall"] == pytest.approx(
        (metrics["average_recall_at10"] + metrics["average_recall_at50"]) / 2
    )


def test_submit_cirr_on_placeholder_images(placeholder_cirr, shared_data, tmp_path) -> None:
    """4,148 test1 queries + 2 keys per file, as the official examples; reference never listed."""
    from typer.testing import CliRunner

    from cir_cli.cli import app
    from cir_cli.modules import Combiner

    # a seeds'-layout Combiner file as the checkpoint exercises the stage-II import path too
    combiner_file = tmp_path / "combiner.pt"
    torch.save({"epoch": 1, "Combiner": Combiner(64, 32, 48).state_dict()}, combiner_file)
    args = ["-q", "submit", "cirr", "--recipe", "toy_clip4cir", "--checkpoint", str(combiner_file),
            "--name", "tiny"]
    for item in toy_overrides(placeholder_cirr, tmp_path / "runs"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = (p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    ours = json.loads((run / "recall_submission_tiny.json").read_text())
    subset = json.loads((run / "recall_subset_submission_tiny.json").read_text())
    examples = shared_data / "cirr" / "submission_examples"
    official = json.loads((examples / "test1_pred_ranks_recall.json").read_text())
    official_subset = json.loads((examples / "test1_pred_ranks_recall_subset.json").read_text())
    assert len(ours) == len(official) == 4150 and ours.keys() == official.keys()
    assert subset.keys() == official_subset.keys()
    assert (ours["version"], ours["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    captions = json.loads((shared_data / "cirr/captions/cap.rc2.test1.json").read_text())
    for record in captions[:200]:
        key = str(record["pairid"])
        assert len(set(ours[key])) == 50 and record["reference"] not in ours[key]
        assert set(subset[key]) <= set(record["img_set"]["members"]) - {record["reference"]}
        assert len(subset[key]) == 3


def test_metrics_csv_without_pandas_reads_back_as_pandas_wrote_it(tmp_path: Path) -> None:
    import pandas as pd

    from cir_cli.workflows import write_metrics

    metrics = {"recall_at1": 12.345678901234567, "recall_at5": 50.0, "x": float("nan"), "n": 3}
    write_metrics(tmp_path, metrics)
    ours = (tmp_path / "metrics.csv").read_text()
    pd.DataFrame([metrics]).to_csv(tmp_path / "pandas.csv", index=False)
    assert ours == (tmp_path / "pandas.csv").read_text()
