"""Ranking query features against gallery features, in bounded memory.

Ordering (used by every function here, and what "rank" means throughout the toolkit):

* higher score first;
* equal scores are ordered by lower gallery index first.

The tie rule is applied exactly, so results never depend on the device, on ``chunk_size`` or on
how ``torch.topk`` happens to break ties (it is not stable). Everything works with integer
gallery indices; callers map indices to image names afterwards.

Queries are processed ``chunk_size`` rows at a time: peak memory is about
``chunk_size * N`` scores (plus a few boolean masks of that size), whatever the number of queries.
Inputs may live on CUDA; every returned tensor is on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""(query_chunk (q, ...), gallery (N, ...)) -> (q, N) similarity scores, higher = more similar."""

ProgressFn = Callable[[int], None]
"""Called after each chunk with the cumulative number of queries processed so far."""

# Rows whose top-k boundary is ambiguous (ties) are repaired this many at a time: the repair
# needs an int64 cumulative sum of shape (rows, N), and with degenerate features (e.g. all zeros)
# every row can be ambiguous, so doing all of them at once would defeat the chunking.
_TIE_FIX_ROWS = 64

# Gallery images per block in max_over_tokens_score; bounds the (q, block, T) intermediate.
_TOKEN_BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class RankResult:
    """Top-k result of :func:`rank_gallery`.

    Attributes:
        indices: (Q, L) int64 gallery indices, best first, on the CPU.
        scores: (Q, L) float32 scores matching ``indices``, on the CPU.
    """

    indices: Tensor
    scores: Tensor


def cosine_score(queries: Tensor, gallery: Tensor) -> Tensor:
    """Cosine similarity of already L2-normalised features: ``queries @ gallery.T``.

    Args:
        queries: (q, D) features.
        gallery: (N, D) features.

    Returns:
        (q, N) scores.
    """
    return queries @ gallery.T


