"""FashionIQ: parse the official annotation layout into one `CIRSplit` per category (spec 1.1-1.4).

No torch here: `cir --help` and `cir prepare` import this module and must stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cir_cli.data.annotations import (
    expect_name,
    expect_relpath,
    expect_str,
    read_annotation_json,
    require_root,
)
from cir_cli.data.base import CIRSplit, DatasetSpec, Results, Triplet, require_keys
from cir_cli.errors import CirError

NAME = "fashioniq"
SPLITS = ("train", "val", "test")
CATEGORIES = ("dress", "shirt", "toptee")
# Splits whose queries must name a target; old test releases omit it.
_LABELLED = ("train", "val")
# Preferred first when one product id exists with several extensions: the seeds read `.jpg`.
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
_EXT_RANK = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}

LAYOUT = (
    "FashionIQ annotations in ROOT/captions/cap.{category}.{split}.json and "
    "ROOT/image_splits/split.{category}.{split}.json, images at ROOT/images/{name}.jpg|png|jpeg"
)


def check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    """The requested categories (default: dress, shirt, toptee), in the caller's order.

    Any category with annotation files is accepted (the toy dataset's FashionIQ layout uses
    shape names); a typo surfaces as a missing annotation file naming the expected path.
    """
    if categories is None or len(categories) == 0:
        return CATEGORIES
    for cat in categories:
        if not cat or not all(ch.isalnum() or ch in "-_" for ch in cat):
            raise CirError(
                f"FashionIQ category {cat!r} is not a plain name (letters, digits, '-', '_'); "
                f"the real ones are {', '.join(CATEGORIES)}"
            )
    return tuple(categories)


def annotation_files(root: Path, split: str, category: str) -> tuple[Path, Path]:
    """(captions file, image split file) of one category and split; they need not exist."""
    _check_split(split)
    check_categories([category])
    root = Path(root)
    return (
        root / "captions" / f"cap.{category}.{split}.json",
        root / "image_splits" / f"split.{category}.{split}.json",
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CirError(f"unknown FashionIQ split '{split}'; expected one of {', '.join(SPLITS)}")


def scan_images(images_dir: Path) -> dict[str, str]:
    """Map image stem -> file name for every image in `images_dir`, with one directory listing.

    One scandir over ~75k files is far cheaper than probing three extensions per name.
    """
    found: dict[str, str] = {}
    rank: dict[str, int] = {}
    try:
        entries = os.scandir(images_dir)
    except FileNotFoundError:
        return found
    except NotADirectoryError as e:
        raise CirError(f"{images_dir} is not a folder; expected {LAYOUT}") from e
    with entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            r = _EXT_RANK.get(ext.lower())
            if r is not None and r < rank.get(stem, len(_EXT_RANK)):
                rank[stem] = r
                found[stem] = entry.name
    return found


def _load_category(root: Path, split: str, category: str, found: dict[str, str]) -> CIRSplit:
    captions_path, split_path = annotation_files(root, split, category)
    names = read_annotation_json(split_path, list, "a list of image names", LAYOUT)
    gallery: list[str] = []
    for i, name in enumerate(names):
        # A name becomes images/<name>.jpg: it must not leave the images folder either.
        gallery.append(expect_relpath(name, f"{split_path} entry {i}"))
    in_split = dict.fromkeys(gallery)
    if len(in_split) != len(gallery):
        dup = next(n for i, n in enumerate(gallery) if n in gallery[:i])
        # A repeated gallery entry would give one image two ranks and skew recall.
        raise CirError(
            f"{split_path}: image '{dup}' is listed more than once; expected unique names"
        )
    images_dir = root / "images"
    # A name without a file maps to the `.jpg` path the seeds would open, so the missing-image
    # check reports a concrete path.
    image_paths = {n: images_dir / found.get(n, f"{n}.jpg") for n in gallery}

    records = read_annotation_json(captions_path, list, "a list of query objects", LAYOUT)
    labelled = split in _LABELLED
    keys = ("candidate", "captions") + (("target",) if labelled else ())
    triplets: list[Triplet] = []
    for i, rec in enumerate(records):
        where = f"{captions_path} entry {i}"
        require_keys(rec, keys, where)
        reference = expect_name(rec["candidate"], in_split, f"{where} 'candidate'", split_path)
        target = None
        if rec.get("target") is not None:
            target = expect_name(rec["target"], in_split, f"{where} 'target'", split_path)
        caps = rec["captions"]
        if not isinstance(caps, list) or len(caps) != 2:
            got = len(caps) if isinstance(caps, list) else type(caps).__name__
            raise CirError(f"{where}: 'captions' must be a list of 2 strings, got {got}")
        captions = tuple(expect_str(c, f"{where} 'captions'", "a caption string") for c in caps)
        triplets.append(
            Triplet(
                query_id=f"{category}-{i}",
                reference=reference,
                target=target,
                captions=captions,
            )
        )
    return CIRSplit(
        dataset=NAME,
        split=split,
        triplets=triplets,
        gallery=gallery,
        image_paths=image_paths,
        remove_reference=False,
        caption_policy="fiq_eval",
        subset=category,
    )


def load(root: Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    """One `CIRSplit` per requested category, each with its own gallery (per-category metrics)."""
    root = Path(root)
    require_root(root, NAME)
    _check_split(split)
    cats = check_categories(categories)
    found = scan_images(root / "images")
    return [_load_category(root, split, cat, found) for cat in cats]


def merge(splits: Sequence[CIRSplit]) -> CIRSplit:
    """Concatenate per-category splits for training (the seeds train on all categories at once).

    Triplets keep the categories' order; the gallery is the union in first-seen order. The
    caption policy becomes `fiq_random`, the seeds' training join (the trainer seeds the draw).
    """
    if not splits:
        raise CirError("no FashionIQ categories to merge")
    triplets: list[Triplet] = []
    image_paths: dict[str, Path] = {}
    for s in splits:
        triplets.extend(s.triplets)
        for name in s.gallery:
            image_paths.setdefault(name, s.image_paths[name])
    return CIRSplit(
        dataset=NAME,
        split=splits[0].split,
        triplets=triplets,
        gallery=list(image_paths),
        image_paths=image_paths,
        remove_reference=False,
        caption_policy="fiq_random",
        subset="",
    )


def files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    return [(c, annotation_files(Path(root), split, c)) for c in check_categories(categories)]


def summarize(results: Results) -> dict[str, float]:
    """Per-category R@10 / R@50, their unweighted means and average_recall (spec 5)."""
    if not results[0].recall:
        return {}
    from cir_cli import metrics  # torch: not at import (the CLI imports this module for --help)

    return metrics.fashioniq_summary({r.split.subset or r.split.split: r.recall for r in results})


SPEC = DatasetSpec(
    name=NAME,
    title="FashionIQ",
    splits=SPLITS,
    categories=CATEGORIES,
    layout=LAYOUT,
    load=load,
    files=files,
    merge=merge,
    # (avg R@10 + avg R@50) / 2 (spec 5)
    selection_metric="average_recall",
    recall_ks=(10, 50),  # metrics.FASHIONIQ_KS (metrics imports torch)
    summarize=summarize,
    recipe_categories=True,
    # The seeds draw one of the 4 caption joins per training sample.
    train_caption_policy="fiq_random",
    caption_pairs=True,
    candidate_prefix="fiq",
    report_grid_ks=(10, 50),
)
