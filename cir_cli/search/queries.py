"""Composed queries over an index: reading them, encoding them, ranking the gallery, recall,
and writing the results (CSV / JSONL)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cir_cli.errors import CirError
from cir_cli.io import read_text, write_text_atomic
from cir_cli.progress import progress_bar
from cir_cli.search.backends import rank
from cir_cli.search.encoding import autocast
from cir_cli.search.storage import Index, gallery_dim

if TYPE_CHECKING:
    import torch

    from cir_cli.methods.base import CIRMethod


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image and a modification text (+ an optional target)."""

    image: Path
    text: str
    target: Path | None = None


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    path: Path


@dataclass
class QueryResult:
    query: Query
    hits: list[Hit]
    # 1-based rank of the query's target within the returned hits (None: not found in top-k or
    # no target given).
    target_rank: int | None = None
    # 1-based rank of the target in the whole gallery (also beyond k); None without a target
    # or when the target is not in the index.
    gallery_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": str(self.query.image),
            "text": self.query.text,
            "results": [{"rank": h.rank, "score": h.score, "path": str(h.path)} for h in self.hits],
        }
        if self.query.target is not None:
            out["target"] = str(self.query.target)
            out["target_rank"] = self.target_rank
            out["target_rank_in_gallery"] = self.gallery_rank
        return out


def read_queries(path: str | os.PathLike[str]) -> list[Query]:
    """Queries from a CSV (columns image,text[,target]; header optional) or JSONL file
    (one {"image", "text"[, "target"]} object per line; a .json array of them works too).

    Relative image paths are resolved against the queries file's folder, so a file travels with
    the images it names.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CirError(f"queries file not found: {file}")
    base = file.resolve().parent
    rows: list[tuple[int, dict[str, Any]]] = []
    text = read_text(file, "queries file", encoding="utf-8-sig")
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        # A JSON array of {"image", "text"} objects (what json.dump of a list writes).
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CirError(f"{file}: not valid JSON: {exc}") from None
        for number, record in enumerate(records, 1):
            if not isinstance(record, dict):
                raise CirError(f"{file}: entry {number}: expected an object with image and text")
            rows.append((number, record))
    elif file.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CirError(f"{file}:{lineno}: not a JSON object per line: {exc}") from None
            if not isinstance(record, dict):
                raise CirError(f"{file}:{lineno}: expected a JSON object with image and text")
            rows.append((lineno, record))
    elif file.suffix.lower() in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
        reader = list(csv.reader(io.StringIO(text), delimiter=delimiter))
        header = ["image", "text", "target"]
        start = 0
        if reader and [c.strip().lower() for c in reader[0][:2]] == ["image", "text"]:
            header = [c.strip().lower() for c in reader[0]]
            start = 1
        for lineno, cells in enumerate(reader[start:], start + 1):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) < 2:
                raise CirError(f"{file}:{lineno}: expected image,text[,target], got {cells!r}")
            rows.append((lineno, dict(zip(header, cells, strict=False))))
    else:
        raise CirError(f"{file}: unknown queries format {file.suffix!r}; expected .csv or .jsonl")
    queries = []
    for lineno, record in rows:
        image, qtext = record.get("image"), record.get("text")
        if not isinstance(image, str) or not image.strip() or not isinstance(qtext, str):
            raise CirError(f"{file}:{lineno}: needs an 'image' path and a 'text' string")
        target = record.get("target")
        queries.append(
            Query(
                base / Path(image.strip()).expanduser(),
                qtext,
                base / Path(target.strip()).expanduser() if target and target.strip() else None,
            )
        )
    if not queries:
        raise CirError(f"{file}: no queries (expected image,text per line)")
    return queries


def check_query_images(queries: Sequence[Query]) -> None:
    """CirError naming the first missing query image (checked before any model work)."""
    for n, query in enumerate(queries, 1):
        if not query.image.is_file():
            where = f" (query {n})" if len(queries) > 1 else ""
            raise CirError(f"query image {query.image} not found{where}")


def encode_queries(
    model: CIRMethod, queries: Sequence[Query], batch_size: int = 32
) -> torch.Tensor:
    """Query features: `queries_from_representation(image_representation(pixels), texts)`."""
    import torch

    from cir_cli.data.images import open_image

    check_query_images(queries)
    out = []
    was_training = model.training
    model.eval()
    with (
        progress_bar("queries", len(queries)) as advance,
        torch.no_grad(),
        autocast(model),
    ):
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            pixels = torch.stack([model.preprocess(open_image(q.image)) for q in batch])
            reps = model.image_representation(pixels.to(model.device))
            out.append(model.queries_from_representation(reps, [q.text for q in batch]))
            advance(len(batch))
    model.train(was_training)
    return torch.cat(out)


def search(
    index: Index,
    model: CIRMethod,
    queries: Sequence[Query],
    k: int = 12,
    exclude_query: bool = False,
    backend: str = "auto",
    batch_size: int = 32,
) -> list[QueryResult]:
    """Rank the index's gallery for each query; the query image itself is dropped on request."""
    import torch

    if k < 1:
        raise CirError(f"-k {k}: expected a positive number of results")
    if backend == "auto" and index.ann_spec is not None:
        backend = "ann"  # built on purpose for a gallery too large for exact search
    ann_index = None
    if backend == "ann":
        if gallery_dim(index) != 1:
            raise CirError(f"--backend ann: {index.location} holds multi-vector features")
        ann_index = index.ann_index()
    features = encode_queries(model, queries, batch_size)
    # float16 storage is scored in float32 (CPU matmul has no fast float16 path).
    gallery = index.feature_tensor().to(model.device, torch.float32)
    exclude = None
    if exclude_query:
        exclude = torch.tensor([index.row_of(q.image) for q in queries], dtype=torch.long)
    indices, scores = rank(model, features, gallery, k, exclude, backend, ann_index)
    results = []
    for qi, query in enumerate(queries):
        rows = indices[qi].tolist()
        # An approximate index may find fewer than k items: its -1 padding is not a hit.
        hits = [
            Hit(r + 1, float(s), index.path_of(i))
            for r, (i, s) in enumerate(zip(rows, scores[qi].tolist(), strict=True))
            if i >= 0
        ]
        target_rank = None
        if query.target is not None:
            trow = index.row_of(query.target)
            if trow >= 0 and trow in rows:
                target_rank = rows.index(trow) + 1
        results.append(QueryResult(query, hits, target_rank, target_rank))
    _ranks_beyond_k(index, model, queries, features, gallery, exclude, results)
    return results


