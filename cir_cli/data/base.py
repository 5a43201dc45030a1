"""The one data model every CIR dataset loads into.

A dataset file (cirr.py, fashioniq.py, ...) only parses its annotation layout into `CIRSplit`s;
everything downstream (training, validation, submission, `cir prepare` checks) works on this
model, so there are no per-dataset twins of the evaluation or training code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------ protocol

# What `DatasetSpec.summarize` receives: evaluation's `SplitResult`s (split, recall,
# subset_recall, map_at, tag_map), typed loosely because evaluation sits above this layer.
Results = Sequence[Any]


@dataclass(frozen=True)
class Submission:
    """`cir submit <dataset>`: the test server's files and where to upload them."""

    server: str
    # What to upload there (the closing hint `cir submit` prints).
    upload: str
    # (run folder, submission name, split, top names per query, subset top per query) ->
    # the written files: validated first, written atomically (cir_cli/submission.py).
    write: Callable[[Path, str, CIRSplit, Sequence[list[str]], Sequence[list[str]]], list[Path]]
    # The split the server scores; None = the recipe's data.test_split.
    split: str | None = None

    def split_for(self, test_split: str) -> str:
        return self.split or test_split


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to load it and its evaluation protocol, so code outside `data/` asks
    the spec (`get_dataset(split.dataset)`) instead of comparing dataset names."""

    name: str
    title: str  # how messages name it ("CIRR")
    splits: tuple[str, ...]
    # Empty for datasets evaluated as one set; otherwise one `CIRSplit` per category.
    categories: tuple[str, ...]
    layout: str
    load: Callable[[Path, str, Sequence[str] | None], list[CIRSplit]]
    # The annotation files `cir prepare` checks: [(category or "", (file, file))].
    files: Callable[[Path, str, Sequence[str] | None], list[tuple[str, tuple[Path, Path]]]]
    # The metric that picks the `best` checkpoint (eval.selection_metric overrides it).
    selection_metric: str
    # Recall@k over the whole gallery; () where only a per-query candidate set is ranked.
    recall_ks: tuple[int, ...]
    # The reported aggregates (the headline numbers and how they are averaged) from the
    # per-split results of one evaluation.
    summarize: Callable[[Results], dict[str, float]]
    # Joins per-category splits into one training set; None when `load` returns one split.
    merge: Callable[[Sequence[CIRSplit]], CIRSplit] | None = None
    # Whether the recipe's data.categories picks the categories (FashionIQ's dress types);
    # otherwise every category loads (GeneCIS) or there are none.
    recipe_categories: bool = False
    # The training caption policy when data.train_caption_policy is unset.
    train_caption_policy: str = "verbatim"
    # Queries carry two captions whose order is arbitrary (FashionIQ), so a method may
    # encode both orders (LinCIR's averaging, spec 1.5).
    caption_pairs: bool = False
    # The candidate re-ranking reference (spec reranking.md) covers this dataset; its stage-I
    # files are `<prefix>_top_<K>_<split>[_<category>].pt`. None: re-ranking refuses it.
    candidate_prefix: str | None = None
    # HTML report: per-category Recall@k columns with an average row (FashionIQ), and a
    # one-row headline table of (metric key, column head) pairs (CIRR).
    report_grid_ks: tuple[int, ...] = ()
    report_headline: tuple[tuple[str, str], ...] = ()
    # `cir submit <name>`; None when there is no test server.
    submission: Submission | None = None
    # `cir validate --save-rankings` also writes the official evaluator's input into the run
    # folder: (run folder, split, top names per query) -> the file.
    save_rankings: Callable[[Path, CIRSplit, Sequence[list[str]]], Path] | None = None
