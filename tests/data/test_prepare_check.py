"""`cir prepare` dataset check over placeholder roots built from the real annotation files.

Each image id gets one tiny PNG (CIRR) or JPEG (FashionIQ) file, hard-linked where the filesystem
allows (~35k files in well under a second). Damage tests replace links with new files, never
write through them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from PIL import Image

from cir_cli.data import load_split
from cir_cli.data.check import (
    INDEX_NAME,
    REPORT_COLUMNS,
    check_dataset,
    format_report,
    report_absent,
    report_problems,
)
from cir_cli.errors import CirError

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CIR_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared() -> Path:
    if not (SHARED / "cirr").is_dir() or not (SHARED / "fashioniq").is_dir():
        pytest.skip(
            f"real annotation files not found at {SHARED} (set CIR_SHARED_DATA to the folder "
            "holding cirr/ and fashioniq/)"
        )
    return SHARED


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _place_images(paths: Iterable[Path], source: Path) -> int:
    count = 0
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, path)
        except OSError:  # filesystems without hard links: write the bytes
            shutil.copyfile(source, path)
        count += 1
    return count


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny encoded image per format; every placeholder is a link to (or copy of) one."""
    folder = tmp_path_factory.mktemp("placeholders")
    out = {}
    for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
        out[ext] = folder / f"placeholder.{ext}"
        out[ext].write_bytes(_image_bytes(fmt))
    return out


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """CLIP4Cir layout: ROOT/cirr/{captions,image_splits}; images of val and test1 at ROOT/."""
    shared = _shared() / "cirr"
    root = tmp_path_factory.mktemp("cirr_dataset")
    for split in ("val", "test1"):
        _copy(
            shared / f"captions/cap.rc2.{split}.json", root / f"cirr/captions/cap.rc2.{split}.json"
        )
    # The train image list without its captions, as in the shared folder: train is "absent".
    for split in ("train", "val", "test1"):
        name = f"split.rc2.{split}.json"
        _copy(shared / "image_splits" / name, root / "cirr/image_splits" / name)
    for split in ("val", "test1"):
        (s,) = load_split("cirr", root, split)
        _place_images(s.image_paths.values(), sources["png"])
    return root


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """val and test annotations of every category (train left out: 45k more images)."""
    shared = _shared() / "fashioniq"
    root = tmp_path_factory.mktemp("fashionIQ_dataset")
    for cat in ("dress", "shirt", "toptee"):
        for split in ("val", "test"):
            for kind, prefix in (("captions", "cap"), ("image_splits", "split")):
                name = f"{prefix}.{cat}.{split}.json"
                _copy(shared / kind / name, root / kind / name)
    names = set()
    for split in ("val", "test"):
        for s in load_split("fashioniq", root, split):
            names.update(s.gallery)
    _place_images((root / "images" / f"{n}.jpg" for n in sorted(names)), sources["jpg"])
    return root


def _rows(report) -> dict[tuple[str, str], dict[str, str]]:
    return {(r[0], r[1]): dict(zip(REPORT_COLUMNS, r, strict=True)) for r in format_report(report)}


