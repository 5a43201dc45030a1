"""The toy dataset: real CIRR / FashionIQ layouts, determinism, and targets that follow the text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cir_cli.data.toy import (
    ALL_COMBOS,
    COLOURS,
    SHAPES,
    SIZES,
    ToyAttrs,
    all_edits,
    generate_toy,
    load_toy_meta,
)
from cir_cli.errors import CirError

# Small counts keep every generation to about a second (one noisy copy per combination).
SMALL = {"n_train_triplets": 60, "n_val_queries": 40, "n_test_queries": 30}
CIRR_FOLDER = {"train": "train", "val": "dev", "test1": "test1"}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_cirr")
    calls: list[tuple[int, int]] = []
    summary = generate_toy(
        root, "cirr", seed=0, progress=lambda d, t: calls.append((d, t)), **SMALL
    )
    assert calls and calls[-1][0] == calls[-1][1] == 648 * 3  # progress reaches the total
    assert summary["splits"] == {
        "train": {"queries": 60, "images": 648},
        "val": {"queries": 40, "images": 648},
        "test1": {"queries": 30, "images": 648},
    }
    return root


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_fiq")
    summary = generate_toy(root, "fashioniq", seed=3, size=32, **SMALL)
    assert summary["splits"]["val"]["queries"] == 40
    assert summary["splits"]["val"]["categories"]["circle"] == {"queries": 10, "images": 162}
    return root


def test_cirr_layout(cirr_root: Path) -> None:
    assert "seed=0" in (cirr_root / "README.txt").read_text()
    pairids: list[int] = []
    all_names: set[str] = set()
    for split, n in (("train", 60), ("val", 40), ("test1", 30)):
        caps = _load(cirr_root / "cirr" / "captions" / f"cap.rc2.{split}.json")
        names = _load(cirr_root / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        assert isinstance(names, dict) and len(caps) == n
        assert not all_names & set(names)  # every split has its own images
        all_names |= set(names)
        for name, rel in names.items():
            assert rel.startswith(f"./{CIRR_FOLDER[split]}/") and rel.endswith(f"/{name}.png")
            assert (cirr_root / rel).is_file()
        assert len(list((cirr_root / CIRR_FOLDER[split]).rglob("*.png"))) == len(names)
        for rec in caps:
            keys = {"pairid", "reference", "caption", "img_set"}
            if split != "test1":
                keys |= {"target_hard", "target_soft"}
            assert set(rec) == keys
            assert isinstance(rec["pairid"], int) and isinstance(rec["caption"], str)
            members = rec["img_set"]["members"]
            assert len(members) == 6 == len(set(members))
            assert all(m in names for m in members)
            assert rec["reference"] in members and rec["reference"] in names
            assert members[rec["img_set"]["reference_rank"]] == rec["reference"]
            if split == "test1":
                assert "target_rank" not in rec["img_set"]
            else:
                target = rec["target_hard"]
                assert target in names and target in members and target != rec["reference"]
                assert rec["target_soft"] == {target: 1.0}
                assert members[rec["img_set"]["target_rank"]] == target
            pairids.append(rec["pairid"])
    assert len(pairids) == len(set(pairids))
    with Image.open(next((cirr_root / "dev").glob("*.png"))) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_fashioniq_layout(fiq_root: Path) -> None:
    names_seen: set[str] = set()
    for split, n in (("train", 60), ("val", 40), ("test", 30)):
        total = 0
        for cat in SHAPES:
            caps = _load(fiq_root / "captions" / f"cap.{cat}.{split}.json")
            names = _load(fiq_root / "image_splits" / f"split.{cat}.{split}.json")
            assert isinstance(names, list) and len(names) == len(set(names))
            assert not names_seen & set(names)
            names_seen |= set(names)
            assert all((fiq_root / "images" / f"{nm}.png").is_file() for nm in names)
            total += len(caps)
            for rec in caps:
                assert set(rec) == (
                    {"candidate", "captions"}
                    if split == "test"
                    else {"candidate", "target", "captions"}
                )
                assert rec["candidate"] in names
                assert len(rec["captions"]) == 2 and rec["captions"][0] != rec["captions"][1]
                if split != "test":
                    assert rec["target"] in names and rec["target"] != rec["candidate"]
        assert total == n
    meta = load_toy_meta(fiq_root)
    # Each category's gallery holds only its shape, and edits keep it.
    for cat in SHAPES:
        names = _load(fiq_root / "image_splits" / f"split.{cat}.val.json")
        assert {meta["images"][nm]["shape"] for nm in names} == {cat}
    with Image.open(next((fiq_root / "images").glob("*.png"))) as img:
        assert img.size == (32, 32)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every annotation file plus a sample of images, as bytes."""
    files = sorted(p for p in root.rglob("*.json")) + sorted(root.rglob("*.png"))[::97]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_deterministic(cirr_root: Path, tmp_path: Path) -> None:
    generate_toy(tmp_path / "same", "cirr", seed=0, **SMALL)
    generate_toy(tmp_path / "other", "cirr", seed=1, **SMALL)
    first, same = _snapshot(cirr_root), _snapshot(tmp_path / "same")
    assert first == same and len(first) > 20
    other = _snapshot(tmp_path / "other")
    assert first.keys() == other.keys()
    assert first["cirr/captions/cap.rc2.val.json"] != other["cirr/captions/cap.rc2.val.json"]
    assert sum(first[k] != other[k] for k in first if k.endswith(".png")) > 10


