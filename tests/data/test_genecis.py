"""GeneCIS (spec lincir_searle_circo.md 3.4): published JSON layout, per-query candidates, R@1/2/3.

A placeholder dataset of solid grey images and a stub method whose image representation is the
mean pixel and whose score is minus the distance make every rank hand-checkable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cir_cli.data import load_split
from cir_cli.data.genecis import crop_box
from cir_cli.errors import CirError
from cir_cli.evaluation import evaluate
from cir_cli.methods.base import CIRMethod


class GreyMethod(CIRMethod):
    """Query = the reference's mean pixel (text ignored); score = -|query - candidate|."""

    name = "grey"

    def __init__(self) -> None:
        from cir_cli.config import Recipe

        super().__init__(Recipe.model_validate({"data": {"transform": "squarepad"}}))
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def image_size(self) -> int:
        return 16

    def image_cache_key(self) -> str | None:
        return None

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(1, 2, 3))[:, None]

    def queries_from_representation(self, reference, texts):
        assert all(isinstance(t, str) and t for t in texts)  # the real condition, never "0"
        return reference

    def targets_from_representation(self, representation):
        return representation

    def score(self, queries, targets):
        return -torch.cdist(queries, targets)


def _grey(path: Path, value: int, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")


def _coco(i: int) -> dict:
    return {"val_image_id": i}


@pytest.fixture()
def genecis_root(tmp_path: Path) -> Path:
    # Grey level of image id i is 10 * i (ids 1..20).
    for i in range(1, 21):
        _grey(tmp_path / "val2017" / f"{i:012d}.jpg", 10 * i)  # PNG bytes, .jpg name: fine
    samples = [
        # reference 10 (grey 100): target 10-level match -> rank 1
        {"reference": _coco(10), "target": _coco(10), "condition": "dog",
         "gallery": [_coco(1), _coco(2), _coco(20)]},
        # target 12 (d=20) behind gallery 11 (d=10) -> rank 2
        {"reference": _coco(10), "target": _coco(12), "condition": "brick wall",
         "gallery": [_coco(11), _coco(1), _coco(2)]},
        # target 15 (d=50) behind 11, 12, 13 -> rank 4
        {"reference": _coco(10), "target": _coco(15), "condition": "tree",
         "gallery": [_coco(11), _coco(12), _coco(13), _coco(1)]},
    ]
    (tmp_path / "focus_object.json").write_text(json.dumps(samples, indent=4))
    # Attribute split: Visual Genome crops of square boxes (no padding needed).
    for i in (1, 2, 3):
        _grey(tmp_path / "VG_100K_all" / f"{i}.jpg", 60 * i, size=(100, 60))
    attr = [
        {"reference": {"image_id": 1, "instance_bbox": [10, 10, 20, 20]},
         "target": {"image_id": 1, "instance_bbox": [40, 20, 10, 10]},
         "gallery": [{"image_id": 2, "instance_bbox": [0, 0, 10, 10]},
                     {"image_id": 3, "instance_bbox": [50, 30, 40, 20]}],
         "condition": "color"},
    ]
    (tmp_path / "genecis").mkdir()
    (tmp_path / "genecis" / "change_attribute.json").write_text(json.dumps(attr))
    return tmp_path


def test_dilated_crop_box_matches_the_spec() -> None:
    # left = max(0, x - .7w), top = max(0, y - .7h), right = min(W, left + 1.7w), ...
    assert crop_box([10, 10, 20, 20], 100, 60) == (0.0, 0.0, 34.0, 34.0)
    assert crop_box([50, 30, 40, 20], 100, 60) == pytest.approx((22.0, 16.0, 90.0, 50.0))
    assert crop_box([90, 50, 10, 10], 100, 60) == pytest.approx((83.0, 43.0, 100.0, 60.0))


def test_object_split_recalls_are_hand_checkable(genecis_root: Path) -> None:
    (split,) = load_split("genecis", genecis_root, "val", ["focus_object"])
    assert [len(t.group) for t in split.triplets] == [4, 4, 5]  # [target] + gallery
    assert split.triplets[1].captions == ("brick wall",)
    result = evaluate(GreyMethod(), [split])
    assert result.splits[0].subset_recall == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 200 / 3})
    assert result.metrics["focus_object_recall_at1"] == pytest.approx(100 / 3)
    assert result.metrics["average_recall_at1"] == pytest.approx(100 / 3)
    # ranked candidates of query 3: 11, 12, 13, then the target 15
    assert result.splits[0].subset_top[2][:4] == ["coco11", "coco12", "coco13", "coco15"]


def test_attribute_split_writes_padded_square_crops(genecis_root: Path) -> None:
    (split,) = load_split("genecis", genecis_root, "test", ["change_attribute"])
    result = evaluate(GreyMethod(), [split])
    crop = split.image_paths[split.triplets[0].target]
    assert crop.is_file() and crop.parent.parent == genecis_root / "cir_crops"
    with Image.open(split.image_paths["vg3_50_30_40_20"]) as im:
        # crop (22, 16, 90, 50) is 68 x 34 -> padded to a 68 x 68 black-bordered square
        assert im.size == (68, 68)
        assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((34, 34)) == (180, 180, 180)
    # target = reference's image (same grey) -> rank 1
    assert result.metrics["change_attribute_recall_at1"] == 100.0


def test_missing_template_or_image_is_one_line_error(genecis_root: Path) -> None:
    with pytest.raises(CirError, match="focus_attribute.json not found"):
        load_split("genecis", genecis_root, "val", ["focus_attribute"])
    (genecis_root / "val2017" / f"{15:012d}.jpg").unlink()
    (split,) = load_split("genecis", genecis_root, "val", ["focus_object"])
    with pytest.raises(CirError, match="1 image\\(s\\) missing"):
        evaluate(GreyMethod(), [split])
