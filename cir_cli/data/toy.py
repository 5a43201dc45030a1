"""A synthetic composed-image-retrieval dataset written in the real CIRR / FashionIQ layouts.

Every image shows one shape (circle, square, triangle, star) in one of 6 colours, 3 sizes and
3x3 positions (648 attribute combinations), drawn with small rendering noise. A query is a
reference image plus a modification text; the target is the image whose attributes equal the
reference's with the edit applied, so the target is determined by reference + text up to noise
and recall can approach 100%. Many edits *replace* a value ("put it in the top left corner",
"make it small", "make it a blue star") rather than nudge it: an element-wise sum of image and
text features cannot erase the reference's old value, so these edits make a learned combiner
measurably better than the sum (see the toy dataset notes).

The files are written exactly where the real loaders look (spec 1.1/1.2), so the same
`cir` commands run on the toy data and on the real datasets. `toy_meta.json` (not part of the
real layouts) records every image's attributes and every query's edit for tests and analysis.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

from cir_cli.errors import CirError
from cir_cli.io import write_json_atomic, write_text_atomic

SHAPES = ("circle", "square", "triangle", "star")
# Rainbow order, so "the next colour of the rainbow" is a well-defined (erasing) edit.
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "medium", "large")
# Absolute position phrases never reuse the bare words of the relative moves ("left", "up"), so
# "move it to the middle left" (absolute) and "move it one step left" (relative) cannot collide.
POSITIONS = {
    (0, 0): "top left corner",
    (0, 1): "top middle",
    (0, 2): "top right corner",
    (1, 0): "middle left",
    (1, 1): "centre",
    (1, 2): "middle right",
    (2, 0): "bottom left corner",
    (2, 1): "bottom middle",
    (2, 2): "bottom right corner",
}
MOVES = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
    "up and to the left": (-1, -1),
    "up and to the right": (-1, 1),
    "down and to the left": (1, -1),
    "down and to the right": (1, 1),
}
MIRRORS = {
    "left to right": ("col",),
    "top to bottom": ("row",),
    "through the centre": ("row", "col"),
}

_RGB = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (230, 205, 30),
    "green": (40, 160, 60),
    "blue": (40, 90, 215),
    "purple": (135, 55, 185),
}
# Geometry on a 64-pixel canvas, scaled to the requested image size.
_CENTRES = (16.0, 32.0, 48.0)
_RADII = (5.0, 9.0, 13.0)

# Edit kinds -> phrasings. {shape0}/{colour0} name the reference's values; the other fields are
# the edit's parameters. FashionIQ's two captions are two different phrasings of one edit, so
# every kind has at least two templates.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "make it {colour}",
        "paint the {shape0} {colour}",
        "change the colour from {colour0} to {colour}",
        "turn the {colour0} {shape0} {colour}",
        "same {shape0} but {colour}",
    ),
    "shape": (
        "change the {shape0} into a {shape}",
        "make it a {shape}",
        "replace the {colour0} {shape0} with a {colour0} {shape}",
        "same colour, size and place but a {shape}",
    ),
    "size_abs": ("make it {size}", "a {size} {shape0} instead", "resize it to {size}"),
    "size_rel": ("make it {cmp}", "the {shape0} should be a bit {cmp}", "slightly {cmp}"),
    "pos_abs": ("put it in the {pos}", "move it to the {pos}", "place the {shape0} in the {pos}"),
    "pos_rel": ("move it one step {dir}", "shift the {shape0} {dir}", "nudge it {dir} a little"),
    "mirror": ("mirror its position {axis}", "reflect where the {shape0} sits {axis}"),
    "colour_step": ("give it the {step} colour of the rainbow", "use the {step} rainbow colour"),
    "colour_size_rel": (
        "same shape but {colour} and {cmp}",
        "{cmp} and {colour}",
        "is {colour} and {cmp}",
    ),
    "colour_shape": (
        "make it a {colour} {shape}",
        "change the {colour0} {shape0} into a {colour} {shape}",
    ),
    "colour_pos": ("make it {colour} and put it in the {pos}", "a {colour} {shape0} in the {pos}"),
    "size_shape": (
        "make it a {size} {shape}",
        "replace it with a {size} {shape} of the same colour",
    ),
    "size_pos": ("make it {size} and move it to the {pos}", "a {size} one in the {pos}"),
    "colour_size_pos": (
        "a {size} {colour} {shape0} in the {pos}",
        "same shape, but {size}, {colour} and in the {pos}",
    ),
}
# FashionIQ categories are the shapes, so its edits must keep the shape.
_SHAPE_KINDS = frozenset({"shape", "colour_shape", "size_shape"})
KINDS = {
    "cirr": tuple(TEMPLATES),
    "fashioniq": tuple(k for k in TEMPLATES if k not in _SHAPE_KINDS),
}
CIRR_SPLITS = ("train", "val", "test1")
FIQ_SPLITS = ("train", "val", "test")
# The notes' measured recipe: 8 noisy copies of each combination for 6,000 train triplets.
_TRAIN_COPIES_PER_6000 = 8

ProgressFn = Callable[[int, int], None]


class ToyAttrs(NamedTuple):
    """Indices into SHAPES, COLOURS, SIZES and the 3x3 grid (row 0 = top, col 0 = left)."""

    shape: int
    colour: int
    size: int
    row: int
    col: int

    def describe(self) -> dict[str, str | int]:
        return {
            "shape": SHAPES[self.shape],
            "colour": COLOURS[self.colour],
            "size": SIZES[self.size],
            "row": self.row,
            "col": self.col,
        }


# An edit as data: ("set", attr, value), ("add", attr, delta) or ("mirror", attr). Recorded in
# toy_meta.json so a test can re-apply it independently of the text.
Op = tuple
Option = tuple[dict[str, str], tuple[Op, ...], ToyAttrs]

ALL_COMBOS = tuple(
    ToyAttrs(s, c, z, r, k)
    for s in range(len(SHAPES))
    for c in range(len(COLOURS))
    for z in range(len(SIZES))
    for r in range(3)
    for k in range(3)
)


def apply_ops(attrs: ToyAttrs, ops: tuple[Op, ...] | list) -> ToyAttrs:
    """The attributes after an edit; used both to build targets and (by tests) to check them."""
    values = attrs._asdict()
    for op in ops:
        if op[0] == "set":
            values[op[1]] = op[2]
        elif op[0] == "add":
            values[op[1]] += op[2]
        elif op[0] == "mirror":
            values[op[1]] = 2 - values[op[1]]
        else:
            raise ValueError(f"unknown edit op {op!r}")
    return ToyAttrs(**values)


def _kind_options(kind: str, a: ToyAttrs) -> list[Option]:
    """Every valid edit of `kind` on `a`. Each one changes every attribute it names."""
    colours = [(c, {"colour": COLOURS[c]}, ("set", "colour", c)) for c in range(6) if c != a.colour]
    shapes = [(s, {"shape": SHAPES[s]}, ("set", "shape", s)) for s in range(4) if s != a.shape]
    sizes = [(z, {"size": SIZES[z]}, ("set", "size", z)) for z in range(3) if z != a.size]
    cmps = [
        ({"cmp": word}, ("add", "size", d))
        for word, d in (("bigger", 1), ("smaller", -1))
        if 0 <= a.size + d < 3
    ]
    poses = [
        ({"pos": phrase}, (("set", "row", r), ("set", "col", k)))
        for (r, k), phrase in POSITIONS.items()
        if (r, k) != (a.row, a.col)
    ]
    out: list[tuple[dict[str, str], tuple[Op, ...]]] = []
    if kind == "colour":
        out = [(p, (op,)) for _, p, op in colours]
    elif kind == "shape":
        out = [(p, (op,)) for _, p, op in shapes]
    elif kind == "size_abs":
        out = [(p, (op,)) for _, p, op in sizes]
    elif kind == "size_rel":
        out = [(p, (op,)) for p, op in cmps]
    elif kind == "pos_abs":
        out = list(poses)
    elif kind == "pos_rel":
        for word, (dr, dk) in MOVES.items():
            if 0 <= a.row + dr < 3 and 0 <= a.col + dk < 3:
                ops = tuple(("add", n, d) for n, d in (("row", dr), ("col", dk)) if d)
                out.append(({"dir": word}, ops))
    elif kind == "mirror":
        for word, axes in MIRRORS.items():
            # Mirroring the middle row/column is a no-op; "through the centre" only needs one
            # axis off the middle to move the shape.
            moved = [ax for ax in axes if getattr(a, ax) != 1]
            if moved:
                out.append(({"axis": word}, tuple(("mirror", ax) for ax in axes)))
    elif kind == "colour_step":
        for word, d in (("next", 1), ("previous", -1)):
            if 0 <= a.colour + d < len(COLOURS):
                out.append(({"step": word}, (("add", "colour", d),)))
    elif kind == "colour_size_rel":
        out = [({**pc, **pz}, (oc, oz)) for _, pc, oc in colours for pz, oz in cmps]
    elif kind == "colour_shape":
        out = [({**pc, **ps}, (oc, os_)) for _, pc, oc in colours for _, ps, os_ in shapes]
    elif kind == "colour_pos":
        out = [({**pc, **pp}, (oc, *op)) for _, pc, oc in colours for pp, op in poses]
    elif kind == "size_shape":
        out = [({**pz, **ps}, (oz, os_)) for _, pz, oz in sizes for _, ps, os_ in shapes]
    elif kind == "size_pos":
        out = [({**pz, **pp}, (oz, *op)) for _, pz, oz in sizes for pp, op in poses]
    elif kind == "colour_size_pos":
        out = [
            ({**pz, **pc, **pp}, (oz, oc, *op))
            for _, pz, oz in sizes
            for _, pc, oc in colours
            for pp, op in poses
        ]
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return [(params, ops, apply_ops(a, ops)) for params, ops in out]


def edit_text(template: str, reference: ToyAttrs, params: dict[str, str]) -> str:
    return template.format(
        shape0=SHAPES[reference.shape], colour0=COLOURS[reference.colour], **params
    )


def all_edits(reference: ToyAttrs, fmt: str = "cirr") -> list[tuple[str, str, ToyAttrs]]:
    """Every (kind, text, target attributes) the generator can produce for `reference`.

    Lets tests check that reference + text always determines the target.
    """
    rows = []
    for kind in KINDS[fmt]:
        for params, _ops, target in _kind_options(kind, reference):
            for template in TEMPLATES[kind]:
                rows.append((kind, edit_text(template, reference, params), target))
    return rows


def _neighbours(a: ToyAttrs) -> list[ToyAttrs]:
    """Combinations differing from `a` in exactly one attribute (position counts as one):
    the hard distractors of a CIRR-style group."""
    out = [a._replace(shape=s) for s in range(4) if s != a.shape]
    out += [a._replace(colour=c) for c in range(6) if c != a.colour]
    out += [a._replace(size=z) for z in range(3) if z != a.size]
    out += [a._replace(row=r, col=k) for (r, k) in POSITIONS if (r, k) != (a.row, a.col)]
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _noise(rng: random.Random) -> tuple:
    """Per-image nuisance: jitter of position/size/rotation/colour and a tinted background."""
    base = rng.randint(140, 220)
    bg = tuple(base + rng.randint(-20, 20) for _ in range(3))
    jitter = tuple(rng.randint(-15, 15) for _ in range(3))
    return (
        rng.uniform(-2, 2),
        rng.uniform(-2, 2),
        rng.uniform(-1, 1),
        rng.uniform(-10, 10),
        jitter,
        bg,
    )


def _polygon(
    cx: float, cy: float, radius: float, n: int, rot_deg: float, inner: float | None = None
) -> list[tuple[float, float]]:
    """A regular polygon (or star when `inner` is given) pointing up, rotated by `rot_deg`."""
    pts = []
    steps = 2 * n if inner is not None else n
    for i in range(steps):
        r = radius if inner is None or i % 2 == 0 else radius * inner
        ang = math.radians(rot_deg - 90 + 360 * i / steps)
        pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang)))
    return pts


def render(attrs: ToyAttrs, noise: tuple, size: int = 64) -> Image.Image:
    """Draw one toy image (public so docs and tests can show what an attribute tuple looks like)."""
    dx, dy, dr, rot, jitter, bg = noise
    scale = size / 64.0
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cx = (_CENTRES[attrs.col] + dx) * scale
    cy = (_CENTRES[attrs.row] + dy) * scale
    r = (_RADII[attrs.size] + dr) * scale
    fill = tuple(
        max(0, min(255, v + j)) for v, j in zip(_RGB[COLOURS[attrs.colour]], jitter, strict=True)
    )
    shape = SHAPES[attrs.shape]
    # Radii are tuned so the four shapes of one size cover similar areas: size must be read
    # from the extent, not confused with shape.
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot + 45), fill=fill)
    elif shape == "triangle":
        # Shift down so the triangle's visual centre, not its circumcentre, sits on the grid.
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.35, 3, rot), fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, r * 1.35, 5, rot, inner=0.45), fill=fill)
    return img


# ---------------------------------------------------------------------------------------------
# Planning: which images exist and which queries use them (pure; no files)


class _Split:
    def __init__(self, names: list[str], attrs: list[ToyAttrs]) -> None:
        self.names = names
        self.attrs = attrs
        self.by_combo: dict[ToyAttrs, list[int]] = {}
        for i, a in enumerate(attrs):
            self.by_combo.setdefault(a, []).append(i)


def _images(rng: random.Random, combos: list[ToyAttrs], copies: int) -> list[ToyAttrs]:
    """`copies` images of each combination in shuffled order, so names reveal nothing."""
    attrs = [a for a in combos for _ in range(copies)]
    rng.shuffle(attrs)
    return attrs


def _plan_queries(
    rng: random.Random, split: _Split, n: int, kinds: tuple[str, ...], n_captions: int, group: bool
) -> list[dict]:
    cache: dict[tuple[str, ToyAttrs], list[Option]] = {}
    queries = []
    for _ in range(n):
        ref = rng.randrange(len(split.names))
        a = split.attrs[ref]
        # Uniform over kinds (not over options) so rare erasing edits like mirroring are as
        # frequent as the combinatorially many three-attribute edits.
        while True:
            kind = kinds[rng.randrange(len(kinds))]
            key = (kind, a)
            if key not in cache:
                cache[key] = _kind_options(kind, a)
            if cache[key]:
                break
        params, ops, target_attrs = cache[key][rng.randrange(len(cache[key]))]
        copies = split.by_combo[target_attrs]
        tgt = copies[rng.randrange(len(copies))]
        templates = rng.sample(TEMPLATES[kind], n_captions)
        q = {
            "reference": ref,
            "target": tgt,
            "kind": kind,
            "ops": [list(op) for op in ops],
            "captions": [edit_text(t, a, params) for t in templates],
        }
        if group:
            near = [c for c in _neighbours(target_attrs) if c != a]
            picks = []
            for c in rng.sample(near, 4):
                imgs = split.by_combo[c]
                picks.append(imgs[rng.randrange(len(imgs))])
            members = [ref, tgt, *picks]
            rng.shuffle(members)
            q["members"] = members
        queries.append(q)
    return queries


def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------------------------
# Writers


class _Renderer:
    """Renders planned images to PNG and reports progress over the whole dataset."""

    def __init__(self, total: int, size: int, progress: ProgressFn | None) -> None:
        self.total, self.size, self.progress, self.done = total, size, progress, 0

    def write(self, rng: random.Random, attrs: list[ToyAttrs], paths: list[Path]) -> None:
        for a, path in zip(attrs, paths, strict=True):
            render(a, _noise(rng), self.size).save(path, format="PNG")
            self.done += 1
            if self.progress is not None and (self.done % 256 == 0 or self.done == self.total):
                self.progress(self.done, self.total)


def _rng(seed: int, fmt: str, part: str) -> random.Random:
    # One independent stream per split and purpose: changing n_train_triplets leaves the val
    # and test data byte-identical, so numbers on them stay comparable.
    return random.Random(f"cir-toy/{seed}/{fmt}/{part}")


def _train_copies(n_train_triplets: int) -> int:
    return max(1, round(n_train_triplets * _TRAIN_COPIES_PER_6000 / 6000))


def _cirr_name(prefix: str, i: int) -> str:
    # Mimics CIRR's "<split>-<pair>-<n>-img<k>" names; a bijection of i, so names are unique.
    return f"{prefix}-{i // 8}-{(i // 2) % 4}-img{i % 2}"


def _generate_cirr(
    out: Path, seed: int, counts: dict[str, int], renderer: _Renderer, meta: dict
) -> dict:
    copies = {"train": _train_copies(counts["train"]), "val": 1, "test1": 1}
    folders = {"train": "train", "val": "dev", "test1": "test1"}
    summary: dict[str, dict[str, int]] = {}
    pairid = 0
    for split in CIRR_SPLITS:
        attrs = _images(_rng(seed, "cirr", f"{split}/images"), list(ALL_COMBOS), copies[split])
        prefix = folders[split]
        names = [_cirr_name(prefix, i) for i in range(len(attrs))]
        if split == "train":
            # NLVR2-style numeric subfolders, as in ./train/34/train-11041-2-img0.png
            rel = [f"./train/{(i // 8) // 100}/{n}.png" for i, n in enumerate(names)]
        else:
            rel = [f"./{prefix}/{n}.png" for n in names]
        paths = [out / r[2:] for r in rel]
        for folder in sorted({p.parent for p in paths}):
            folder.mkdir(parents=True, exist_ok=True)
        renderer.write(_rng(seed, "cirr", f"{split}/noise"), attrs, paths)

        data = _Split(names, attrs)
        queries = _plan_queries(
            _rng(seed, "cirr", f"{split}/queries"),
            data,
            counts[split],
            KINDS["cirr"],
            1,
            group=True,
        )
        records = []
        for set_id, q in enumerate(queries):
            ref, tgt = names[q["reference"]], names[q["target"]]
            members = [names[m] for m in q["members"]]
            rec: dict = {"pairid": pairid, "reference": ref}
            if split != "test1":  # the public test1 file hides the target
                rec["target_hard"] = tgt
                rec["target_soft"] = {tgt: 1.0}
            rec["caption"] = q["captions"][0]
            img_set: dict = {"id": set_id, "members": members, "reference_rank": members.index(ref)}
            if split != "test1":
                img_set["target_rank"] = members.index(tgt)
            rec["img_set"] = img_set
            records.append(rec)
            meta["queries"][split].append(
                {
                    "pairid": pairid,
                    "reference": ref,
                    "target": tgt,
                    "kind": q["kind"],
                    "ops": q["ops"],
                    "captions": q["captions"],
                }
            )
            pairid += 1
        meta["images"].update({n: a.describe() for n, a in zip(names, attrs, strict=True)})
        # One line per file like the real CIRR JSONs (and json's fast C encoder needs no indent).
        write_json_atomic(
            out / "cirr" / "image_splits" / f"split.rc2.{split}.json",
            dict(zip(names, rel, strict=True)),
            indent=None,
        )
        write_json_atomic(out / "cirr" / "captions" / f"cap.rc2.{split}.json", records, indent=None)
        summary[split] = {"queries": len(records), "images": len(names)}
    return summary


def _generate_fiq(
    out: Path, seed: int, counts: dict[str, int], renderer: _Renderer, meta: dict
) -> dict:
    split_codes = {"train": "R", "val": "V", "test": "E"}
    summary: dict[str, dict] = {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split in FIQ_SPLITS:
        copies = _train_copies(counts["train"]) if split == "train" else 1
        per_cat = _split_counts(counts[split], len(SHAPES))
        cats: dict[str, dict[str, int]] = {}
        for s, (cat, n) in enumerate(zip(SHAPES, per_cat, strict=True)):
            part = f"{split}/{cat}"
            combos = [a for a in ALL_COMBOS if a.shape == s]
            attrs = _images(_rng(seed, "fashioniq", f"{part}/images"), combos, copies)
            # Ten characters like the real ASIN names ("B0084Y8XIU"); unique across splits.
            names = [f"X{split_codes[split]}{cat[:2].upper()}{i:06d}" for i in range(len(attrs))]
            renderer.write(
                _rng(seed, "fashioniq", f"{part}/noise"),
                attrs,
                [out / "images" / f"{nm}.png" for nm in names],
            )
            queries = _plan_queries(
                _rng(seed, "fashioniq", f"{part}/queries"),
                _Split(names, attrs),
                n,
                KINDS["fashioniq"],
                2,
                group=False,
            )
            records = []
            for q in queries:
                ref, tgt = names[q["reference"]], names[q["target"]]
                rec: dict = {"candidate": ref}
                if split != "test":  # old FashionIQ test releases have no target
                    rec["target"] = tgt
                rec["captions"] = q["captions"]
                records.append(rec)
                meta["queries"][part].append(
                    {
                        "reference": ref,
                        "target": tgt,
                        "kind": q["kind"],
                        "ops": q["ops"],
                        "captions": q["captions"],
                    }
                )
            meta["images"].update({nm: a.describe() for nm, a in zip(names, attrs, strict=True)})
            # Indented by 4 like the real FashionIQ JSONs.
            write_json_atomic(out / "image_splits" / f"split.{cat}.{split}.json", names, indent=4)
            write_json_atomic(out / "captions" / f"cap.{cat}.{split}.json", records, indent=4)
            cats[cat] = {"queries": len(records), "images": len(names)}
        summary[split] = {
            "queries": sum(c["queries"] for c in cats.values()),
            "images": sum(c["images"] for c in cats.values()),
            "categories": cats,
        }
    return summary


def generate_toy(
    out: Path,
    fmt: str = "cirr",
    seed: int = 0,
    size: int = 64,
    n_train_triplets: int = 6000,
    n_val_queries: int = 500,
    n_test_queries: int = 500,
    progress: ProgressFn | None = None,
) -> dict:
    """Write a synthetic CIR dataset under `out` in the real CIRR or FashionIQ layout.

    - `fmt="cirr"`: `out` is a `cirr_dataset` root (cirr/captions, cirr/image_splits, train/<k>/,
      dev/, test1/). Val and test1 galleries hold each of the 648 attribute combinations once;
      train holds `8 * n_train_triplets / 6000` (at least 1) noisy copies of each.
    - `fmt="fashioniq"`: `out` is a `fashionIQ_dataset` root; the categories ("dress types")
      are the 4 shapes and the query counts are totals split evenly over them.
    - `size`: image side in pixels. `progress(done, total)` is called as images are written.

    Same arguments -> byte-identical files. Returns counts per split (queries, images).
    """
    if fmt not in KINDS:
        raise CirError(f"toy format must be one of {sorted(KINDS)}, got {fmt!r}")
    if size < 16:
        raise CirError(f"toy image size must be at least 16 pixels, got {size}")
    for label, n in (
        ("train triplets", n_train_triplets),
        ("val queries", n_val_queries),
        ("test queries", n_test_queries),
    ):
        if n < 0:
            raise CirError(f"number of toy {label} must be >= 0, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test_split = "test1" if fmt == "cirr" else "test"
    counts = {"train": n_train_triplets, "val": n_val_queries, test_split: n_test_queries}
    n_images = len(ALL_COMBOS) * (_train_copies(n_train_triplets) + 2)
    renderer = _Renderer(n_images, size, progress)
    query_keys = (
        list(CIRR_SPLITS) if fmt == "cirr" else [f"{s}/{c}" for s in FIQ_SPLITS for c in SHAPES]
    )
    meta: dict = {"images": {}, "queries": {k: [] for k in query_keys}}
    if fmt == "cirr":
        splits = _generate_cirr(out, seed, counts, renderer, meta)
    else:
        splits = _generate_fiq(out, seed, counts, renderer, meta)

    summary = {"format": fmt, "seed": seed, "image_size": size, "splits": splits}
    write_json_atomic(
        out / "toy_meta.json",
        {
            "generator": "cir_cli.data.toy",
            "format": fmt,
            "seed": seed,
            "image_size": size,
            "attributes": {
                "shape": SHAPES,
                "colour": COLOURS,
                "size": SIZES,
                "position": {f"{r},{k}": p for (r, k), p in POSITIONS.items()},
            },
            **meta,
        },
        indent=None,
    )
    write_text_atomic(out / "README.txt", _readme(summary))
    return summary


def _readme(summary: dict) -> str:
    fmt = summary["format"]
    lines = [
        "Synthetic composed-image-retrieval toy dataset.",
        "",
        f"Generated by cir_cli.data.toy.generate_toy (format={fmt}, seed={summary['seed']}, "
        f"image size={summary['image_size']}).",
        "Same seed and arguments give byte-identical files.",
        "",
        "Each image shows one shape (circle/square/triangle/star) in one of 6 colours, 3 sizes",
        "and 3x3 positions, with small rendering noise. The modification text plus the reference",
        "determine the target's attributes exactly. It is a smoke-test and tutorial dataset, not",
        "a benchmark.",
        "",
        "Layout: the real "
        + (
            "CIRR (cirr/captions, cirr/image_splits, train/<k>, dev, test1)."
            if fmt == "cirr"
            else "FashionIQ (captions, image_splits, images); categories = shapes."
        ),
        "toy_meta.json: every image's attributes and every query's edit (not a real-layout file).",
        "",
        "split: queries / images",
    ]
    for split, c in summary["splits"].items():
        lines.append(f"  {split}: {c['queries']} / {c['images']}")
    return "\n".join(lines) + "\n"


def load_toy_meta(out: Path) -> dict:
    """The attribute metadata written next to a toy dataset."""
    return json.loads((Path(out) / "toy_meta.json").read_text(encoding="utf-8"))
