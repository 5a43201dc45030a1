"""Ranking query features against gallery features, in bounded memory.

Ordering (used by every function here, and what "rank" means throughout the toolkit):

* higher score first;
* equal scores are ordered by lower gallery index first.

The tie rule is applied exactly, so results never depend on the device, on ``chunk_size`` or on
how ``torch.topk`` happens to break ties (it is not stable). Everything works with integer
gallery indices; callers map indices to image names afterwards.

Queries are processed ``chunk_size`` rows at a time: peak memory is about ``chunk_size * N``
scores plus bounded temporaries (``_BLOCK_ELEMENTS``), whatever the number of queries. Each chunk
is scored once, for the top-k, the target ranks and the group orders together (:func:`rank_split`).
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

# Full-width temporaries (tie repairs, counts of a target's rank outside the top-k) are made
# for blocks of rows of at most this many elements: an int64 cumulative sum of a whole chunk
# would cost 2x the score matrix, and with degenerate features (e.g. all zeros) every row can
# need a repair, so doing all rows at once would defeat the chunking.
_BLOCK_ELEMENTS = 1 << 20
# Booleans are counted in uint8 lanes of this many (see _count): 255 ones still fit.
_LANE = 255

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
    """Score one query chunk and check its shape (NaN is checked on the top-k, see below)."""
    scores = score_fn(query_chunk, gallery)
    expected = (query_chunk.shape[0], gallery.shape[0])
    if tuple(scores.shape) != expected:
        raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {expected}")
    return scores


def _check_no_nan(values: Tensor) -> None:
    # NaN compares false with everything, so no ordering (nor rank) would be well defined.
    # torch.topk orders NaN above every number, so a row holding a NaN anywhere has one in its
    # top-k values: checking those replaces a full pass (and a full boolean copy) of the chunk.
    if torch.isnan(values).any():
        raise ValueError("score_fn returned NaN scores")


def _row_block(num_columns: int) -> int:
    """Rows per block for the full-width temporaries (comparisons, counts) of rare repairs."""
    return max(1, _BLOCK_ELEMENTS // max(1, num_columns))


def _stable_topk(scores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Exact top-``m`` per row under (higher score, then lower index) ordering, sorted.

    ``torch.topk`` is fast but picks an arbitrary subset among values tied at the boundary. It
    is asked for ``m + 1`` values: its *values* are exact whatever the tie handling, so a row
    whose ``(m+1)``-th value is strictly below its ``m``-th has a unique top-``m`` set, found
    with no further pass over the row. Only rows where the two are equal (a tie straddles the
    cut) are repaired: everything strictly above the boundary is kept, plus the lowest-indexed
    boundary ties, in blocks of rows so no full-chunk temporary is made. The values come back
    sorted; only rows with equal neighbours (or repaired rows) are re-sorted by index.
    """
    num_rows, n = scores.shape
    if m == 0 or num_rows == 0:
        empty = torch.empty((num_rows, m), dtype=torch.long, device=scores.device)
        return scores.new_empty((num_rows, m)), empty
    if m >= n:
        _check_no_nan(scores)
        return _sort_ties(scores.clone(), torch.arange(n, device=scores.device).repeat(num_rows, 1))
    wide_vals, wide_idx = torch.topk(scores, m + 1, dim=1, largest=True, sorted=True)
    _check_no_nan(wide_vals)
    vals, idx = wide_vals[:, :m].contiguous(), wide_idx[:, :m].contiguous()
    ambiguous = (wide_vals[:, m - 1] == wide_vals[:, m]).nonzero().squeeze(1)
    block = _row_block(n)
    for start in range(0, ambiguous.numel(), block):
        rows = ambiguous[start : start + block]
        sub = scores[rows]
        bound = vals[rows, m - 1 :]
        above = sub > bound
        need = (m - above.sum(dim=1)).unsqueeze(1)
        is_equal = sub == bound
        keep_sub = above | (is_equal & (is_equal.cumsum(dim=1) <= need))
        # Exactly m True per row; nonzero is row-major, so columns come out per row in order.
        fixed = keep_sub.nonzero()[:, 1].view(rows.numel(), m)
        idx[rows] = fixed
        vals[rows] = sub.gather(1, fixed)
    return _sort_ties(vals, idx)


