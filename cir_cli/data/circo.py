"""CIRCO: parse the official annotations into `CIRSplit`s (spec lincir_searle_circo.md 3.3).

Layout (SEARLE / LinCIR): `ROOT/annotations/{val,test}.json`, images in
`ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg`, optionally listed by
`ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json` (123,403 images).

Gallery: whatever COCO-unlabeled images the root holds (the image-info order when that file is
present, else ascending id), so the real set gives the official 123,403-image gallery and tests
can use placeholder images. Every image id the annotations name (references; for val also
`target_img_id` and `gt_img_ids`) must be in it. The reference is kept in the gallery (official
protocol). Image names are the COCO ids as decimal strings.

No torch here: `cir --help` and `cir prepare` import this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cir_cli.data.annotations import expect_str, read_annotation_json, require_root
from cir_cli.data.base import CIRSplit, DatasetSpec, Results, Submission, Triplet, require_keys
from cir_cli.data.fashioniq import summarize as recall_summary
from cir_cli.errors import CirError
from cir_cli.submission import CIRCO_K, write_circo_submission

NAME = "circo"
SPLITS = ("val", "test")
_LABELLED = ("val",)
IMAGE_DIR = Path("COCO2017_unlabeled") / "unlabeled2017"
IMAGE_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
_FILE = re.compile(r"^0*(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)

LAYOUT = (
    "CIRCO annotations in ROOT/annotations/{val,test}.json, images in "
    "ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg"
)


def annotation_file(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise CirError(f"unknown CIRCO split '{split}'; expected one of {', '.join(SPLITS)}")
    return Path(root) / "annotations" / f"{split}.json"


def _int_id(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CirError(f"{where}: expected an integer image id, got {value!r}")
    return value


def scan_gallery(root: Path) -> tuple[list[str], dict[str, Path]]:
    """(image names in gallery order, name -> path) of the COCO-unlabeled images under `root`."""
    image_dir = Path(root) / IMAGE_DIR
    if not image_dir.is_dir():
        return [], {}
    on_disk: dict[int, str] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            match = _FILE.match(entry.name)
            if match:
                on_disk.setdefault(int(match.group(1)), entry.name)
    info_path = Path(root) / IMAGE_INFO
    order: list[int]
    if info_path.is_file():
        info = read_annotation_json(info_path, dict, "a COCO image-info object", LAYOUT)
        listed = [img.get("id") for img in info.get("images", []) if isinstance(img, dict)]
        order = [i for i in listed if isinstance(i, int) and i in on_disk]
        listed_set = set(order)
        order += sorted(i for i in on_disk if i not in listed_set)
    else:
        order = sorted(on_disk)
    names = [str(i) for i in order]
    return names, {str(i): image_dir / on_disk[i] for i in order}


def load(root: Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    """Load one CIRCO split (one `CIRSplit`; CIRCO has no categories)."""
    if categories:
        raise CirError(f"CIRCO has no categories; got {', '.join(categories)}")
    root = Path(root)
    require_root(root, NAME)
    path = annotation_file(root, split)
    records = read_annotation_json(path, list, "a list of query objects", LAYOUT)
    labelled = split in _LABELLED
    keys = ("id", "reference_img_id", "relative_caption")
    keys += ("target_img_id", "gt_img_ids") if labelled else ()
    gallery, image_paths = scan_gallery(root)
    known = set(gallery)
    triplets: list[Triplet] = []
    outside: list[str] = []
    for i, rec in enumerate(records):
        where = f"{path} entry {i}"
        require_keys(rec, keys, where)
        # The official evaluator indexes the annotation list by query id.
        if _int_id(rec["id"], f"{where} 'id'") != i:
            raise CirError(f"{where}: 'id' is {rec['id']}, expected {i} (ids equal list indices)")
        reference = str(_int_id(rec["reference_img_id"], f"{where} 'reference_img_id'"))
        caption = expect_str(rec["relative_caption"], f"{where} 'relative_caption'", "a string")
        target = None
        gts: tuple[str, ...] = ()
        tags: tuple[str, ...] = ()
        if labelled:
            target = str(_int_id(rec["target_img_id"], f"{where} 'target_img_id'"))
            raw = rec["gt_img_ids"]
            if not isinstance(raw, list) or not raw:
                raise CirError(f"{where}: 'gt_img_ids' must be a non-empty list of image ids")
            gts = tuple(dict.fromkeys(str(_int_id(g, f"{where} 'gt_img_ids'")) for g in raw))
            if target not in gts:
                raise CirError(f"{where}: 'target_img_id' {target} is not in 'gt_img_ids'")
            tags = tuple(str(a) for a in rec.get("semantic_aspects", []) or [])
        for name in (reference, *gts):
            if name not in known:
                outside.append(name)
        triplets.append(
            Triplet(
                query_id=str(i),
                reference=reference,
                target=target,
                captions=(caption,),
                targets=gts,
                tags=tags,
            )
        )
    if outside:
        outside = list(dict.fromkeys(outside))
        raise CirError(
            f"circo/{split}: {len(outside)} annotated image id(s) are not among the "
            f"{len(gallery)} gallery images in {root / IMAGE_DIR}, e.g. {outside[0]} "
            f"(expected {int(outside[0]):012d}.jpg)"
        )
    return [
        CIRSplit(
            dataset=NAME,
            split=split,
            triplets=triplets,
            gallery=gallery,
            image_paths=image_paths,
            remove_reference=False,
            caption_policy="verbatim",
        )
    ]


def files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    return [("", (annotation_file(Path(root), split), Path(root) / IMAGE_INFO))]


def summarize(results: Results) -> dict[str, float]:
    """mAP@{5,10,25,50}, Recall@k of target_img_id and mAP@10 per semantic aspect."""
    if not results[0].map_at:
        # No multi-target labels: the plain recall summary, as before datasets owned this.
        return recall_summary(results)
    from cir_cli import metrics  # torch: not at import (the CLI imports this module for --help)

    first = results[0]
    return metrics.circo_summary(first.map_at, first.recall, first.tag_map)


def write_rankings(path: Path, split: CIRSplit, top: Sequence[list[str]]) -> Path:
    """{"<query id>": [50 integer image ids]}: the server's and the official evaluator's input."""
    ranking = {t.query_id: names[:CIRCO_K] for t, names in zip(split.triplets, top, strict=True)}
    return write_circo_submission(path, ranking, [t.query_id for t in split.triplets])


def write_submission(
    out_dir: Path,
    name: str,
    split: CIRSplit,
    top: Sequence[list[str]],
    subset_top: Sequence[list[str]],
) -> list[Path]:
    return [write_rankings(Path(out_dir) / f"circo_submission_{name}.json", split, top)]


def save_rankings(run_dir: Path, split: CIRSplit, top: Sequence[list[str]]) -> Path:
    return write_rankings(Path(run_dir) / "circo_rankings.json", split, top)


SPEC = DatasetSpec(
    name=NAME,
    title="CIRCO",
    splits=SPLITS,
    categories=(),
    layout=LAYOUT,
    load=load,
    files=files,
    selection_metric="map_at10",  # spec lincir_searle_circo.md 3.3
    recall_ks=(5, 10, 25, 50),  # metrics.CIRCO_KS (metrics imports torch)
    summarize=summarize,
    submission=Submission(
        server="https://circo.micc.unifi.it/evaluation",
        upload="the circo_submission_*.json file",
        write=write_submission,
        split="test",
    ),
    save_rankings=save_rankings,
)
