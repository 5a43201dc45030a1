"""The one data model every CIR dataset loads into.

A dataset file (cirr.py, fashioniq.py, ...) only parses its annotation layout into `CIRSplit`s;
everything downstream (training, validation, submission, `cir prepare` checks) works on this
model, so there are no per-dataset twins of the evaluation or training code.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cir_cli.errors import CirError


@dataclass(frozen=True)
class Triplet:
    """One query: a reference image, its modification text(s) and (when known) the target.

    `captions` holds the raw annotator texts: one for CIRR, two for FashionIQ (joined per
    `CIRSplit.caption_policy`). `group` holds CIRR's `img_set.members` (6 names, reference
    included) and is empty for datasets without a subset protocol.
    """

    query_id: str
    reference: str
    target: str | None
    captions: tuple[str, ...]
    group: tuple[str, ...] = ()
    # Every correct answer where a query has several (CIRCO's gt_img_ids; `target` is the one
    # Recall@k uses); empty for single-target datasets. Scored by mAP@k in evaluation.
    targets: tuple[str, ...] = ()
    # Labels for per-tag metric breakdowns (CIRCO's semantic aspects); empty otherwise.
    tags: tuple[str, ...] = ()


def _strip(text: str) -> str:
    return text.strip(".?, ")


def join_fashioniq_captions(first: str, second: str, variant: int) -> str:
    """Join FashionIQ's two captions as the seeds do (spec 1.4).

    variant 0: "Cap(c1) and c2" (the deterministic evaluation join), 1: "Cap(c2) and c1",
    2: "Cap(c1)", 3: "Cap(c2)". Cap is Python's str.capitalize (rest lower-cased), s() strips
    '.', '?', ',' and ' ' from both ends.
    """
    a, b = _strip(first), _strip(second)
    if variant == 0:
        return f"{a.capitalize()} and {b}"
    if variant == 1:
        return f"{b.capitalize()} and {a}"
    if variant == 2:
        return a.capitalize()
    if variant == 3:
        return b.capitalize()
    raise ValueError(f"FashionIQ caption variant must be 0-3, got {variant}")


# Names of the caption policies a split can use; recipes pick them by name.
CAPTION_POLICIES = ("verbatim", "fiq_eval", "fiq_random")


def caption_variants(triplet: Triplet, policy: str) -> int:
    """How many distinct texts `query_text` can return for this policy (for feature caching)."""
    return 4 if policy == "fiq_random" and len(triplet.captions) == 2 else 1


def query_text(
    triplet: Triplet, policy: str, rng: random.Random | None = None, variant: int | None = None
) -> str:
    """The modification text a model sees for `triplet` under `policy`.

    - `verbatim`: the single caption as annotated (CIRR); the seeds do not strip or capitalise.
    - `fiq_eval`: FashionIQ's deterministic join (variant 0).
    - `fiq_random`: one of the 4 joins drawn with probability 1/4 each from `rng` (the seeds'
      training policy, but seeded), or the given `variant`.
    """
    if policy == "verbatim" or len(triplet.captions) == 1:
        return triplet.captions[0]
    if policy == "fiq_eval":
        return join_fashioniq_captions(triplet.captions[0], triplet.captions[1], 0)
    if policy == "fiq_random":
        if variant is None:
            variant = (rng or random).randrange(4)
        return join_fashioniq_captions(triplet.captions[0], triplet.captions[1], variant)
    raise ValueError(f"unknown caption policy {policy!r}; expected one of {CAPTION_POLICIES}")


@dataclass
class CIRSplit:
    """The queries of one evaluation (or training) set and the gallery they are ranked against.

    - `gallery`: image names in the annotation's order (the gallery order is the tie-breaker).
    - `image_paths`: every image the split needs (gallery, references, targets) -> file path.
    - `remove_reference`: CIRR removes the query's reference from its ranking; FashionIQ does not.
    - `caption_policy`: how `query_text` builds the model's text for evaluation.
    - `subset`: the name this split reports metrics under ("dress", "" for CIRR).
    """

    dataset: str
    split: str
    triplets: list[Triplet]
    gallery: list[str]
    image_paths: dict[str, Path]
    remove_reference: bool
    caption_policy: str = "verbatim"
    subset: str = ""
    has_groups: bool = False
    gallery_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.gallery_index = {name: i for i, name in enumerate(self.gallery)}

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.split}" + (f"/{self.subset}" if self.subset else "")

    def texts(self, policy: str | None = None) -> list[str]:
        return [query_text(t, policy or self.caption_policy) for t in self.triplets]

    def image_names(self) -> list[str]:
        """Gallery names first (in order), then references/targets outside the gallery."""
        names = list(self.gallery)
        seen = set(names)
        for t in self.triplets:
            for name in (t.reference, t.target):
                if name is not None and name not in seen:
                    seen.add(name)
                    names.append(name)
        return names

    def missing_images(self) -> list[str]:
        return [n for n in self.image_names() if not self.image_paths[n].is_file()]

    def require_images(self) -> None:
        """Raise a one-line CirError when any image of the split is missing on disk.

        The seeds silently dropped such samples, which changes recall denominators.
        """
        missing = self.missing_images()
        if missing:
            first = ", ".join(str(self.image_paths[n]) for n in missing[:3])
            raise CirError(
                f"{self.label}: {len(missing)} image(s) missing, e.g. {first}; "
                "every query and gallery image must exist for evaluation (run `cir prepare`)"
            )


def require_keys(record: dict, keys: Sequence[str], where: str) -> None:
    """Raise a CirError naming the file and the missing key of a malformed annotation record."""
    if not isinstance(record, dict):
        raise CirError(f"{where}: expected a JSON object per entry, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise CirError(f"{where}: entry is missing required key '{key}'")
