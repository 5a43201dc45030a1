"""Ranking backends: exact torch (ranking.rank_gallery), exact faiss, and the approximate
faiss index of the index folder (search/ann.py), all in the toolkit's order.

Ranking is exact by default: torch matmul + top-k with the toolkit's tie rule (ranking.py). An
exact faiss flat index is available (`--backend faiss`, optional dependency) and returns the
same list, but it is not the default: building it per search costs more than the whole torch
ranking (see `rank` and benchmarks/bench_search.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cir_cli.errors import CirError

if TYPE_CHECKING:
    import torch

    from cir_cli.methods.base import CIRMethod

# Extra faiss candidates re-scored with torch, so float differences between the two libraries at
# the top-k boundary do not change which items are returned.
_FAISS_MARGIN = 32
# Bound on the (queries, candidates, D) float32 gather that re-scores faiss candidates (4 MiB).
_FAISS_BATCH_ELEMENTS = 1 << 20


def _uses_inner_product(model: CIRMethod) -> bool:
    from cir_cli.methods.base import CIRMethod

    return type(model).score is CIRMethod.score


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def rank_faiss(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    index: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product with faiss, in the toolkit's order (higher score, lower index).

    Without `index` an exact flat index is built, and the result equals ranking.rank_gallery
    unless more than the margin of items tie with the k-th score to the last float bit. With a
    prebuilt `index` (an approximate one, search/ann.py) the candidates are whatever it finds.
    faiss proposes k + margin candidates per query; they are re-scored with torch and ordered
    by the tie rule. Queries go through in batches so the (batch, m, D) re-scoring gather stays
    bounded (_FAISS_BATCH_ELEMENTS), whatever the number of queries. Approximate indexes may
    find fewer than m candidates: the missing ones are -1 with score -inf, sorted last.
    """
    import torch

    g = gallery.detach().cpu()
    if g.dtype != torch.float32:
        g = g.float()
    n, d = g.shape
    has_exclusion = exclude is not None and bool((exclude >= 0).any())
    length = min(k, n - int(has_exclusion))
    m = min(n, k + 1 + _FAISS_MARGIN)
    if index is None:
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(g.numpy()))
    q_all = queries.detach().cpu().float()
    batch = max(1, _FAISS_BATCH_ELEMENTS // (m * d))
    out_idx: list[torch.Tensor] = []
    out_scores: list[torch.Tensor] = []
    for start in range(0, q_all.shape[0], batch):
        q = q_all[start : start + batch]
        _, found = index.search(np.ascontiguousarray(q.numpy()), m)
        # Candidates in index order (-1 last), then a stable sort by score: (higher, lower index).
        cand = torch.from_numpy(found).long()
        missing = cand < 0
        cand = torch.where(missing, torch.full_like(cand, n), cand).sort(dim=1).values
        missing = cand >= n
        rows = g[cand.clamp(max=n - 1)]
        scores = torch.einsum("qd,qmd->qm", q, rows)
        del rows
        scores[missing] = float("-inf")
        cand[missing] = -1
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        cand = cand.gather(1, order)
        if has_exclusion:
            assert exclude is not None
            keep = cand != exclude[start : start + q.shape[0]].view(-1, 1)
            # Rows whose excluded item is not among the candidates drop their last one instead.
            keep[keep.all(dim=1), -1] = False
            cand = cand[keep].view(q.shape[0], m - 1)
            scores = scores[keep].view(q.shape[0], m - 1)
        out_idx.append(cand[:, :length])
        out_scores.append(scores[:, :length])
    if not out_idx:
        return torch.empty((0, length), dtype=torch.long), torch.empty((0, length))
    return torch.cat(out_idx), torch.cat(out_scores)


def rank(
    model: CIRMethod,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
    ann_index: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, scores) of the top-k gallery rows per query, best first.

    backend "ann": the prebuilt approximate faiss index `ann_index` (search/ann.py) proposes
    candidates, re-scored exactly; results are approximate (see benchmarks/bench_rank.py).

    backend "torch": ranking.rank_gallery with the method's score (exact, stable). "faiss":
    rank_faiss (exact flat index; inner-product methods only; faiss must be installed). "auto"
    is torch: a `cir search` process would have to build the faiss index on every call, and
    that alone costs more than torch's matmul + top-k over the memory-mapped features
    (benchmarks/bench_search.py: 100k x 256-d, one query, 1 thread: torch 31 ms, faiss 231 ms
    per search, 14 ms with a prebuilt index; at 100 queries torch is faster even prebuilt).
    """
    from cir_cli.ranking import rank_gallery

    if backend not in ("auto", "torch", "faiss", "ann"):
        raise CirError(f"--backend {backend!r}: expected auto, torch, faiss or ann")
    if backend == "ann":
        if ann_index is None:
            raise CirError("--backend ann: the index has no approximate index (cir index --ann)")
        return rank_faiss(queries, gallery, k, exclude, index=ann_index)
    if backend == "faiss":
        if not faiss_available():
            raise CirError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
        if gallery.dim() != 2 or not _uses_inner_product(model):
            raise CirError(f"--backend faiss: method {model.name} does not score by inner product")
        return rank_faiss(queries, gallery, k, exclude)
    result = rank_gallery(queries, gallery, k, exclude=exclude, score_fn=model.score)
    return result.indices, result.scores
