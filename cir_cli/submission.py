"""Test-server submission files for CIRR (two JSON files) and CIRCO (one JSON file).

Neither server gives useful feedback on a malformed upload, and a CIRR upload needs a captcha,
so every rule the servers state (or that their example files follow) is checked here before a
file is written. Files are written atomically, and a failed validation writes nothing.

CIRR (Test-split_server.md, spec section 6):
  recall:        {"version": "rc2", "metric": "recall", "<pairid>": [50 names], ...}
  recall_subset: {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names], ...}
CIRCO: {"<query id>": [50 unique image ids], ...}

The writers take plain values (a split is read only through `QuerySet`); which dataset writes
which files is the dataset's protocol (`DatasetSpec.submission` in cir_cli/data/).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cir_cli.errors import CirError
from cir_cli.io import atomic_path

CIRR_VERSION = "rc2"
CIRR_RECALL_K = 50
CIRR_SUBSET_K = 3
CIRCO_K = 50
# The server says "Maximum 5MB" without defining MB; the decimal reading is the stricter one.
MAX_SUBMISSION_BYTES = 5_000_000
_META_KEYS = ("version", "metric")
# How many offending keys a message lists: enough to spot a pattern, short enough for one line.
_SHOW = 5


class Query(Protocol):
    """One test query as the CIRR files need it (a `cir_cli.data.Triplet`)."""

    @property
    def query_id(self) -> str: ...
    @property
    def reference(self) -> str: ...
    @property
    def group(self) -> tuple[str, ...]: ...


class QuerySet(Protocol):
    """The test split as the CIRR files need it (a `cir_cli.data.CIRSplit`)."""

    @property
    def label(self) -> str: ...
    @property
    def triplets(self) -> Sequence[Query]: ...
    @property
    def gallery_index(self) -> Mapping[str, int]: ...


def _sample(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:_SHOW])
    return shown + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _serialise(obj: Mapping[str, Any]) -> str:
    # Compact like the official examples: indent=2 pushes a full CIRR recall file over 5 MB.
    return json.dumps(obj, ensure_ascii=False)


def _check_size(text: str, what: str) -> None:
    size = len(text.encode("utf-8"))
    if size >= MAX_SUBMISSION_BYTES:
        raise CirError(
            f"{what}: serialised size is {size:,} bytes; the server accepts files under "
            f"{MAX_SUBMISSION_BYTES:,} bytes (5 MB)"
        )


def _check_keys(expected: Sequence[str], got: Collection[str], what: str) -> None:
    """Exactly one entry per query: report missing and extra keys together."""
    want = set(expected)
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} query id(s) missing, e.g. {_sample(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {_sample(extra)}")
        raise CirError(
            f"{what}: {'; '.join(parts)}; expected exactly one entry per test query "
            f"({len(expected)} in all)"
        )


def _check_list(value: Any, k: int, what: str, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise CirError(f"{what}: entry {key!r} is a {type(value).__name__}; expected a list")
    if len(value) != k:
        raise CirError(f"{what}: entry {key!r} has {len(value)} names; expected exactly {k}")
    seen: set[Any] = set()
    for item in value:
        # Anything but a name or an id is a bug upstream; unhashable items would crash below.
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise CirError(f"{what}: entry {key!r} holds {item!r}; expected image names or ids")
        if item in seen:
            raise CirError(f"{what}: entry {key!r} lists {item!r} twice; names must be unique")
        seen.add(item)
    return value


# ----------------------------------------------------------------------------------------- CIRR


def _cirr_queries(split: QuerySet) -> dict[str, Query]:
    queries: dict[str, Query] = {}
    for t in split.triplets:
        if t.query_id in queries:
            raise CirError(f"{split.label}: query id {t.query_id!r} occurs twice in the split")
        queries[t.query_id] = t
    return queries


def _subset_candidates(t: Query, label: str) -> tuple[str, ...]:
    if not t.group:
        raise CirError(
            f"{label}: query {t.query_id!r} has no image group; the recall_subset file needs "
            "CIRR's img_set.members"
        )
    return tuple(m for m in t.group if m != t.reference)


def build_cirr_submission(
    split: QuerySet,
    top50: dict[str, list[str]],
    top3: dict[str, list[str]],
    version: str = CIRR_VERSION,
) -> tuple[dict, dict]:
    """Assemble the recall and recall_subset dicts in the split's query order.

    `top50`/`top3` map pairid -> ranked names (reference already removed); longer rankings are
    cut to 50/3 because the server only reads that many. The result is not validated here:
    `write_cirr_submission` does that, so a caller can inspect a faulty build first.
    """
    recall: dict[str, Any] = {"version": version, "metric": "recall"}
    subset: dict[str, Any] = {"version": version, "metric": "recall_subset"}
    for t in split.triplets:
        for ranks, out, k, what in (
            (top50, recall, CIRR_RECALL_K, "top-50 ranking"),
            (top3, subset, CIRR_SUBSET_K, "top-3 subset ranking"),
        ):
            if t.query_id not in ranks:
                raise CirError(f"{split.label}: the {what} has no entry for query {t.query_id!r}")
            out[t.query_id] = list(ranks[t.query_id][:k])
    return recall, subset


def _check_meta(sub: Mapping[str, Any], metric: str, version: str, what: str) -> None:
    for key, want in (("version", version), ("metric", metric)):
        if key not in sub:
            raise CirError(f"{what}: missing the '{key}' entry; expected \"{key}\": {want!r}")
        if sub[key] != want:
            raise CirError(f"{what}: '{key}' is {sub[key]!r}; expected {want!r}")


def _validate_cirr(
    split: QuerySet, recall: Mapping[str, Any], recall_subset: Mapping[str, Any], version: str
) -> tuple[str, str]:
    """Validate both dicts and return their serialised texts (so the writer dumps only once)."""
    queries = _cirr_queries(split)
    expected = list(queries)
    gallery = split.gallery_index
    texts = []
    for sub, metric in ((recall, "recall"), (recall_subset, "recall_subset")):
        what = f"CIRR {metric} submission"
        if not isinstance(sub, Mapping):
            raise CirError(f"{what}: expected a JSON object, got {type(sub).__name__}")
        _check_meta(sub, metric, version, what)
        _check_keys(expected, [k for k in sub if k not in _META_KEYS], what)
        for qid, t in queries.items():
            if metric == "recall":
                names = _check_list(sub[qid], CIRR_RECALL_K, what, qid)
                outside = [n for n in names if n not in gallery]
                allowed = "in the test gallery"
            else:
                names = _check_list(sub[qid], CIRR_SUBSET_K, what, qid)
                group = set(_subset_candidates(t, split.label)) | {t.reference}
                outside = [n for n in names if n not in group]
                allowed = f"in the query's image group {list(t.group)}"
            if t.reference in names:
                raise CirError(
                    f"{what}: entry {qid!r} contains its reference image {t.reference!r}; "
                    "rankings must exclude the reference"
                )
            if outside:
                raise CirError(f"{what}: entry {qid!r} lists {_sample(outside)}, not {allowed}")
        text = _serialise(sub)
        _check_size(text, what)
        texts.append(text)
    return texts[0], texts[1]


def validate_cirr_submission(
    split: QuerySet,
    recall: dict,
    recall_subset: dict,
    *,
    version: str = CIRR_VERSION,
) -> None:
    """Raise a one-line CirError unless both dicts would pass the CIRR server's checks.

    Rules: version/metric entries; exactly one key per test query; recall lists hold 50 unique
    gallery names, subset lists 3 unique names of the query's group; neither holds the
    reference; each serialised file is under 5 MB.
    """
    _validate_cirr(split, recall, recall_subset, version)


def _check_name(name: str) -> None:
    # The name becomes part of a file name; a separator would silently write elsewhere.
    if not name or not name.strip():
        raise CirError("submission name is empty; expected a short tag such as 'combiner-bi'")
    bad = {"/", "\\", "\0", os.sep} | ({os.altsep} if os.altsep else set())
    if any(c in name for c in bad):
        raise CirError(
            f"submission name {name!r} contains a path separator; expected a plain tag "
            "(the output folder is given separately)"
        )


def write_cirr_submission(
    out_dir: Path,
    name: str,
    recall: dict,
    recall_subset: dict,
    split: QuerySet,
    *,
    version: str = CIRR_VERSION,
) -> tuple[Path, Path]:
    """Validate, then write recall_submission_{name}.json and recall_subset_submission_{name}.json.

    Both files are written to temporaries first and renamed only when both writes succeeded,
    so a failure never leaves a half-written or unpaired file behind.
    """
    _check_name(name)
    recall_text, subset_text = _validate_cirr(split, recall, recall_subset, version)
    out_dir = Path(out_dir)
    recall_path = out_dir / f"recall_submission_{name}.json"
    subset_path = out_dir / f"recall_subset_submission_{name}.json"
    with atomic_path(recall_path) as tmp_recall, atomic_path(subset_path) as tmp_subset:
        _write_text(tmp_recall, recall_text)
        _write_text(tmp_subset, subset_text)
    return recall_path, subset_path


def _write_text(path: Path, text: str) -> None:
    path.write_text(text + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- CIRCO


def _circo_id(value: Any, what: str, key: str) -> int:
    """CIRCO image ids are COCO ids; the official examples write them as JSON integers."""
    if isinstance(value, bool):
        raise CirError(f"{what}: entry {key!r} holds {value!r}; expected integer image ids")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise CirError(f"{what}: entry {key!r} holds {value!r}; expected integer image ids")


def _normalise_circo(query_ids: Sequence[str], ranking: Mapping[str, Any]) -> dict[str, list[int]]:
    what = "CIRCO submission"
    if not isinstance(ranking, Mapping):
        raise CirError(f"{what}: expected a JSON object, got {type(ranking).__name__}")
    expected = [str(q) for q in query_ids]
    if len(set(expected)) != len(expected):
        raise CirError(f"{what}: the query id list contains duplicates")
    _check_keys(expected, [str(k) for k in ranking], what)
    by_str = {str(k): v for k, v in ranking.items()}
    out: dict[str, list[int]] = {}
    for qid in expected:
        ids = [_circo_id(v, what, qid) for v in _check_list(by_str[qid], CIRCO_K, what, qid)]
        # "12" and 12 are the same image once the server parses them.
        _check_list(ids, CIRCO_K, what, qid)
        out[qid] = ids
    return out


def validate_circo_submission(query_ids: Sequence[str], ranking: dict) -> None:
    """Raise a one-line CirError unless `ranking` has 50 unique image ids for every query id.

    No keys beyond the query ids are allowed, and the CIRCO server rejects duplicate ids.
    """
    _normalise_circo(query_ids, ranking)


def write_circo_submission(path: Path, ranking: dict, query_ids: Sequence[str]) -> Path:
    """Validate, then write the CIRCO submission atomically with integer ids in query order."""
    text = _serialise(_normalise_circo(query_ids, ranking))
    path = Path(path)
    with atomic_path(path) as tmp:
        _write_text(tmp, text)
    return path


# ------------------------------------------------------------------------------------- loading


def load_submission(path: Path | str) -> dict:
    """Read a submission JSON object; a missing or malformed file is a one-line CirError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CirError(f"{path}: cannot read submission file ({exc.strerror or exc})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CirError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(obj, dict):
        raise CirError(
            f"{path}: expected a JSON object of query id -> ranking, got {type(obj).__name__}"
        )
    return obj


# The public surface (README "Python API"); tests/test_public_api.py imports each name.
__all__ = [
    "build_cirr_submission",
    "load_submission",
    "validate_circo_submission",
    "validate_cirr_submission",
    "write_circo_submission",
    "write_cirr_submission",
]
