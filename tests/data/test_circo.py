"""CIRCO (spec lincir_searle_circo.md 3.3): mAP@k with several ground truths, loader, outputs.

The golden values come from scoring the official `submission_examples/submission_val.json`
against the real `annotations/val.json` with the official formula (spec 3.3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cir_cli import metrics
from cir_cli.errors import CirError


def _ap(ranked: list[int], gts: list[int], ks=(5,)) -> dict[int, float]:
    out = metrics.average_precision_at_k(torch.tensor([ranked]), torch.tensor([gts]), ks)
    return {k: float(v[0]) for k, v in out.items()}


def test_hand_worked_average_precision() -> None:
    # rel = 1 0 1 0 0, Prec = 1, 1/2, 2/3: AP@5 = (1 + 2/3) / min(2, 5)
    assert _ap([7, 8, 9, 10, 11], [7, 9])[5] == pytest.approx((1 + 2 / 3) / 2)
    # AP@2 only sees the first hit but divides by min(|G|, 2) = 2
    assert _ap([7, 8, 9, 10, 11], [7, 9], ks=(2,))[2] == pytest.approx(0.5)
    # 10 ground truths, k = 5: the denominator is k, so a perfect top-5 scores 1
    assert _ap([1, 2, 3, 4, 5], list(range(1, 11)))[5] == pytest.approx(1.0)
    # a hit at rank 5 only: Prec_5 = 1/5, one ground truth
    assert _ap([0, 0 + 20, 21, 22, 3], [3])[5] == pytest.approx(0.2)
    assert _ap([1, 2, 3, 4, 5], [99])[5] == 0.0
    # padding (-1) in ground truths is ignored, several queries at once
    ranked = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gts = torch.tensor([[2, -1], [4, 6]])
    mean = metrics.mean_average_precision_at_k(ranked, gts, (3,))
    assert mean[3] == pytest.approx(100 * ((1 / 2) / 1 + (1 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="at least one ground truth"):
        metrics.average_precision_at_k(ranked, torch.tensor([[-1], [4]]), (3,))


def test_official_example_val_submission_gives_the_reference_values(shared_data: Path) -> None:
    circo = shared_data / "circo"
    if not (circo / "annotations" / "val.json").is_file():
        pytest.skip(f"CIRCO annotations not found under {circo}")
    val = json.loads((circo / "annotations" / "val.json").read_text())
    sub = json.loads((circo / "submission_examples" / "submission_val.json").read_text())
    ranked = torch.tensor([[int(i) for i in sub[str(q["id"])]] for q in val])
    width = max(len(q["gt_img_ids"]) for q in val)
    gts = torch.full((len(val), width), -1, dtype=torch.long)
    for row, q in enumerate(val):
        gts[row, : len(q["gt_img_ids"])] = torch.tensor(q["gt_img_ids"])
    maps = metrics.mean_average_precision_at_k(ranked, gts, metrics.CIRCO_KS)
    expected = {5: 0.4861, 10: 0.5178, 25: 0.5400, 50: 0.6020}
    for k, value in expected.items():
        assert maps[k] == pytest.approx(value, abs=5e-5)
    targets = torch.tensor([q["target_img_id"] for q in val])
    recall = metrics.recall_at_k(ranked, targets, metrics.CIRCO_KS)
    for k, value in {5: 0.9091, 10: 0.9091, 25: 1.3636, 50: 3.6364}.items():
        assert recall[k] == pytest.approx(value, abs=5e-5)


# ------------------------------------------------------------------------- loader and outputs


@pytest.fixture(scope="module")
def circo_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIRCO annotations with a placeholder JPEG for every annotated image id."""
    from PIL import Image

    src = shared_data / "circo" / "annotations"
    if not (src / "val.json").is_file():
        pytest.skip(f"CIRCO annotations not found under {src}")
    root = tmp_path_factory.mktemp("circo")
    shutil.copytree(src, root / "annotations")
    images = root / "COCO2017_unlabeled" / "unlabeled2017"
    images.mkdir(parents=True)
    ids: set[int] = set()
    for split in ("val", "test"):
        for q in json.loads((src / f"{split}.json").read_text()):
            ids.add(q["reference_img_id"])
            ids.update(q.get("gt_img_ids", []))
    for i in sorted(ids):
        colour = (i * 37 % 256, i * 91 % 256, i * 13 % 256)
        Image.new("RGB", (16, 16), colour).save(images / f"{i:012d}.jpg", quality=95)
    return root


def test_loader_reads_val_and_test(circo_root: Path) -> None:
    from cir_cli.data import load_split

    (val,) = load_split("circo", circo_root, "val")
    assert len(val.triplets) == 220 and not val.remove_reference
    first = val.triplets[0]
    assert first.query_id == "0" and first.target == first.targets[0] == "355099"
    assert first.targets == ("355099", "528417", "534704")
    assert "cardinality" in first.tags
    assert first.reference in val.gallery_index  # the reference stays in the gallery
    (test,) = load_split("circo", circo_root, "test")
    assert len(test.triplets) == 800 and all(t.target is None for t in test.triplets)


def test_loader_rejects_images_missing_from_the_gallery(circo_root: Path, tmp_path: Path) -> None:
    from cir_cli.data import load_split

    shutil.copytree(circo_root / "annotations", tmp_path / "annotations")
    (tmp_path / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    with pytest.raises(CirError, match=r"not among the 0 gallery images.*000000271520\.jpg"):
        load_split("circo", tmp_path, "val")


def test_validate_and_submit_write_the_official_formats(
    circo_root: Path, shared_data: Path, tmp_path: Path
) -> None:
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_submission, run_validation

    recipe = load_recipe(
        "toy_lincir",
        [
            'backbone.pretrained=""',
            'data.dataset="circo"',
            f'data.root="{circo_root}"',
            f'output.dir="{tmp_path / "runs"}"',
            "data.num_workers=0",
            "eval.batch_size=256",
        ],
    )
    run = run_validation(recipe, save_rankings=True)
    for key in ("map_at5", "map_at10", "map_at25", "map_at50", "recall_at50",
                "map_at10_cardinality", "map_at10_viewpoint"):
        assert key in run.metrics
    rankings = json.loads((run.run_dir / "circo_rankings.json").read_text())
    assert list(rankings) == [str(i) for i in range(220)]
    assert all(len(v) == 50 == len(set(v)) and isinstance(v[0], int) for v in rankings.values())
    # The written rankings score to the reported mAP (what the official evaluator would say).
    val = json.loads((circo_root / "annotations" / "val.json").read_text())
    gts = torch.full((220, 23), -1, dtype=torch.long)
    for row, q in enumerate(val):
        gts[row, : len(q["gt_img_ids"])] = torch.tensor(q["gt_img_ids"])
    ranked = torch.tensor([rankings[str(i)] for i in range(220)])
    again = metrics.mean_average_precision_at_k(ranked, gts, (10,))
    assert again[10] == pytest.approx(run.metrics["map_at10"])

    (path,) = run_submission(recipe, "circo", name="tiny")
    sub = json.loads(path.read_text())
    example = json.loads(
        (shared_data / "circo" / "submission_examples" / "submission_test.json").read_text()
    )
    assert list(sub) == list(example) and len(sub) == 800
    assert all(len(v) == 50 == len(set(v)) for v in sub.values())
    assert {type(v[0]) for v in sub.values()} == {type(v[0]) for v in example.values()} == {int}