def _ranks_beyond_k(index, model, queries, features, gallery, exclude, results) -> None:
    """The gallery rank of targets outside the top k (one exact count per query, no sort)."""
    import torch

    from cir_cli.ranking import target_ranks

    todo = []
    for qi, (query, result) in enumerate(zip(queries, results, strict=True)):
        if query.target is None or result.target_rank is not None:
            continue
        trow = index.row_of(query.target)
        if trow < 0 or (exclude is not None and int(exclude[qi]) == trow):
            continue
        todo.append((qi, trow))
    if not todo:
        return
    rows = torch.tensor([qi for qi, _ in todo], dtype=torch.long)
    ranks = target_ranks(
        features[rows],
        gallery,
        torch.tensor([t for _, t in todo], dtype=torch.long),
        exclude=None if exclude is None else exclude[rows],
        score_fn=model.score,
    )
    for (qi, _), rank0 in zip(todo, ranks.tolist(), strict=True):
        results[qi].gallery_rank = int(rank0) + 1


def recall_at(results: Sequence[QueryResult], ks: Sequence[int]) -> dict[int, float]:
    """Recall@k in percent over the queries with a target (k <= the number of hits asked)."""
    labelled = [r for r in results if r.query.target is not None]
    if not labelled:
        return {}
    return {
        k: 100.0
        * sum(r.target_rank is not None and r.target_rank <= k for r in labelled)
        / len(labelled)
        for k in ks
    }


def write_results(results: Sequence[QueryResult], path: str | os.PathLike[str]) -> Path:
    """One row per query: .jsonl (objects as in --json) or .csv (image, text, [target,
    target_rank,] then path_1, score_1, ... path_k, score_k)."""
    out = Path(path).expanduser()
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        body = "".join(json.dumps(r.to_dict()) + "\n" for r in results)
        write_text_atomic(out, body)
        return out
    if suffix != ".csv":
        raise CirError(f"--output {out}: expected a .csv or .jsonl file name")
    k = max((len(r.hits) for r in results), default=0)
    labelled = any(r.query.target is not None for r in results)
    header = ["image", "text"] + (["target", "target_rank"] if labelled else [])
    for i in range(1, k + 1):
        header += [f"path_{i}", f"score_{i}"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        row: list[Any] = [str(r.query.image), r.query.text]
        if labelled:
            row += [str(r.query.target or ""), r.target_rank or ""]
        for h in r.hits:
            row += [str(h.path), f"{h.score:.6f}"]
        writer.writerow(row)
    write_text_atomic(out, buf.getvalue())
    return out
