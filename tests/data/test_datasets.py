"""Dataset loaders: exact counts on the real annotations, layouts, and malformed-file errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cir_cli.data import DATASETS, get_dataset, load_split, load_train_split
from cir_cli.data.fashioniq import scan_images
from cir_cli.errors import CirError

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CIR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def shared() -> Path:
    if not (SHARED / "cirr").is_dir() or not (SHARED / "fashioniq").is_dir():
        pytest.skip(
            f"real annotation files not found at {SHARED} (set CIR_SHARED_DATA to the folder "
            "holding cirr/ and fashioniq/)"
        )
    return SHARED


# --- CIRR on the real annotations (the official repository layout: ROOT/captions) ---------


@pytest.mark.parametrize(
    ("split", "queries", "gallery"), [("val", 4181, 2297), ("test1", 4148, 2315)]
)
def test_cirr_counts(shared: Path, split: str, queries: int, gallery: int) -> None:
    (s,) = load_split("cirr", shared / "cirr", split)
    assert (len(s.triplets), len(s.gallery)) == (queries, gallery)
    assert s.remove_reference and s.has_groups and s.caption_policy == "verbatim"
    assert s.subset == "" and s.label == f"cirr/{split}"
    # Spec 1.2: every reference (and member) is in the split's gallery.
    assert all(t.reference in s.gallery_index for t in s.triplets)
    assert all(len(t.group) == 6 and set(t.group) <= s.gallery_index.keys() for t in s.triplets)
    assert all(t.reference in t.group for t in s.triplets)
    assert len({t.query_id for t in s.triplets}) == queries
    assert s.image_names() == s.gallery


def test_cirr_val_fields(shared: Path) -> None:
    (s,) = load_split("cirr", shared / "cirr", "val")
    first = s.triplets[0]
    raw = json.loads((shared / "cirr/captions/cap.rc2.val.json").read_text())[0]
    assert first.query_id == str(raw["pairid"])
    assert first.target == raw["target_hard"] and first.captions == (raw["caption"],)
    assert first.group == tuple(raw["img_set"]["members"])
    assert all(t.target in t.group for t in s.triplets)
    # Gallery order is the split JSON's key order (the ranking tie-breaker).
    split_json = json.loads((shared / "cirr/image_splits/split.rc2.val.json").read_text())
    assert s.gallery == list(split_json)
    # No images in the shared folder and annotations at its top level: the CIRR repository
    # layout, whose images live in img_raw/.
    assert s.image_paths["dev-244-0-img0"] == shared / "cirr/img_raw/dev/dev-244-0-img0.png"


def test_cirr_test1_has_no_targets(shared: Path) -> None:
    (s,) = load_split("cirr", shared / "cirr", "test1")
    assert all(t.target is None for t in s.triplets)


def test_cirr_train_captions_absent_is_a_clear_error(shared: Path) -> None:
    with pytest.raises(CirError, match=r"cap\.rc2\.train\.json not found"):
        load_split("cirr", shared / "cirr", "train")


# --- FashionIQ on the real annotations -------------------------------------------------------

FIQ_VAL = {"dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)}


def test_fashioniq_val_counts(shared: Path) -> None:
    splits = load_split("fashioniq", shared / "fashioniq", "val")
    assert [s.subset for s in splits] == ["dress", "shirt", "toptee"]
    for s in splits:
        assert (len(s.triplets), len(s.gallery)) == FIQ_VAL[s.subset]
        assert not s.remove_reference and not s.has_groups and s.caption_policy == "fiq_eval"
        assert all(
            t.reference in s.gallery_index and t.target in s.gallery_index for t in s.triplets
        )
        assert all(len(t.captions) == 2 and t.group == () for t in s.triplets)
        assert s.triplets[5].query_id == f"{s.subset}-5"
        # No images folder: every name maps to the `.jpg` path the missing check reports.
        name = s.gallery[0]
        assert s.image_paths[name] == shared / "fashioniq/images" / f"{name}.jpg"


def test_fashioniq_categories_and_test_split(shared: Path) -> None:
    splits = load_split("fashioniq", shared / "fashioniq", "test", categories=["toptee", "dress"])
    assert [s.subset for s in splits] == ["toptee", "dress"]
    assert [len(s.triplets) for s in splits] == [2056, 2024]
    assert all(t.target is None for s in splits for t in s.triplets)
    with pytest.raises(CirError, match=r"split.skirt.val.json not found"):
        load_split("fashioniq", shared / "fashioniq", "val", categories=["skirt"])
    with pytest.raises(CirError, match="not a plain name"):
        load_split("fashioniq", shared / "fashioniq", "val", categories=["../dress"])


def test_fashioniq_train_merges_categories(shared: Path) -> None:
    train = load_train_split("fashioniq", shared / "fashioniq")
    assert len(train.triplets) == 5985 + 5988 + 6027
    assert train.subset == "" and train.caption_policy == "fiq_random"
    assert len(train.gallery) == len(set(train.gallery)) == len(train.image_paths)
    assert all(
        t.reference in train.gallery_index and t.target in train.gallery_index
        for t in train.triplets
    )
    only = load_train_split("fashioniq", shared / "fashioniq", categories=["shirt"])
    assert len(only.triplets) == 5988 and len(only.gallery) == 19036


# --- layouts and registry (synthetic, no shared data needed) ---------------------------------


def _write(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


NAMES = [f"dev-{i}-0-img0" for i in range(7)]


def _cirr_record(**change: object) -> dict:
    rec = {
        "pairid": 7,
        "reference": NAMES[0],
        "target_hard": NAMES[1],
        "caption": "make it red",
        "img_set": {"id": 1, "members": NAMES[:6]},
    }
    rec.update(change)
    return rec


def _cirr_root(root: Path, records: object = None, ann: str = "cirr") -> Path:
    """A tiny CIRR root, CLIP4Cir layout by default (ann="" for the CIRR repository layout)."""
    base = root / ann if ann else root
    _write(base / "image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in NAMES})
    _write(base / "captions/cap.rc2.val.json", [_cirr_record()] if records is None else records)
    return root


def test_cirr_layouts(tmp_path: Path) -> None:
    nested = _cirr_root(tmp_path / "a")
    (s,) = load_split("cirr", nested, "val")
    assert s.image_paths[NAMES[0]] == nested / "dev" / f"{NAMES[0]}.png"
    assert s.triplets[0].query_id == "7" and s.triplets[0].group == tuple(NAMES[:6])

    flat = _cirr_root(tmp_path / "b", ann="")
    (flat / "img_raw" / "dev").mkdir(parents=True)
    (s,) = load_split("cirr", flat, "val")
    assert s.image_paths[NAMES[0]] == flat / "img_raw" / "dev" / f"{NAMES[0]}.png"

    # Images next to the annotations win when that folder exists, whatever the layout.
    (nested / "img_raw" / "dev").mkdir(parents=True)
    (nested / "dev").mkdir()
    (s,) = load_split("cirr", nested, "val")
    assert s.image_paths[NAMES[0]] == nested / "dev" / f"{NAMES[0]}.png"


def test_fashioniq_image_extensions(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.jpeg", "b.jpg", "c.JPG", "notes.txt"):
        (images / name).write_bytes(b"x")
    found = scan_images(images)
    assert found == {"a": "a.png", "b": "b.jpg", "c": "c.JPG"}
    assert scan_images(tmp_path / "nowhere") == {}

    _write(tmp_path / "image_splits/split.dress.val.json", ["a", "b", "d"])
    _write(
        tmp_path / "captions/cap.dress.val.json",
        [{"candidate": "a", "target": "d", "captions": ["x", "y"]}],
    )
    (s,) = load_split("fashioniq", tmp_path, "val", categories=["dress"])
    assert s.image_paths == {"a": images / "a.png", "b": images / "b.jpg", "d": images / "d.jpg"}


def test_registry_errors(tmp_path: Path) -> None:
    assert set(DATASETS) == {"cirr", "fashioniq", "circo", "genecis"}
    with pytest.raises(CirError, match="unknown dataset 'coco'; expected one of cirr, fashioniq"):
        get_dataset("coco")
    with pytest.raises(CirError, match="unknown CIRR split 'test'"):
        load_split("cirr", _cirr_root(tmp_path), "test")
    with pytest.raises(CirError, match="CIRR has no categories"):
        load_split("cirr", tmp_path, "val", categories=["dress"])
    with pytest.raises(CirError, match="unknown FashionIQ split 'test1'"):
        load_split("fashioniq", tmp_path, "test1")


def test_missing_root_and_files(tmp_path: Path) -> None:
    for dataset in ("cirr", "fashioniq"):
        with pytest.raises(CirError, match=f"root {tmp_path / 'nope'} does not exist"):
            load_split(dataset, tmp_path / "nope", "val")
    with pytest.raises(CirError, match=r"no CIRR annotations under .*ROOT/cirr/\{captions"):
        load_split("cirr", tmp_path, "val")
    with pytest.raises(CirError, match=r"split\.dress\.val\.json not found; expected FashionIQ"):
        load_split("fashioniq", tmp_path, "val")


MEMBERS_5 = {"id": 1, "members": NAMES[:5]}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ("{not json", r"cap\.rc2\.val\.json: not valid JSON \(line 1"),
        ({"a": 1}, r"cap\.rc2\.val\.json: expected a list of query objects .* got a JSON object"),
        ([_cirr_record(), "x"], r"cap\.rc2\.val\.json entry 1: expected a JSON object"),
        (
            [{"pairid": 1}],
            r"cap\.rc2\.val\.json entry 0: entry is missing required key 'reference'",
        ),
        ([_cirr_record(img_set=MEMBERS_5)], r"entry 0: 'img_set.members' must be a list of 6 .* 5"),
        ([_cirr_record(reference="dev-x")], r"entry 0 'reference': image 'dev-x' is not listed in"),
        ([_cirr_record(caption=3)], r"entry 0 'caption': expected a caption string"),
        ([_cirr_record(pairid=None)], r"entry 0: 'pairid' must be an integer"),
    ],
)
def test_cirr_malformed(tmp_path: Path, records: object, message: str) -> None:
    root = _cirr_root(tmp_path, records)
    with pytest.raises(CirError, match=message):
        load_split("cirr", root, "val")


def test_cirr_malformed_split_file(tmp_path: Path) -> None:
    root = _cirr_root(tmp_path)
    _write(root / "cirr/image_splits/split.rc2.val.json", NAMES)
    with pytest.raises(CirError, match=r"split\.rc2\.val\.json: expected an object mapping"):
        load_split("cirr", root, "val")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"candidate": "a", "captions": ["x", "y"]}, r"missing required key 'target'"),
        ({"candidate": "a", "target": "b", "captions": ["x"]}, r"'captions' must be a list of 2"),
        ({"candidate": "zz", "target": "b", "captions": ["x", "y"]}, r"image 'zz' is not listed"),
    ],
)
def test_fashioniq_malformed(tmp_path: Path, record: dict, message: str) -> None:
    _write(tmp_path / "image_splits/split.shirt.val.json", ["a", "b"])
    _write(tmp_path / "captions/cap.shirt.val.json", [record])
    with pytest.raises(CirError, match=r"cap\.shirt\.val\.json entry 0.*" + message):
        load_split("fashioniq", tmp_path, "val", categories=["shirt"])


def test_real_files_copied_into_clip4cir_layout(shared: Path, tmp_path: Path) -> None:
    root = tmp_path / "cirr_dataset"
    shutil.copytree(shared / "cirr" / "captions", root / "cirr" / "captions")
    shutil.copytree(shared / "cirr" / "image_splits", root / "cirr" / "image_splits")
    (s,) = load_split("cirr", root, "val")
    assert len(s.triplets) == 4181
    assert s.image_paths["dev-244-0-img0"] == root / "dev" / "dev-244-0-img0.png"


def test_import_is_cheap() -> None:
    code = (
        "import sys, cir_cli.data, cir_cli.data.cirr, cir_cli.data.fashioniq, cir_cli.data.check;"
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_fashioniq_duplicate_gallery_name(tmp_path: Path) -> None:
    _write(tmp_path / "image_splits/split.dress.val.json", ["a", "b", "a"])
    _write(tmp_path / "captions/cap.dress.val.json", [])
    with pytest.raises(CirError, match=r"split\.dress\.val\.json: image 'a' is listed more than"):
        load_split("fashioniq", tmp_path, "val", categories=["dress"])