def test_cirr_full_root(cirr_root: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = check_dataset(
        "cirr", cirr_root, progress=lambda done, total: calls.append((done, total))
    )
    assert report.ok and report.missing_files == [] and report.unreadable_files == {}
    assert [(s.split, s.status) for s in report.splits] == [
        ("train", "absent"),
        ("val", "ok"),
        ("test1", "ok"),
    ]
    assert "cap.rc2.train.json" in report.splits[0].reason
    rows = _rows(report)
    assert rows[("val", "")]["queries"] == "4,181" and rows[("val", "")]["gallery"] == "2,297"
    assert rows[("test1", "")]["queries"] == "4,148" and rows[("test1", "")]["gallery"] == "2,315"
    assert rows[("train", "")]["status"] == "absent"
    assert calls[0] == (0, 2297 + 2315) and calls[-1] == (2297 + 2315, 2297 + 2315)

    assert report.index_path == cirr_root / INDEX_NAME
    index = json.loads(report.index_path.read_text())
    assert index["dataset"] == "cirr" and index["missing_images"] == 0 and index["created"]
    val = next(s for s in index["splits"] if s["split"] == "val")
    assert (val["queries"], val["gallery"], val["missing"], val["unreadable"]) == (4181, 2297, 0, 0)
    # An absent split is a note, not a problem (a zero-shot user downloads only val and test).
    assert report_problems(report) == []
    assert report_absent(report) == [f"train: absent ({report.splits[0].reason})"]


def test_prepare_exit_codes_for_absent_splits(cirr_root: Path) -> None:
    """exit 0 when every present split is whole; --require makes an absent split an error."""
    from typer.testing import CliRunner

    from cir_cli.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["prepare", "cirr", "--root", str(cirr_root), "--no-verify-images"])
    assert ok.exit_code == 0, ok.output
    assert "train: absent" in ok.output
    needed = runner.invoke(app, ["prepare", "cirr", "--root", str(cirr_root),
                                 "--no-verify-images", "--require", "val", "--require", "train"])
    assert needed.exit_code == 2
    assert needed.stderr.strip().splitlines() == [
        f"error: {cirr_root}: required split(s) absent: train (see the notes above)"
    ]
    present = runner.invoke(app, ["prepare", "cirr", "--root", str(cirr_root),
                                  "--no-verify-images", "--require", "val"])
    assert present.exit_code == 0, present.output
    wrong = runner.invoke(app, ["prepare", "cirr", "--root", str(cirr_root), "--require", "dev"])
    assert wrong.exit_code == 2 and "--require 'dev'" in wrong.stderr


