"""CIRR / CIRCO submission files: the official examples, built files and every rule violation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from cir_cli import submission as sub
from cir_cli.data.base import CIRSplit, Triplet
from cir_cli.errors import CirError
from cir_cli.submission import (
    build_cirr_submission,
    load_submission,
    validate_circo_submission,
    validate_cirr_submission,
    write_circo_submission,
    write_cirr_submission,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CIRR = SHARED_DATA / "cirr"
CIRCO = SHARED_DATA / "circo"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set CIR_SHARED_DATA to its folder)")
    return path


def _split_from(captions: list[dict], gallery: list[str]) -> CIRSplit:
    triplets = [
        Triplet(
            query_id=str(c["pairid"]),
            reference=c["reference"],
            target=None,
            captions=(c["caption"],),
            group=tuple(c["img_set"]["members"]),
        )
        for c in captions
    ]
    return CIRSplit(
        dataset="cirr",
        split="test1",
        triplets=triplets,
        gallery=gallery,
        image_paths={name: Path("/nonexistent") for name in gallery},
        remove_reference=True,
        has_groups=True,
    )


def _fake_rankings(split: CIRSplit) -> tuple[dict, dict]:
    """Deterministic rankings: gallery order / group order with the reference removed."""
    top50 = {
        t.query_id: [g for g in split.gallery if g != t.reference][:50] for t in split.triplets
    }
    top3 = {t.query_id: [m for m in t.group if m != t.reference][:3] for t in split.triplets}
    return top50, top3


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cirr_test1() -> CIRSplit:
    captions = json.loads(_need(CIRR / "captions" / "cap.rc2.test1.json").read_text())
    images = json.loads(_need(CIRR / "image_splits" / "split.rc2.test1.json").read_text())
    return _split_from(captions, list(images))


@pytest.fixture(scope="module")
def cirr_examples() -> tuple[dict, dict]:
    folder = _need(CIRR / "submission_examples")
    return (
        load_submission(folder / "test1_pred_ranks_recall.json"),
        load_submission(folder / "test1_pred_ranks_recall_subset.json"),
    )


@pytest.fixture()
def small() -> CIRSplit:
    """A data-free split: 60 gallery images, 4 queries whose groups are 6 gallery images."""
    gallery = [f"img{i}" for i in range(60)]
    captions = [
        {
            "pairid": 100 + q,
            "reference": gallery[6 * q],
            "caption": f"caption {q}",
            "img_set": {"members": gallery[6 * q : 6 * q + 6]},
        }
        for q in range(4)
    ]
    return _split_from(captions, gallery)


@pytest.fixture()
def small_sub(small: CIRSplit) -> tuple[dict, dict]:
    return build_cirr_submission(small, *_fake_rankings(small))


# ------------------------------------------------------------------------ official CIRR data


def test_official_cirr_examples_pass(cirr_test1: CIRSplit, cirr_examples: tuple[dict, dict]):
    recall, subset = cirr_examples
    assert len(cirr_test1.triplets) == 4148 and len(cirr_test1.gallery) == 2315
    validate_cirr_submission(cirr_test1, recall, subset)


def test_built_submission_matches_official_structure(
    cirr_test1: CIRSplit, cirr_examples: tuple[dict, dict], tmp_path: Path
):
    recall, subset = build_cirr_submission(cirr_test1, *_fake_rankings(cirr_test1))
    for built, official in zip((recall, subset), cirr_examples, strict=True):
        assert len(built) == 4148 + 2
        assert set(built) == set(official)
        assert list(built)[:3] == list(official)[:3]  # version, metric, first pairid
        assert built["version"] == official["version"] == "rc2"
        assert built["metric"] == official["metric"]
        assert {k: len(v) for k, v in built.items() if k not in sub._META_KEYS} == {
            k: len(v) for k, v in official.items() if k not in sub._META_KEYS
        }
    validate_cirr_submission(cirr_test1, recall, subset)

    out = tmp_path / "sub"
    paths = write_cirr_submission(out, "fake", recall, subset, cirr_test1)
    assert [p.name for p in paths] == [
        "recall_submission_fake.json",
        "recall_subset_submission_fake.json",
    ]
    # No temporaries left beside the two files.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert load_submission(paths[0]) == recall
    assert load_submission(paths[1]) == subset
    assert paths[0].stat().st_size < sub.MAX_SUBMISSION_BYTES


# --------------------------------------------------------------------------- CIRR rule checks


def test_small_roundtrip(small: CIRSplit, small_sub: tuple[dict, dict], tmp_path: Path):
    recall, subset = small_sub
    r_path, s_path = write_cirr_submission(tmp_path, "x", recall, subset, small)
    assert load_submission(r_path) == recall and load_submission(s_path) == subset
    assert len(list(tmp_path.iterdir())) == 2


def _edit(which: int, fn):
    def apply(pair: tuple[dict, dict]) -> tuple[dict, dict]:
        pair = copy.deepcopy(pair)
        fn(pair[which])
        return pair

    return apply


VIOLATIONS = {
    "missing key": (_edit(0, lambda d: d.pop("101")), r"missing, e\.g\. '101'"),
    "extra key": (_edit(1, lambda d: d.update({"999": ["img1"]})), r"unexpected key.*'999'"),
    "49 names": (_edit(0, lambda d: d["100"].pop()), r"'100' has 49 names; expected exactly 50"),
    "duplicate name": (
        _edit(0, lambda d: d["100"].__setitem__(1, d["100"][0])),
        r"'100' lists 'img1' twice",
    ),
    "reference in recall": (
        _edit(0, lambda d: d["101"].__setitem__(0, "img6")),
        r"'101' contains its reference image 'img6'",
    ),
    "reference in subset": (
        _edit(1, lambda d: d["101"].__setitem__(2, "img6")),
        r"'101' contains its reference image 'img6'",
    ),
    "name outside gallery": (
        _edit(0, lambda d: d["102"].__setitem__(5, "nope")),
        r"'102' lists 'nope', not in the test gallery",
    ),
    "subset name outside group": (
        _edit(1, lambda d: d["100"].__setitem__(0, "img40")),
        r"recall_subset.*'100' lists 'img40', not in the query's image group",
    ),
    "subset 2 names": (
        _edit(1, lambda d: d["103"].pop()),
        r"'103' has 2 names; expected exactly 3",
    ),
    "wrong metric": (
        _edit(1, lambda d: d.__setitem__("metric", "recall")),
        r"'metric' is 'recall'; expected 'recall_subset'",
    ),
    "missing version": (_edit(0, lambda d: d.pop("version")), r"missing the 'version' entry"),
    "wrong version": (
        _edit(0, lambda d: d.__setitem__("version", "rc1")),
        r"'version' is 'rc1'; expected 'rc2'",
    ),
    "not a list": (_edit(0, lambda d: d.__setitem__("100", "img1")), r"'100' is a str"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_cirr_violation_raises_and_writes_nothing(
    case: str, small: CIRSplit, small_sub: tuple[dict, dict], tmp_path: Path
):
    edit, pattern = VIOLATIONS[case]
    recall, subset = edit(small_sub)
    with pytest.raises(CirError, match=pattern) as info:
        validate_cirr_submission(small, recall, subset)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    with pytest.raises(CirError, match=pattern):
        write_cirr_submission(out, "bad", recall, subset, small)
    assert not out.exists() or not any(out.iterdir())


def test_missing_and_extra_keys_reported_together(small: CIRSplit, small_sub: tuple[dict, dict]):
    recall, subset = copy.deepcopy(small_sub)
    for k in ("100", "101", "102"):
        recall[f"9{k}"] = recall.pop(k)
    with pytest.raises(CirError, match=r"3 query id\(s\) missing.*3 unexpected key\(s\)"):
        validate_cirr_submission(small, recall, subset)


def test_oversized_file_rejected(tmp_path: Path):
    # Names long enough that 50 per query push the recall file over 5 MB.
    gallery = [f"{'x' * 200}-{i}" for i in range(60)]
    captions = [
        {
            "pairid": q,
            "reference": gallery[q % 10],
            "caption": "c",
            "img_set": {"members": gallery[q % 10 : q % 10 + 6]},
        }
        for q in range(520)
    ]
    split = _split_from(captions, gallery)
    recall, subset = build_cirr_submission(split, *_fake_rankings(split))
    with pytest.raises(CirError, match=r"recall submission: serialised size is .*\(5 MB\)"):
        write_cirr_submission(tmp_path, "big", recall, subset, split)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b"])
def test_bad_submission_name(name: str, small: CIRSplit, small_sub: tuple[dict, dict], tmp_path):
    with pytest.raises(CirError, match="submission name"):
        write_cirr_submission(tmp_path, name, *small_sub, small)
    assert not any(tmp_path.iterdir())


def test_failed_second_write_leaves_no_file(
    small: CIRSplit, small_sub: tuple[dict, dict], tmp_path: Path, monkeypatch
):
    calls = []

    def flaky(path: Path, text: str) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        path.write_text(text)

    monkeypatch.setattr(sub, "_write_text", flaky)
    with pytest.raises(OSError):
        write_cirr_submission(tmp_path, "x", *small_sub, small)
    assert not any(tmp_path.iterdir())


def test_build_requires_every_query(small: CIRSplit):
    top50, top3 = _fake_rankings(small)
    del top3["102"]
    with pytest.raises(CirError, match=r"top-3 subset ranking has no entry for query '102'"):
        build_cirr_submission(small, top50, top3)


def test_build_truncates_longer_rankings(small: CIRSplit):
    top50 = {t.query_id: [g for g in small.gallery if g != t.reference] for t in small.triplets}
    top3 = {t.query_id: [m for m in t.group if m != t.reference] for t in small.triplets}
    recall, subset = build_cirr_submission(small, top50, top3)
    assert {len(v) for k, v in recall.items() if k not in sub._META_KEYS} == {50}
    assert {len(v) for k, v in subset.items() if k not in sub._META_KEYS} == {3}
    validate_cirr_submission(small, recall, subset)


# ----------------------------------------------------------------------------------- loading


def test_load_malformed_json_names_file(tmp_path: Path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"version": "rc2", ')
    with pytest.raises(CirError, match=r"broken\.json: not valid JSON \(line 1"):
        load_submission(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(CirError, match=r"list\.json: expected a JSON object"):
        load_submission(listed)
    with pytest.raises(CirError, match=r"absent\.json: cannot read"):
        load_submission(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------- CIRCO


@pytest.fixture(scope="module")
def circo_test() -> tuple[list[str], dict]:
    queries = json.loads(_need(CIRCO / "annotations" / "test.json").read_text())
    example = load_submission(_need(CIRCO / "submission_examples" / "submission_test.json"))
    return [str(q["id"]) for q in queries], example


def test_official_circo_example(circo_test: tuple[list[str], dict], tmp_path: Path):
    query_ids, example = circo_test
    assert len(query_ids) == 800
    assert set(example) == set(query_ids)
    assert all(len(set(v)) == len(v) == 50 for v in example.values())  # no duplicates
    validate_circo_submission(query_ids, example)
    path = write_circo_submission(tmp_path / "circo.json", example, query_ids)
    assert load_submission(path) == example
    assert [p.name for p in tmp_path.iterdir()] == ["circo.json"]


def test_circo_duplicate_rejected(circo_test: tuple[list[str], dict], tmp_path: Path):
    query_ids, example = circo_test
    ranking = copy.deepcopy(example)
    first = query_ids[0]
    ranking[first][1] = ranking[first][0]
    with pytest.raises(CirError, match=rf"'{first}' lists .* twice"):
        validate_circo_submission(query_ids, ranking)
    with pytest.raises(CirError):
        write_circo_submission(tmp_path / "circo.json", ranking, query_ids)
    assert not any(tmp_path.iterdir())


CIRCO_IDS = ["0", "1"]


def _circo_ok() -> dict:
    return {"0": list(range(50)), "1": list(range(100, 150))}


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d: d.pop("1"), r"1 query id\(s\) missing, e\.g\. '1'"),
        (lambda d: d.update({"7": list(range(50))}), r"unexpected key.*'7'"),
        (lambda d: d["0"].pop(), r"'0' has 49 names; expected exactly 50"),
        (lambda d: d["0"].__setitem__(3, 0), r"'0' lists 0 twice"),
        (lambda d: d["0"].__setitem__(3, "0"), r"'0' lists 0 twice"),  # "0" == 0 to the server
        (lambda d: d["1"].__setitem__(0, "abc"), r"'1' holds 'abc'; expected integer"),
        (lambda d: d["1"].__setitem__(0, True), r"'1' holds True"),
    ],
)
def test_circo_violations(edit, pattern: str):
    ranking = _circo_ok()
    validate_circo_submission(CIRCO_IDS, ranking)
    edit(ranking)
    with pytest.raises(CirError, match=pattern):
        validate_circo_submission(CIRCO_IDS, ranking)


def test_circo_writes_integer_ids(tmp_path: Path):
    ranking = {"0": [str(i) for i in range(50)], "1": list(range(100, 150))}
    path = write_circo_submission(tmp_path / "c.json", ranking, CIRCO_IDS)
    assert load_submission(path)["0"] == list(range(50))