def max_over_tokens_score(queries: Tensor, gallery: Tensor) -> Tensor:
    """Score against galleries with several tokens per image: max over tokens of the dot product.

    Args:
        queries: (q, D) features.
        gallery: (N, T, D) features, T tokens per gallery image.

    Returns:
        (q, N) scores, ``max_t queries[i] . gallery[j, t]``.
    """
    if gallery.dim() != 3:
        raise ValueError(f"gallery must be (N, T, D), got shape {tuple(gallery.shape)}")
    q = queries.shape[0]
    n, t, _ = gallery.shape
    out = queries.new_empty((q, n))
    # Blocks over the gallery so the (q, block, T) intermediate stays bounded for big galleries.
    block = max(1, _TOKEN_BLOCK_ELEMENTS // max(1, q * t))
    for start in range(0, n, block):
        part = gallery[start : start + block]
        out[:, start : start + part.shape[0]] = torch.einsum("qd,ntd->qnt", queries, part).amax(-1)
    return out


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_exclude(exclude: Tensor | None, num_queries: int, num_gallery: int) -> Tensor | None:
    """Validate ``exclude`` and return it as a CPU int64 tensor (or None)."""
    if exclude is None:
        return None
    exclude = exclude.detach().to("cpu", torch.long)
    if exclude.shape != (num_queries,):
        raise ValueError(f"exclude must have shape ({num_queries},), got {tuple(exclude.shape)}")
    if exclude.numel() and (exclude.min() < -1 or exclude.max() >= num_gallery):
        raise ValueError(f"exclude values must be -1 or in [0, {num_gallery})")
    return exclude


def _chunk_scores(score_fn: ScoreFn, query_chunk: Tensor, gallery: Tensor) -> Tensor:
    """Score one query chunk and check the result is usable for an exact total order."""
    scores = score_fn(query_chunk, gallery)
    expected = (query_chunk.shape[0], gallery.shape[0])
    if tuple(scores.shape) != expected:
        raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {expected}")
    # NaN compares false with everything, so no ordering (nor rank) would be well defined.
    if torch.isnan(scores).any():
        raise ValueError("score_fn returned NaN scores")
    return scores


def _stable_topk(scores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Exact top-``m`` per row under (higher score, then lower index) ordering.

    ``torch.topk`` is fast but picks an arbitrary subset among values tied at the boundary, so
    rows whose boundary value has more copies than fit are repaired: everything strictly above
    the boundary is kept, plus the lowest-indexed boundary ties. The kept set is then sorted.
    """
    num_rows, n = scores.shape
    if m == 0 or num_rows == 0:
        empty = torch.empty((num_rows, m), dtype=torch.long, device=scores.device)
        return scores.new_empty((num_rows, m)), empty
    vals, idx = torch.topk(scores, m, dim=1, largest=True, sorted=False)
    if m < n:
        boundary = vals.min(dim=1, keepdim=True).values
        n_above = (scores > boundary).sum(dim=1)
        n_equal = (scores == boundary).sum(dim=1)
        ambiguous = (n_above + n_equal > m).nonzero().squeeze(1)
        for start in range(0, ambiguous.numel(), _TIE_FIX_ROWS):
            rows = ambiguous[start : start + _TIE_FIX_ROWS]
            sub = scores[rows]
            bound = boundary[rows]
            need = (m - n_above[rows]).unsqueeze(1)
            is_equal = sub == bound
            keep = (sub > bound) | (is_equal & (is_equal.cumsum(dim=1) <= need))
            # Exactly m True per row; nonzero is row-major, so columns come out per row in order.
            fixed = keep.nonzero()[:, 1].view(rows.numel(), m)
            idx[rows] = fixed
            vals[rows] = sub.gather(1, fixed)
    # Lexicographic sort: by index first, then a stable sort by score keeps index order in ties.
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    return vals, idx


def rank_gallery(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude: Tensor | None = None,
    score_fn: ScoreFn | None = None,
    chunk_size: int = 1024,
    progress: ProgressFn | None = None,
) -> RankResult:
    """Top-``k`` gallery items for each query, under the module's stable ordering.

    Args:
        queries: (Q, ...) query features (``(Q, D)`` for the default cosine score).
        gallery: (N, ...) gallery features.
        k: number of results wanted per query (>= 1).
        exclude: optional (Q,) int64 gallery index to remove for each query, -1 for none. CIRR
            removes the reference image this way; FashionIQ excludes nothing.
        score_fn: see :data:`ScoreFn`; default :func:`cosine_score`.
        chunk_size: queries scored at once (memory is about ``chunk_size * N`` scores).
        progress: see :data:`ProgressFn`.

    Returns:
        A :class:`RankResult` with L = ``min(k, N_eff)`` columns, where ``N_eff`` is N, minus one
        if any query has an exclusion (so every row has the same length). Excluded items never
        appear.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_chunk_size(chunk_size)
    score_fn = score_fn or cosine_score
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    exclude = _check_exclude(exclude, num_queries, num_gallery)
    has_exclusion = exclude is not None and bool((exclude >= 0).any())
    length = min(k, num_gallery - int(has_exclusion))
    # One spare candidate, so dropping the excluded item (if it made the cut) still leaves L.
    m = length + int(has_exclusion)

    all_indices: list[Tensor] = []
    all_scores: list[Tensor] = []
    for start in range(0, num_queries, chunk_size):
        chunk = queries[start : start + chunk_size].to(gallery.device)
        with torch.no_grad():
            scores = _chunk_scores(score_fn, chunk, gallery)
            vals, idx = _stable_topk(scores, m)
        vals, idx = vals.float().cpu(), idx.cpu()
        if has_exclusion:
            assert exclude is not None
            excl = exclude[start : start + chunk.shape[0]].unsqueeze(1)
            keep = idx != excl
            # Rows whose excluded item is not among the candidates drop the spare (last) one.
            keep[keep.all(dim=1), -1] = False
            # Explicit row count: view(-1, 0) is ambiguous when L is 0 (gallery of one).
            idx = idx[keep].view(excl.shape[0], length)
            vals = vals[keep].view(excl.shape[0], length)
        all_indices.append(idx)
        all_scores.append(vals)
        if progress is not None:
            progress(start + chunk.shape[0])

    if not all_indices:
        return RankResult(
            indices=torch.empty((0, length), dtype=torch.long),
            scores=torch.empty((0, length), dtype=torch.float32),
        )
    return RankResult(indices=torch.cat(all_indices), scores=torch.cat(all_scores))


def target_ranks(
    queries: Tensor,
    gallery: Tensor,
    target_ids: Tensor,
    exclude: Tensor | None = None,
    score_fn: ScoreFn | None = None,
    chunk_size: int = 1024,
    progress: ProgressFn | None = None,
) -> Tensor:
    """0-based rank of each query's target under the module's stable ordering, without sorting.

    The rank is the number of gallery items with a strictly higher score, plus the items with an
    equal score and a lower index, not counting the query's excluded item. It equals the target's
    position in the full :func:`rank_gallery` list, so ``rank < k`` is an exact recall@k hit for
    any k (see ``metrics.recall_from_ranks``).

    Args:
        queries: (Q, ...) query features.
        gallery: (N, ...) gallery features.
        target_ids: (Q,) int64 gallery index of each query's target, in [0, N).
        exclude: optional (Q,) int64 index to remove per query, -1 for none; must differ from
            the target (a removed target has no rank).
        score_fn: see :data:`ScoreFn`; default :func:`cosine_score`.
        chunk_size: queries scored at once.
        progress: see :data:`ProgressFn`.

    Returns:
        (Q,) int64 ranks on the CPU.
    """
    _check_chunk_size(chunk_size)
    score_fn = score_fn or cosine_score
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    target_ids = target_ids.detach().to("cpu", torch.long)
    if target_ids.shape != (num_queries,):
        raise ValueError(
            f"target_ids must have shape ({num_queries},), got {tuple(target_ids.shape)}"
        )
    if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= num_gallery):
        raise ValueError(f"target_ids must be in [0, {num_gallery})")
    exclude = _check_exclude(exclude, num_queries, num_gallery)
    if exclude is not None and bool((exclude == target_ids).any()):
        raise ValueError("a query's excluded gallery index equals its target")

    ranks: list[Tensor] = []
    for start in range(0, num_queries, chunk_size):
        chunk = queries[start : start + chunk_size].to(gallery.device)
        q = chunk.shape[0]
        tgt = target_ids[start : start + q].to(gallery.device).unsqueeze(1)
        with torch.no_grad():
            scores = _chunk_scores(score_fn, chunk, gallery)
            # Read the target score from the same matrix, so the comparison is bit-consistent.
            tgt_score = scores.gather(1, tgt)
            columns = torch.arange(num_gallery, device=scores.device).unsqueeze(0)
            before = (scores > tgt_score) | ((scores == tgt_score) & (columns < tgt))
            if exclude is not None:
                excl = exclude[start : start + q].to(gallery.device)
                rows = (excl >= 0).nonzero().squeeze(1)
                before[rows, excl[rows]] = False
            ranks.append(before.sum(dim=1).cpu())
        if progress is not None:
            progress(start + q)
    if not ranks:
        return torch.empty((0,), dtype=torch.long)
    return torch.cat(ranks)


def rank_within_groups(
    queries: Tensor,
    gallery: Tensor,
    groups: Tensor,
    exclude: Tensor | None = None,
    score_fn: ScoreFn | None = None,
    chunk_size: int = 1024,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Order each query's group members (CIRR subset protocol) by the module's stable ordering.

    Scores come from the same full ``score_fn(query_chunk, gallery)`` call as
    :func:`rank_gallery`, so the order within a group matches the order of those members in the
    full ranking.

    Args:
        queries: (Q, ...) query features.
        gallery: (N, ...) gallery features.
        groups: (Q, G) int64 gallery indices of each query's group, -1 as padding. For CIRR this
            is ``img_set.members``; the reference is removed here via ``exclude`` or beforehand.
        exclude: optional (Q,) int64 index removed from each group, -1 for none.
        score_fn: see :data:`ScoreFn`; default :func:`cosine_score`.
        chunk_size: queries scored at once.
        progress: see :data:`ProgressFn`.

    Returns:
        (Q, G) int64 group members, best first, removed and padding entries (-1) moved to the
        end of each row. Duplicate members within a row are kept as given.
    """
    _check_chunk_size(chunk_size)
    score_fn = score_fn or cosine_score
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    groups = groups.detach().to("cpu", torch.long)
    if groups.dim() != 2 or groups.shape[0] != num_queries:
        raise ValueError(f"groups must have shape ({num_queries}, G), got {tuple(groups.shape)}")
    if groups.numel() and (groups.min() < -1 or groups.max() >= num_gallery):
        raise ValueError(f"groups values must be -1 or in [0, {num_gallery})")
    exclude = _check_exclude(exclude, num_queries, num_gallery)
    groups = groups.clone()
    if exclude is not None:
        groups[(groups == exclude.unsqueeze(1)) & (groups >= 0)] = -1

    ordered: list[Tensor] = []
    for start in range(0, num_queries, chunk_size):
        chunk = queries[start : start + chunk_size].to(gallery.device)
        members = groups[start : start + chunk.shape[0]]
        valid = members >= 0
        with torch.no_grad():
            scores = _chunk_scores(score_fn, chunk, gallery)
            member_scores = scores.gather(1, members.clamp(min=0).to(scores.device)).cpu()
        # Padding must sort after every real member, even one scored -inf: sort on
        # (invalid, -score, index), least significant key first, each sort stable.
        key_idx = torch.where(valid, members, torch.full_like(members, num_gallery))
        key_idx, order = key_idx.sort(dim=1, stable=True)
        member_scores = member_scores.gather(1, order)
        valid = valid.gather(1, order)
        _, order2 = member_scores.sort(dim=1, descending=True, stable=True)
        key_idx, valid = key_idx.gather(1, order2), valid.gather(1, order2)
        _, order3 = (~valid).to(torch.uint8).sort(dim=1, stable=True)
        key_idx, valid = key_idx.gather(1, order3), valid.gather(1, order3)
        ordered.append(torch.where(valid, key_idx, torch.full_like(key_idx, -1)))
        if progress is not None:
            progress(start + chunk.shape[0])
    if not ordered:
        return torch.empty((0, groups.shape[1]), dtype=torch.long)
    return torch.cat(ordered)