def test_fashioniq_full_root(fiq_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.json"
    report = check_dataset("fashioniq", fiq_root, out=out)
    assert report.ok and report.index_path == out and out.is_file()
    assert not (fiq_root / INDEX_NAME).exists()
    rows = _rows(report)
    expected = {
        "dress": ("2,017", "3,817"),
        "shirt": ("2,038", "6,346"),
        "toptee": ("1,961", "5,373"),
    }
    for cat, (queries, gallery) in expected.items():
        assert rows[("train", cat)]["status"] == "absent"
        assert (rows[("val", cat)]["queries"], rows[("val", cat)]["gallery"]) == (queries, gallery)
        assert rows[("val", cat)]["missing"] == "0" and rows[("test", cat)]["status"] == "ok"
    assert [r[:2] for r in format_report(report)][:3] == [
        ("train", "dress"),
        ("train", "shirt"),
        ("train", "toptee"),
    ]
    # Category and split selection.
    report = check_dataset(
        "fashioniq",
        fiq_root,
        splits=["val"],
        categories=["shirt"],
        verify_images=False,
        write_index=False,
    )
    assert [(s.split, s.category, s.queries) for s in report.splits] == [("val", "shirt", 2038)]


def test_damaged_images_are_reported_exactly(cirr_root: Path, fiq_root: Path) -> None:
    (val,) = load_split("cirr", cirr_root, "val")
    (test1,) = load_split("cirr", cirr_root, "test1")
    deleted, garbage = val.gallery[3], val.gallery[10]
    empty = test1.gallery[0]
    saved = {n: p.read_bytes() for n, p in val.image_paths.items() if n in (deleted, garbage)}
    saved[empty] = test1.image_paths[empty].read_bytes()
    try:
        val.image_paths[deleted].unlink()
        # unlink before writing: the placeholders are hard links to one shared file.
        val.image_paths[garbage].unlink()
        val.image_paths[garbage].write_bytes(b"\x89PNG garbage, not an image")
        test1.image_paths[empty].unlink()
        test1.image_paths[empty].write_bytes(b"")

        report = check_dataset("cirr", cirr_root, write_index=False)
        by_split = {s.split: s for s in report.splits}
        assert by_split["val"].missing == [deleted] and by_split["val"].unreadable == [garbage]
        assert by_split["test1"].missing == [] and by_split["test1"].unreadable == [empty]
        assert report.missing_files == [val.image_paths[deleted]]
        assert set(report.unreadable_files) == {val.image_paths[garbage], test1.image_paths[empty]}
        assert report.unreadable_files[test1.image_paths[empty]] == "empty file"
        assert not report.ok
        rows = _rows(report)
        assert (rows[("val", "")]["missing"], rows[("val", "")]["unreadable"]) == ("1", "1")
        assert rows[("val", "")]["status"] == "problems"
        problems = report_problems(report)
        assert f"val: 1 missing image(s): {deleted}" in problems
        assert f"val: 1 unreadable image(s): {garbage}" in problems

        # Without PIL verification only existence and emptiness are checked.
        quick = check_dataset("cirr", cirr_root, verify_images=False, write_index=False)
        assert {s.split: (s.missing, s.unreadable) for s in quick.splits if s.status == "ok"} == {
            "val": ([deleted], []),
            "test1": ([], [empty]),
        }
    finally:
        for split in (val, test1):
            for name, data in saved.items():
                if name in split.image_paths:
                    split.image_paths[name].unlink(missing_ok=True)
                    split.image_paths[name].write_bytes(data)
    assert check_dataset("cirr", cirr_root, verify_images=False, write_index=False).ok

    # A FashionIQ image shared by several splits/categories is one missing file, every row.
    fiq_val = load_split("fashioniq", fiq_root, "val")
    name = fiq_val[0].gallery[0]
    path = fiq_val[0].image_paths[name]
    path.unlink()
    try:
        report = check_dataset("fashioniq", fiq_root, verify_images=False, write_index=False)
        holders = [(s.split, s.category) for s in report.splits if s.missing]
        assert ("val", "dress") in holders and all(
            s.missing == [name] for s in report.splits if s.missing
        )
        # The loader maps a name without a file to its `.jpg` path, the one reported.
        assert report.missing_files == [path] and path.name == f"{name}.jpg"
    finally:
        _place_images([path], fiq_val[0].image_paths[fiq_val[0].gallery[1]])


def _small_cirr(root: Path, captions: str) -> Path:
    (root / "cirr/captions").mkdir(parents=True)
    (root / "cirr/image_splits").mkdir(parents=True)
    (root / "cirr/image_splits/split.rc2.val.json").write_text('{"a": "./dev/a.png"}')
    (root / "cirr/captions/cap.rc2.val.json").write_text(captions)
    return root


def test_check_errors(tmp_path: Path) -> None:
    with pytest.raises(CirError, match=r"cap\.rc2\.val\.json: not valid JSON"):
        check_dataset("cirr", _small_cirr(tmp_path / "bad", "[{"), write_index=False)
    record = '[{"pairid": 1, "caption": "x", "img_set": {"members": []}, "target_hard": "a"}]'
    with pytest.raises(
        CirError, match=r"cap\.rc2\.val\.json entry 0: .*missing required key 'reference'"
    ):
        check_dataset("cirr", _small_cirr(tmp_path / "key", record), write_index=False)
    with pytest.raises(CirError, match=r"cirr root .*nowhere does not exist"):
        check_dataset("cirr", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CirError, match=r"no fashioniq annotations found under .*empty"):
        check_dataset("fashioniq", tmp_path / "empty")
    with pytest.raises(CirError, match="unknown cirr split 'test'"):
        check_dataset("cirr", tmp_path / "empty", splits=["test"])
    with pytest.raises(CirError, match="unknown dataset 'foo'"):
        check_dataset("foo", tmp_path)


def test_index_write_failure_is_a_cir_error(tmp_path: Path) -> None:
    root = _small_cirr(
        tmp_path / "r",
        '[{"pairid": 1, "reference": "a", "target_hard": "a", "caption": "x",'
        ' "img_set": {"members": ["a", "a", "a", "a", "a", "a"]}}]',
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CirError, match=r"cannot write .*index.json: .*file is a file, not a fo"):
        check_dataset("cirr", root, out=blocker / "index.json")
    report = check_dataset("cirr", root)
    assert report.splits[1].missing == ["a"] and report.splits[1].images == 1
