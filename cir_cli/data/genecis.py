"""GeneCIS: the four conditional-similarity splits as `CIRSplit`s (spec lincir_searle_circo.md 3.4).

Templates (published JSON layout): `ROOT/{focus,change}_{attribute,object}.json` (or under
`ROOT/genecis/`), each a list of {`reference`, `target`, `gallery`: [...], `condition`}.
Object entries are {`val_image_id`} (COCO val2017, `ROOT/val2017/<12-digit id>.jpg`), attribute
entries {`image_id`, `instance_bbox`: [x, y, w, h]} (Visual Genome, `ROOT/VG_100K_all/<id>.jpg`).

Protocol: each query is ranked against its own candidates [target] + gallery (the split's
`group`), Recall@{1,2,3}; the CIRSplit gallery is the union of all candidates, so candidate
features are computed (and cached) once. Attribute items are crops: the box dilated by 0.7
(left = max(0, x - 0.7w), top = max(0, y - 0.7h), right = min(W, left + 1.7w), bottom =
min(H, top + 1.7h)) and padded to a centred black square. The crops are written once as PNG
(lossless) under `ROOT/cir_crops/` (or $CIR_GENECIS_CROPS) when the split's images are first
needed, then go through the recipe's CLIP preprocessing like any image. GeneCIS has one
labelled evaluation set: splits `val` and `test` load the same files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cir_cli.data.annotations import expect_str, read_annotation_json, require_root
from cir_cli.data.base import CIRSplit, DatasetSpec, Results, Triplet, require_keys
from cir_cli.data.fashioniq import summarize as recall_summary
from cir_cli.errors import CirError
from cir_cli.io import atomic_path
from cir_cli.progress import progress_bar

NAME = "genecis"
SPLITS = ("val", "test")
CATEGORIES = ("focus_attribute", "change_attribute", "focus_object", "change_object")
DILATION = 0.7
LAYOUT = (
    "GeneCIS templates ROOT/{focus,change}_{attribute,object}.json (or ROOT/genecis/), Visual "
    "Genome images ROOT/VG_100K_all/<image_id>.jpg, COCO ROOT/val2017/<12-digit id>.jpg"
)


def check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if not categories:
        return CATEGORIES
    for cat in categories:
        if cat not in CATEGORIES:
            raise CirError(
                f"unknown GeneCIS split '{cat}'; expected some of {', '.join(CATEGORIES)}"
            )
    return tuple(categories)


def template_file(root: Path, category: str) -> Path:
    for candidate in (Path(root) / f"{category}.json", Path(root) / "genecis" / f"{category}.json"):
        if candidate.is_file():
            return candidate
    return Path(root) / f"{category}.json"


def _first_dir(root: Path, options: Sequence[str]) -> Path:
    for option in options:
        if (Path(root) / option).is_dir():
            return Path(root) / option
    return Path(root) / options[0]


def crop_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """GeneCIS's dilated crop (left, top, right, bottom) of an [x, y, w, h] box."""
    x, y, w, h = (float(v) for v in box)
    left, top = max(0.0, x - DILATION * w), max(0.0, y - DILATION * h)
    right = min(float(width), left + (1 + DILATION) * w)
    bottom = min(float(height), top + (1 + DILATION) * h)
    return left, top, right, bottom