def _apply(attrs: dict, ops: list) -> dict:
    """Re-apply a recorded edit, written independently of the generator's own code."""
    out = dict(attrs)
    names = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}
    for op in ops:
        kind, attr = op[0], op[1]
        if attr in names:  # meta stores these as words, ops as indices
            index = names[attr].index(out[attr])
            if kind == "set":
                index = op[2]
            elif kind == "add":
                index += op[2]
            out[attr] = names[attr][index]
        elif kind == "set":
            out[attr] = op[2]
        elif kind == "add":
            out[attr] += op[2]
        else:
            assert kind == "mirror"
            out[attr] = 2 - out[attr]
    return out


@pytest.mark.parametrize("fixture", ["cirr_root", "fiq_root"])
def test_targets_follow_the_edit(fixture: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(fixture)
    meta = load_toy_meta(root)
    images = meta["images"]
    n = 0
    for queries in meta["queries"].values():
        for q in queries:
            ref, tgt = images[q["reference"]], images[q["target"]]
            assert _apply(ref, q["ops"]) == tgt != ref
            for op in q["ops"]:
                if op[0] == "set" and op[1] in ("colour", "shape"):
                    # An absolute colour/shape edit names the new value in every phrasing.
                    word = (COLOURS if op[1] == "colour" else SHAPES)[op[2]]
                    assert all(word in c for c in q["captions"])
            n += 1
    assert n == 130


@pytest.mark.parametrize("fmt", ["cirr", "fashioniq"])
def test_text_determines_target(fmt: str) -> None:
    """Over every reference and every possible text, reference + text fixes the target."""
    seen: dict[tuple[ToyAttrs, str], ToyAttrs] = {}
    texts: set[str] = set()
    for ref in ALL_COMBOS:
        for _kind, text, target in all_edits(ref, fmt):
            assert target != ref
            assert seen.setdefault((ref, text), target) == target, (ref, text)
            if fmt == "fashioniq":
                assert target.shape == ref.shape
            texts.add(text)
    assert len(texts) > (1500 if fmt == "cirr" else 1000)


def test_val_gallery_has_each_combination_once(cirr_root: Path) -> None:
    meta = load_toy_meta(cirr_root)
    names = _load(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json")
    combos = {tuple(meta["images"][n].values()) for n in names}
    assert len(combos) == len(names) == len(ALL_COMBOS)


def test_rendered_colour_and_position(cirr_root: Path) -> None:
    """The drawn shape has the recorded colour and sits in the recorded grid cell."""
    from cir_cli.data.toy import _RGB

    meta = load_toy_meta(cirr_root)
    names = _load(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json")
    for name in list(names)[:60]:
        attrs = meta["images"][name]
        want = _RGB[attrs["colour"]]
        with Image.open(cirr_root / names[name]) as img:
            pixels = img.load()
            hits = [
                (x, y)
                for y in range(64)
                for x in range(64)
                if sum(abs(a - b) for a, b in zip(pixels[x, y], want, strict=True)) < 60
            ]
        assert len(hits) > 10, name
        cx = sum(x for x, _ in hits) / len(hits)
        cy = sum(y for _, y in hits) / len(hits)
        assert int(cx // (64 / 3)) == attrs["col"] and int(cy // (64 / 3)) == attrs["row"], name


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CirError, match="format"):
        generate_toy(tmp_path, "coco")
    with pytest.raises(CirError, match=">= 0"):
        generate_toy(tmp_path, "cirr", n_val_queries=-1)
