"""Candidate lists: any first stage's top-K per query, the input of a re-ranking stage.

Our format (`cir validate/submit --save-candidates K`) is one JSON file per split in the run
folder, beside the run's manifest.json (which it also embeds as `source`):

    {"format": "cir-candidates", "version": 1, "dataset", "split", "subset", "k",
     "reference_removed", "gallery_size", "source": {...},
     "query_ids": [Q], "candidates": [Q x K names], "scores": [Q x K floats]}

The reference's stage-I files (`cirr_top_{K}_{split}.pt`, `fiq_top_{K}_{split}_{dress}.pt`,
spec reranking.md 4) import too: a torch.save dict whose `sorted_index_names` is a numpy
string array. They are read with `torch.load(weights_only=True)` and only numpy's array
reconstruction globals allow-listed (never weights_only=False). Their rows follow the
annotation order (no query ids): `target_names` (val) and `index_names` are checked against
the split, and the row count always.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir_cli.data import CIRSplit, get_dataset
from cir_cli.errors import CirError
from cir_cli.io import write_json_atomic

FORMAT = "cir-candidates"
VERSION = 1


@dataclass
class CandidateList:
    """Top-K gallery names per query of one split, best first (scores when known)."""

    dataset: str
    split: str
    subset: str
    query_ids: list[str]
    names: list[list[str]]
    scores: list[list[float]] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return min((len(row) for row in self.names), default=0)


def file_name(split: CIRSplit) -> str:
    """`candidates_<dataset>_<split>[_<subset>].json`."""
    parts = [split.dataset, split.split] + ([split.subset] if split.subset else [])
    return "candidates_" + "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts) + ".json"


def from_rankings(
    split: CIRSplit,
    names: list[list[str]],
    scores: list[list[float]] | None,
    k: int,
    source: dict[str, Any] | None = None,
) -> CandidateList:
    if any(len(row) < k for row in names):
        raise CirError(f"{split.label}: the ranking holds fewer than {k} candidates per query")
    return CandidateList(
        split.dataset,
        split.split,
        split.subset,
        [t.query_id for t in split.triplets],
        [list(row[:k]) for row in names],
        None if scores is None else [list(map(float, row[:k])) for row in scores],
        dict(source or {}),
    )


def write_candidates(path: Path, cands: CandidateList, split: CIRSplit) -> Path:
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": cands.dataset,
        "split": cands.split,
        "subset": cands.subset,
        "k": cands.k,
        "reference_removed": split.remove_reference,
        "gallery_size": len(split.gallery),
        "source": cands.source,
        "query_ids": cands.query_ids,
        "candidates": cands.names,
        "scores": cands.scores,
    }
    write_json_atomic(path, obj, indent=None)
    return path


# --------------------------------------------------------------------------------------------
# Reading


def _find_in_folder(folder: Path, split: CIRSplit) -> Path:
    ours = folder / file_name(split)
    if ours.is_file():
        return ours
    # The reference's names: cirr_top_200_val.pt, fiq_top_200_val_dress.pt.
    spec = get_dataset(split.dataset)
    prefix = spec.candidate_prefix or split.dataset
    tail = f"_{split.split}" + (f"_{split.subset}" if spec.categories else "")
    pattern = re.compile(rf"{prefix}_top_\d+{re.escape(tail)}\.pt")
    found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
    if not found:
        raise CirError(
            f"{folder}: no candidate list for {split.label} (expected {ours.name} or the "
            f"reference's {prefix}_top_<K>{tail}.pt)"
        )
    return found[-1]


def load_candidates(path: str | Path, split: CIRSplit) -> CandidateList:
    """The candidate list of `split` from a file or a folder of them (ours or the reference's),
    checked against the split: same dataset/split/subset, one row per query, names in the
    gallery."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = _find_in_folder(p, split)
    if not p.is_file():
        raise CirError(f"rerank.candidates: no such file or folder: {p}")
    cands = read_reference_topk(p, split) if p.suffix == ".pt" else _read_ours(p, split)
    _check_against(cands, split, p)
    return cands


def _read_ours(path: Path, split: CIRSplit) -> CandidateList:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CirError(f"{path}: not a readable candidate list ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CirError(f'{path}: not a cir candidate list (no "format": "{FORMAT}")')
    if obj.get("version") != VERSION:
        raise CirError(f"{path}: candidate list version {obj.get('version')!r}; expected 1")
    for key in ("dataset", "split", "query_ids", "candidates"):
        if key not in obj:
            raise CirError(f"{path}: candidate list is missing '{key}'")
    got = (obj["dataset"], obj["split"], obj.get("subset") or "")
    want = (split.dataset, split.split, split.subset)
    if got != want:
        raise CirError(
            f"{path}: candidates of {'/'.join(filter(None, got))}, but the recipe evaluates "
            f"{split.label}"
        )
    return CandidateList(
        obj["dataset"],
        obj["split"],
        obj.get("subset") or "",
        [str(q) for q in obj["query_ids"]],
        [[str(n) for n in row] for row in obj["candidates"]],
        obj.get("scores"),
        obj.get("source") or {},
    )


def _numpy_safe_globals() -> list:
    """numpy's array reconstruction globals, under numpy 2's and numpy 1's module names (the
    reference's files were written with numpy 1: `numpy.core.multiarray._reconstruct`)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: list = [_reconstruct, np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((_reconstruct, f"{module}._reconstruct"))
    # numpy >= 1.25 may pickle string dtypes by their class.
    for name in ("StrDType", "BytesDType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed.append(cls)
    return allowed


def load_reference_file(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with only numpy's string-array globals allowed."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        line = next((ln for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise CirError(
            f"{path}: refused: the file needs globals beyond numpy arrays ({line.strip()[:160]})"
        ) from None
    except Exception as exc:
        raise CirError(f"{path}: cannot read the top-K file ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CirError(f"{path}: expected the reference's top-K dict, got {type(obj).__name__}")
    return obj


def _as_name_rows(value: Any, path: Path) -> list[list[str]]:
    import numpy as np

    array = np.asarray(value)
    if array.ndim != 2 or array.dtype.kind not in "US":
        raise CirError(
            f"{path}: 'sorted_index_names' must be an N x K string array, got "
            f"{array.dtype} {array.shape}"
        )
    return [[str(n) for n in row] for row in array.tolist()]


def read_reference_topk(path: Path, split: CIRSplit) -> CandidateList:
    """A reference `cirr_top_*` / `fiq_top_*` file (spec 4) as a CandidateList of `split`."""
    obj = load_reference_file(path)
    if "sorted_index_names" not in obj:
        raise CirError(
            f"{path}: no 'sorted_index_names' entry (keys: {', '.join(map(str, obj))}); not a "
            "reference top-K file"
        )
    names = _as_name_rows(obj["sorted_index_names"], path)
    file_split = obj.get("split")
    if file_split is not None and str(file_split) != split.split:
        raise CirError(f"{path}: top-K of split {file_split!r}, recipe evaluates {split.label}")
    dress = obj.get("dress_types")
    if get_dataset(split.dataset).categories and dress is not None:
        dress_list = [dress] if isinstance(dress, str) else list(dress)
        if dress_list != [split.subset]:
            raise CirError(f"{path}: top-K of {dress_list}, recipe evaluates {split.label}")
    if len(names) != len(split.triplets):
        raise CirError(
            f"{path}: {len(names)} rows, but {split.label} has {len(split.triplets)} queries"
        )
    targets = obj.get("target_names")
    if targets is not None:
        ours = [t.target for t in split.triplets]
        if [str(t) for t in targets] != ours:
            raise CirError(
                f"{path}: 'target_names' differ from {split.label}'s targets in annotation "
                "order; the rows cannot be matched to the queries"
            )
    index_names = obj.get("index_names")
    if index_names is not None and set(map(str, index_names)) != set(split.gallery):
        raise CirError(f"{path}: 'index_names' is not {split.label}'s gallery")
    return CandidateList(
        split.dataset,
        split.split,
        split.subset,
        [t.query_id for t in split.triplets],
        names,
        None,
        {"reference_file": str(path)},
    )


def _check_against(cands: CandidateList, split: CIRSplit, path: Path) -> None:
    want = [t.query_id for t in split.triplets]
    if sorted(cands.query_ids) != sorted(want) or len(cands.names) != len(want):
        raise CirError(f"{path}: its queries are not {split.label}'s {len(want)} queries")
    if cands.scores is not None and [len(r) for r in cands.scores] != [len(r) for r in cands.names]:
        raise CirError(f"{path}: 'scores' and 'candidates' differ in shape")
    gallery = split.gallery_index
    for qid, row in zip(cands.query_ids, cands.names, strict=True):
        unknown = [n for n in row if n not in gallery]
        if unknown:
            raise CirError(f"{path}: query {qid}: candidate {unknown[0]!r} is not in the gallery")
    # Reorder to the split's query order.
    if cands.query_ids != want:
        at = {q: i for i, q in enumerate(cands.query_ids)}
        order = [at[q] for q in want]
        cands.names = [cands.names[i] for i in order]
        if cands.scores is not None:
            cands.scores = [cands.scores[i] for i in order]
        cands.query_ids = want