def make_crop(source: Path, box: Sequence[float]):
    """The padded square crop (PIL image) of `box` in `source`."""
    # Deferred: Pillow and torch (data.images) stay out of `import cir_cli.data` (the CLI's).
    from PIL import Image

    from cir_cli.data.images import open_rgb

    image = open_rgb(source)
    crop = image.crop(crop_box(box, *image.size))
    w, h = crop.size
    if w == h:
        return crop
    side = max(w, h)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(crop, ((side - w) // 2, (side - h) // 2))
    return square


def _fmt(value: float) -> str:
    return f"{float(value):g}"


@dataclass
class GenecisSplit(CIRSplit):
    """A GeneCIS split; attribute crops are materialised before its images are first read."""

    # crop name -> (source image, [x, y, w, h])
    crops: dict[str, tuple[Path, tuple[float, ...]]] = field(default_factory=dict)

    def missing_images(self) -> list[str]:
        missing = []
        for name in self.image_names():
            crop = self.crops.get(name)
            path = crop[0] if crop is not None else self.image_paths[name]
            if not path.is_file():
                missing.append(name)
        return missing

    def require_images(self) -> None:
        missing = self.missing_images()
        if missing:
            first = ", ".join(
                str(self.crops[n][0] if n in self.crops else self.image_paths[n])
                for n in missing[:3]
            )
            raise CirError(
                f"{self.label}: {len(missing)} image(s) missing, e.g. {first}; expected {LAYOUT}"
            )
        self.write_crops()

    def write_crops(self) -> None:
        todo = [n for n in self.crops if not self.image_paths[n].is_file()]
        if not todo:
            return
        def one(name: str) -> None:
            source, box = self.crops[name]
            target = self.image_paths[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                make_crop(source, box).save(tmp, format="PNG")

        with progress_bar(f"cropping {self.label}", len(todo)) as advance, ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1)
        ) as pool:
            for _ in pool.map(one, todo):
                advance(1)


def _load_category(root: Path, split: str, category: str, crops_dir: Path) -> GenecisSplit:
    path = template_file(root, category)
    records = read_annotation_json(path, list, "a list of GeneCIS samples", LAYOUT)
    attribute = category.endswith("attribute")
    vg_dir = _first_dir(root, ("VG_100K_all", "VG_100K", "visual_genome/VG_100K_all"))
    coco_dir = _first_dir(root, ("val2017", "coco/val2017", "coco2017/val2017"))
    image_paths: dict[str, Path] = {}
    crops: dict[str, tuple[Path, tuple[float, ...]]] = {}

    def item(entry: object, where: str) -> str:
        if attribute:
            require_keys(entry, ("image_id", "instance_bbox"), where)
            box = entry["instance_bbox"]
            if not isinstance(box, list) or len(box) != 4:
                raise CirError(f"{where}: 'instance_bbox' must be [x, y, w, h], got {box!r}")
            image_id = entry["image_id"]
            name = f"vg{image_id}_" + "_".join(_fmt(v) for v in box)
            if name not in crops:
                crops[name] = (vg_dir / f"{image_id}.jpg", tuple(float(v) for v in box))
                image_paths[name] = crops_dir / category / f"{name}.png"
            return name
        require_keys(entry, ("val_image_id",), where)
        image_id = entry["val_image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise CirError(f"{where}: 'val_image_id' must be an integer, got {image_id!r}")
        name = f"coco{image_id}"
        image_paths.setdefault(name, coco_dir / f"{image_id:012d}.jpg")
        return name

    triplets: list[Triplet] = []
    for i, rec in enumerate(records):
        where = f"{path} entry {i}"
        require_keys(rec, ("reference", "target", "gallery", "condition"), where)
        condition = expect_str(rec["condition"], f"{where} 'condition'", "a condition string")
        if not isinstance(rec["gallery"], list) or not rec["gallery"]:
            raise CirError(f"{where}: 'gallery' must be a non-empty list of images")
        reference = item(rec["reference"], f"{where} 'reference'")
        target = item(rec["target"], f"{where} 'target'")
        gallery = [item(g, f"{where} 'gallery'") for g in rec["gallery"]]
        candidates = tuple(dict.fromkeys([target, *gallery]))
        triplets.append(
            Triplet(
                query_id=f"{category}-{i}",
                reference=reference,
                target=target,
                # The real condition (the branch's object splits read "0", spec 3.4).
                captions=(condition,),
                group=candidates,
            )
        )
    union = list(dict.fromkeys(n for t in triplets for n in t.group))
    return GenecisSplit(
        dataset=NAME,
        split=split,
        triplets=triplets,
        gallery=union,
        image_paths=image_paths,
        remove_reference=False,
        caption_policy="verbatim",
        subset=category,
        has_groups=True,
        crops=crops,
    )


def load(root: Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    """One `GenecisSplit` per requested GeneCIS split (default: all four)."""
    root = Path(root)
    require_root(root, NAME)
    if split not in SPLITS:
        raise CirError(f"unknown GeneCIS split '{split}'; expected one of {', '.join(SPLITS)}")
    crops_dir = Path(os.environ.get("CIR_GENECIS_CROPS", root / "cir_crops"))
    return [_load_category(root, split, c, crops_dir) for c in check_categories(categories)]


def files(
    root: Path, split: str, categories: Sequence[str] | None
) -> list[tuple[str, tuple[Path, Path]]]:
    return [(c, (template_file(Path(root), c),) * 2) for c in check_categories(categories)]


def summarize(results: Results) -> dict[str, float]:
    """Recall@{1,2,3} within each query's candidates per split, average_recall_at1."""
    if not results[0].subset_recall:
        # No candidate-set recalls: the plain recall summary, as before datasets owned this.
        return recall_summary(results)
    from cir_cli import metrics  # torch: not at import (the CLI imports this module for --help)

    per_split = {r.split.subset or r.split.split: r.subset_recall for r in results}
    return metrics.genecis_summary(per_split)


SPEC = DatasetSpec(
    name=NAME,
    title="GeneCIS",
    splits=SPLITS,
    categories=CATEGORIES,
    layout=LAYOUT,
    load=load,
    files=files,
    selection_metric="average_recall_at1",  # spec lincir_searle_circo.md 3.4
    recall_ks=(),  # only each query's own candidates are ranked
    summarize=summarize,
)
