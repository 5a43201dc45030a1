"""The toy data side of the `toy_lincir` recipe: the toy *training* images with descriptions of
their attributes ("a small red circle in the top left corner"), what the tiny aligned CLIP of
backbones/toy_clip.py is trained on (`cir prepare toy-lincir`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cir_cli.data.toy import POSITIONS
from cir_cli.errors import CirError

CLIP_TEMPLATES = (
    "a {size} {colour} {shape} in the {pos}",
    "a picture of a {size} {colour} {shape} in the {pos}",
    "a {size} {shape} that is {colour} in the {pos}",
    "a {colour} {shape} in the {pos} that is {size}",
)


def train_images(root: Path) -> list[tuple[Path, dict]]:
    """(image path, attributes) of every toy training image (val/test are never seen)."""
    meta_path = root / "toy_meta.json"
    split_path = root / "cirr" / "image_splits" / "split.rc2.train.json"
    if not meta_path.is_file() or not split_path.is_file():
        raise CirError(
            f"{root}: not a toy dataset in the CIRR layout (run `cir prepare toy --out {root}`)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))["images"]
    names = json.loads(split_path.read_text(encoding="utf-8"))
    return [(root / rel[2:], meta[name]) for name, rel in names.items()]


def describe(attrs: dict, rng: random.Random) -> str:
    pos = POSITIONS[(int(attrs["row"]), int(attrs["col"]))]
    return rng.choice(CLIP_TEMPLATES).format(
        size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"], pos=pos
    )
