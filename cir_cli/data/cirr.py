"""CIRR: parse the rc2 annotation layout into `CIRSplit`s (spec 1.1-1.3).

No torch here: `cir --help` and `cir prepare` import this module and must stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cir_cli.data.annotations import (
    expect_name,
    expect_relpath,
    expect_str,
    read_annotation_json,
    require_root,
)
from cir_cli.data.base import CIRSplit, DatasetSpec, Results, Submission, Triplet, require_keys
from cir_cli.errors import CirError
from cir_cli.submission import build_cirr_submission, write_cirr_submission

NAME = "cirr"
SPLITS = ("train", "val", "test1")
# Splits whose queries carry `target_hard`; test1's targets are held by the evaluation server.
_LABELLED = ("train", "val")
GROUP_SIZE = 6

LAYOUT = (
    "CIRR annotations in ROOT/cirr/{captions,image_splits} (CLIP4Cir layout) or "
    "ROOT/{captions,image_splits} (the CIRR repository), images at ROOT/<relpath> or "
    "ROOT/img_raw/<relpath>"
)


def annotation_dir(root: Path) -> Path:
    """The folder holding `captions/` and `image_splits/`, for either supported layout."""
    require_root(root, NAME)
    # CLIP4Cir nests the annotations one level down (a clone of the cirr_dataset branch in
    # ROOT/cirr); the CIRR repository itself has them at its top level.
    for candidate in (root / "cirr", root):
        if (candidate / "image_splits").is_dir() or (candidate / "captions").is_dir():
            return candidate
    raise CirError(f"no CIRR annotations under {root}: expected {LAYOUT}")


def annotation_files(root: Path, split: str) -> tuple[Path, Path]:
    """(captions file, image split file) of `split`; they need not exist."""
    _check_split(split)
    ann = annotation_dir(root)
    return (
        ann / "captions" / f"cap.rc2.{split}.json",
        ann / "image_splits" / f"split.rc2.{split}.json",
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CirError(f"unknown CIRR split '{split}'; expected one of {', '.join(SPLITS)}")


def _image_base(root: Path, ann: Path, first_relpath: str | None) -> Path:
    """Where the split JSON's relative paths are rooted: ROOT or ROOT/img_raw.

    Decided once per split from the first image's top folder (e.g. `dev`) instead of per image,
    so a partly missing image set still resolves to one consistent base for the missing report.
    """
    bases = (root, root / "img_raw")
    if first_relpath is not None:
        top = Path(first_relpath).parts[0] if Path(first_relpath).parts else ""
        for base in bases:
            if top and (base / top).is_dir():
                return base
    # Nothing on disk yet: assume the images sit where the detected layout puts them, so
    # "missing image" messages name the path the user is expected to fill.
    return root / "img_raw" if ann == root else root


def load(root: Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    """Load one CIRR split as a single `CIRSplit` (CIRR has no categories)."""
    if categories:
        raise CirError(f"CIRR has no categories; got {', '.join(categories)}")
    root = Path(root)
    captions_path, split_path = annotation_files(root, split)
    ann = captions_path.parent.parent

    name_to_rel = read_annotation_json(
        split_path, dict, "an object mapping image name -> relpath", LAYOUT
    )
    for name, rel in name_to_rel.items():
        expect_relpath(rel, f"{split_path} key '{name}'")
    gallery = list(name_to_rel)
    base = _image_base(root, ann, next(iter(name_to_rel.values()), None))
    image_paths = {name: base / rel for name, rel in name_to_rel.items()}

    records = read_annotation_json(captions_path, list, "a list of query objects", LAYOUT)
    labelled = split in _LABELLED
    keys = ("pairid", "reference", "caption", "img_set") + (("target_hard",) if labelled else ())
    triplets: list[Triplet] = []
    for i, rec in enumerate(records):
        where = f"{captions_path} entry {i}"
        require_keys(rec, keys, where)
        pairid = rec["pairid"]
        if isinstance(pairid, bool) or not isinstance(pairid, int):
            raise CirError(f"{where}: 'pairid' must be an integer, got {pairid!r}")
        reference = expect_name(rec["reference"], name_to_rel, f"{where} 'reference'", split_path)
        target = None
        if rec.get("target_hard") is not None:
            target = expect_name(
                rec["target_hard"], name_to_rel, f"{where} 'target_hard'", split_path
            )
        caption = expect_str(rec["caption"], f"{where} 'caption'", "a caption string")
        img_set = rec["img_set"]
        require_keys(img_set, ("members",), f"{where} 'img_set'")
        members = img_set["members"]
        if not isinstance(members, list) or len(members) != GROUP_SIZE:
            got = len(members) if isinstance(members, list) else type(members).__name__
            raise CirError(
                f"{where}: 'img_set.members' must be a list of {GROUP_SIZE} image names, got {got}"
            )
        group = tuple(
            expect_name(m, name_to_rel, f"{where} 'img_set.members'", split_path) for m in members
        )
        triplets.append(
            Triplet(
                query_id=str(pairid),
                reference=reference,
                target=target,
                captions=(caption,),
                group=group,
            )
        )

    return [
        CIRSplit(
            dataset=NAME,
            split=split,
            triplets=triplets,
            gallery=gallery,
            image_paths=image_paths,
            remove_reference=True,
            caption_policy="verbatim",
            has_groups=True,
        )
    ]


def files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    if categories:
        raise CirError(f"CIRR has no categories; got {', '.join(categories)}")
    return [("", annotation_files(Path(root), split))]


def summarize(results: Results) -> dict[str, float]:
    """Recall@{1,5,10,50}, Recall_subset@{1,2,3} and their means (metrics.cirr_summary)."""
    if not results[0].recall:
        return {}
    from cir_cli import metrics  # torch: not at import (the CLI imports this module for --help)

    return metrics.cirr_summary(results[0].recall, results[0].subset_recall)


def write_submission(
    out_dir: Path,
    name: str,
    split: CIRSplit,
    top: Sequence[list[str]],
    subset_top: Sequence[list[str]],
) -> list[Path]:
    """recall_submission_{name}.json and recall_subset_submission_{name}.json, validated."""
    top50 = {t.query_id: names for t, names in zip(split.triplets, top, strict=True)}
    top3 = {t.query_id: names for t, names in zip(split.triplets, subset_top, strict=True)}
    recall, recall_subset = build_cirr_submission(split, top50, top3)
    return list(write_cirr_submission(out_dir, name, recall, recall_subset, split))


SPEC = DatasetSpec(
    name=NAME,
    title="CIRR",
    splits=SPLITS,
    categories=(),
    layout=LAYOUT,
    load=load,
    files=files,
    # (R@5 + R_subset@1) / 2 (spec 5)
    selection_metric="mean_r5_rs1",
    recall_ks=(1, 5, 10, 50),  # metrics.CIRR_KS (metrics imports torch)
    summarize=summarize,
    candidate_prefix="cirr",
    report_headline=(
        ("recall_at1", "R@1"),
        ("recall_at5", "R@5"),
        ("recall_at10", "R@10"),
        ("recall_at50", "R@50"),
        ("group_recall_at1", "R<sub>s</sub>@1"),
        ("group_recall_at2", "R<sub>s</sub>@2"),
        ("group_recall_at3", "R<sub>s</sub>@3"),
        ("mean_r5_rs1", "(R@5 + R<sub>s</sub>@1) / 2"),
    ),
    # The benchmark's own server, as its README gives it (backup: https://cirr.junjie.au/).
    submission=Submission(
        server="https://cirr.cecs.anu.edu.au/test_process/",
        upload="both files (recall_submission_*.json for Recall@K, "
        "recall_subset_submission_*.json for Recall_subset@K)",
        write=write_submission,
    ),
)