def _sort_ties(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by (higher score, lower index). ``vals`` must already be descending
    except on rows repaired or unsorted, which the tie check below catches too: only rows with
    two equal neighbours or an ascent are re-sorted (lexicographically, by two stable sorts)."""
    if vals.shape[1] < 2:
        return vals, idx
    step = vals[:, 1:] - vals[:, :-1]
    unsure = ((step >= 0) | torch.isnan(step)).any(dim=1).nonzero().squeeze(1)
    if unsure.numel():
        sub_idx, order = idx[unsure].sort(dim=1)
        sub_vals = vals[unsure].gather(1, order)
        sub_vals, order = sub_vals.sort(dim=1, descending=True, stable=True)
        vals[unsure] = sub_vals
        idx[unsure] = sub_idx.gather(1, order)
    return vals, idx


def _row_slices(rows: Tensor, block: int) -> list[tuple[slice, Tensor | slice]]:
    """(positions in ``rows``, row selector) per block; a slice when the rows are consecutive,
    so the block is a view of the score matrix rather than a copy of it."""
    out: list[tuple[slice, Tensor | slice]] = []
    for start in range(0, rows.numel(), block):
        part = rows[start : start + block]
        first, last = int(part[0]), int(part[-1])
        consecutive = last - first + 1 == part.numel()
        out.append((slice(start, start + part.numel()), slice(first, last + 1) if consecutive
                    else part))
    return out


def _count(compare: Callable, sub: Tensor, t: Tensor, buf: Tensor) -> Tensor:
    """Per row, how many ``compare(sub, t)`` are true, without an int64 copy of the mask.

    Summing a bool tensor makes torch cast it to int64 (8x its size, and slower than the
    comparison itself). The mask is written into a zero-padded buffer whose rows split into
    lanes of _LANE bools; each lane is summed in uint8 (cannot overflow), then the lanes.
    """
    rows, n = sub.shape
    view = buf[:rows]
    compare(sub, t, out=view[:, :n])
    return view.view(rows, -1, _LANE).sum(dim=2, dtype=torch.uint8).sum(dim=1)


def _count_before(
    scores: Tensor, rows: Tensor, targets: Tensor, exclude: Tensor | None
) -> Tensor:
    """For each row in ``rows``: items ordered before its target (``targets``, same length).

    Counted in blocks of rows (bounded temporaries). Ties with the target's score need a
    column-aware count; they are rare, so that pass runs only on the rows that have one.
    ``exclude`` (same length, -1 for none) is not counted when it would be.
    """
    n = scores.shape[1]
    out = torch.empty(rows.numel(), dtype=torch.long, device=scores.device)
    block = _row_block(n)
    width = -(-n // _LANE) * _LANE
    buf = torch.zeros((min(block, rows.numel()), width), dtype=torch.bool, device=scores.device)
    for part, selector in _row_slices(rows, block):
        sub = scores[selector]
        tgt = targets[part].unsqueeze(1)
        # Read the target score from the same matrix, so the comparison is bit-consistent.
        t = sub.gather(1, tgt)
        before = _count(torch.gt, sub, t, buf)
        equal = _count(torch.eq, sub, t, buf)
        tied = (equal > 1).nonzero().squeeze(1)
        if tied.numel():
            columns = torch.arange(int(tgt.max()) + 1, device=sub.device).unsqueeze(0)
            low = sub[tied, : columns.shape[1]]
            before[tied] += ((low == t[tied]) & (columns < tgt[tied])).sum(dim=1)
        if exclude is not None:
            excl = exclude[part]
            has = excl >= 0
            e = excl.clamp(min=0).unsqueeze(1)
            s_e = sub.gather(1, e)
            ahead = (s_e > t) | ((s_e == t) & (e < tgt))
            before -= (ahead.squeeze(1) & has).long()
        out[part] = before
    return out


def _order_members(member_scores: Tensor, members: Tensor, num_gallery: int) -> Tensor:
    """Group members (-1 padding) sorted by (higher score, lower index), padding last."""
    valid = members >= 0
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
    return torch.where(valid, key_idx, torch.full_like(key_idx, -1))


def _drop_excluded(idx: Tensor, vals: Tensor, excl: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Remove each row's excluded index from its m = length + 1 candidates (the spare, last one
    when it is not among them), with one gather instead of boolean masking."""
    is_excl = idx == excl.unsqueeze(1)
    last = torch.full_like(excl, idx.shape[1] - 1)
    pos = torch.where(is_excl.any(dim=1), is_excl.to(torch.uint8).argmax(dim=1), last)
    cols = torch.arange(length).unsqueeze(0)
    source = cols + (cols >= pos.unsqueeze(1)).long()
    return idx.gather(1, source), vals.gather(1, source)


@dataclass(frozen=True)
class SplitRanking:
    """Everything :func:`rank_split` computes from one scoring of each query chunk.

    Attributes:
        top: the top-``k`` lists (as :func:`rank_gallery`).
        ranks: (Q,) int64 0-based target ranks (as :func:`target_ranks`), or None.
        groups: (Q, G) int64 ordered group members (as :func:`rank_within_groups`), or None.
    """

    top: RankResult
    ranks: Tensor | None = None
    groups: Tensor | None = None


def rank_split(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude: Tensor | None = None,
    target_ids: Tensor | None = None,
    groups: Tensor | None = None,
    score_fn: ScoreFn | None = None,
    chunk_size: int = 1024,
    progress: ProgressFn | None = None,
) -> SplitRanking:
    """Top-``k`` lists, target ranks and group orders from ONE scoring of each query chunk.

    Per chunk the scores are computed once; then the exact top-``k`` (one ``topk`` of k + 1 or
    k + 2 values, see :func:`_stable_topk`); each target's rank is its position in that list
    when it is inside, and is counted over the row only when it is not; the group members'
    scores are gathered from the same matrix. Results equal :func:`rank_gallery`,
    :func:`target_ranks` and :func:`rank_within_groups` called separately (tests prove it).

    Args:
        queries, gallery, k, exclude, score_fn, chunk_size, progress: as :func:`rank_gallery`.
        target_ids: optional (Q,) int64 target index per query, in [0, N), never the excluded
            one; gives ``ranks``.
        groups: optional (Q, G) int64 group members, -1 padding; the excluded item is removed
            from each group; gives ``groups``.

    Returns:
        A :class:`SplitRanking`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_chunk_size(chunk_size)
    score_fn = score_fn or cosine_score
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    exclude = _check_exclude(exclude, num_queries, num_gallery)
    if target_ids is not None:
        target_ids = target_ids.detach().to("cpu", torch.long)
        if target_ids.shape != (num_queries,):
            raise ValueError(
                f"target_ids must have shape ({num_queries},), got {tuple(target_ids.shape)}"
            )
        if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= num_gallery):
            raise ValueError(f"target_ids must be in [0, {num_gallery})")
        if exclude is not None and bool((exclude == target_ids).any()):
            raise ValueError("a query's excluded gallery index equals its target")
    if groups is not None:
        groups = groups.detach().to("cpu", torch.long)
        if groups.dim() != 2 or groups.shape[0] != num_queries:
            raise ValueError(
                f"groups must have shape ({num_queries}, G), got {tuple(groups.shape)}"
            )
        if groups.numel() and (groups.min() < -1 or groups.max() >= num_gallery):
            raise ValueError(f"groups values must be -1 or in [0, {num_gallery})")
        if exclude is not None:
            groups = groups.clone()
            groups[(groups == exclude.unsqueeze(1)) & (groups >= 0)] = -1
    has_exclusion = exclude is not None and bool((exclude >= 0).any())
    length = min(k, num_gallery - int(has_exclusion))
    # One spare candidate, so dropping the excluded item (if it made the cut) still leaves L.
    m = length + int(has_exclusion)

    all_indices: list[Tensor] = []
    all_scores: list[Tensor] = []
    all_ranks: list[Tensor] = []
    all_groups: list[Tensor] = []
    for start in range(0, num_queries, chunk_size):
        chunk = queries[start : start + chunk_size].to(gallery.device)
        q = chunk.shape[0]
        stop = start + q
        with torch.no_grad():
            scores = _chunk_scores(score_fn, chunk, gallery)
            vals, idx = _stable_topk(scores, m)
            vals, idx = vals.float().cpu(), idx.cpu()
            if has_exclusion:
                assert exclude is not None
                idx, vals = _drop_excluded(idx, vals, exclude[start:stop], length)
            all_indices.append(idx)
            all_scores.append(vals)
            if target_ids is not None:
                tgt = target_ids[start:stop]
                hit = idx == tgt.unsqueeze(1)
                inside = hit.any(dim=1)
                ranks = hit.to(torch.uint8).argmax(dim=1)
                outside = (~inside).nonzero().squeeze(1)
                if outside.numel():
                    device = scores.device
                    sub_excl = exclude[start:stop][outside].to(device) if has_exclusion else None
                    counted = _count_before(
                        scores, outside.to(device), tgt[outside].to(device), sub_excl
                    )
                    ranks[outside] = counted.cpu()
                all_ranks.append(ranks)
            if groups is not None:
                members = groups[start:stop]
                member_scores = scores.gather(1, members.clamp(min=0).to(scores.device)).cpu()
                all_groups.append(_order_members(member_scores, members, num_gallery))
        del scores
        if progress is not None:
            progress(stop)

    def cat(parts: list[Tensor], empty: Tensor) -> Tensor:
        return torch.cat(parts) if parts else empty

    top = RankResult(
        indices=cat(all_indices, torch.empty((0, length), dtype=torch.long)),
        scores=cat(all_scores, torch.empty((0, length), dtype=torch.float32)),
    )
    ranks_out = None
    if target_ids is not None:
        ranks_out = cat(all_ranks, torch.empty((0,), dtype=torch.long))
    groups_out = None
    if groups is not None:
        groups_out = cat(all_groups, torch.empty((0, groups.shape[1]), dtype=torch.long))
    return SplitRanking(top, ranks_out, groups_out)


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
    return rank_split(
        queries, gallery, k, exclude, score_fn=score_fn, chunk_size=chunk_size, progress=progress
    ).top


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
    result = rank_split(
        queries,
        gallery,
        1,
        exclude,
        target_ids=target_ids,
        score_fn=score_fn,
        chunk_size=chunk_size,
        progress=progress,
    )
    assert result.ranks is not None
    return result.ranks


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
    result = rank_split(
        queries,
        gallery,
        1,
        exclude,
        groups=groups,
        score_fn=score_fn,
        chunk_size=chunk_size,
        progress=progress,
    )
    assert result.groups is not None
    return result.groups


# The public surface (README "Python API"); tests/test_public_api.py imports each name.
__all__ = [
    "RankResult",
    "SplitRanking",
    "cosine_score",
    "max_over_tokens_score",
    "rank_gallery",
    "rank_split",
    "rank_within_groups",
    "target_ranks",
]
