"""Retrieval metrics for composed image retrieval: pure functions, tensors in, floats out.

All recalls are percentages in [0, 100]. Rankings use gallery indices (int64) and follow the
ordering of :mod:`cir_cli.ranking` (higher score first, ties by lower gallery index).

Protocol notes (as in the official evaluation code of each benchmark):

* FashionIQ ranks the whole gallery of its category and removes nothing: the reference image
  stays in the gallery. Reported: R@10 and R@50 per category and their averages.
* CIRR removes the reference image from the gallery before ranking (pass it as ``exclude`` to
  the ranking functions). Reported: R@{1,5,10,50} over the whole gallery and Recall_subset@{1,2,3}
  over the query's image set (``img_set.members`` minus the reference, i.e. 5 candidates).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

FASHIONIQ_KS: tuple[int, ...] = (10, 50)
CIRR_KS: tuple[int, ...] = (1, 5, 10, 50)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    return ks


def _check_targets(target_ids: Tensor, num_queries: int) -> Tensor:
    target_ids = target_ids.detach().to("cpu", torch.long)
    if target_ids.shape != (num_queries,):
        raise ValueError(
            f"target_ids must have shape ({num_queries},), got {tuple(target_ids.shape)}"
        )
    # -1 is the padding value in rankings and groups; a negative target would match padding.
    if target_ids.numel() and target_ids.min() < 0:
        raise ValueError("target_ids must be >= 0")
    return target_ids


def _check_ranked(ranked_ids: Tensor) -> Tensor:
    if ranked_ids.dim() != 2:
        raise ValueError(f"ranked_ids must be (Q, L), got shape {tuple(ranked_ids.shape)}")
    if ranked_ids.shape[0] == 0:
        raise ValueError("recall over zero queries is undefined")
    return ranked_ids.detach().to("cpu", torch.long)


def _percent(hits: Tensor) -> float:
    # Integer count then one division: exact and independent of the tensor's float dtype.
    return 100.0 * int(hits.sum()) / hits.numel()


def recall_at_k(ranked_ids: Tensor, target_ids: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k: percent of queries whose target is among the first k entries of its ranking.

    Args:
        ranked_ids: (Q, L) int64 gallery indices, best first (-1 padding allowed).
        target_ids: (Q,) int64 target gallery index per query (>= 0).
        ks: cut-offs (>= 1). A k larger than L uses the whole list, so a target missing from
            the (truncated) ranking counts as a miss.

    Returns:
        ``{k: recall_percent}`` in the order of ``ks``.

    Raises:
        ValueError: Q == 0, bad shapes, k < 1 or a negative target.
    """
    ranked_ids = _check_ranked(ranked_ids)
    target_ids = _check_targets(target_ids, ranked_ids.shape[0])
    ks = _check_ks(ks)
    is_target = ranked_ids == target_ids.unsqueeze(1)
    return {k: _percent(is_target[:, :k].any(dim=1)) for k in ks}


def recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k from each target's 0-based rank (``cir_cli.ranking.target_ranks``).

    A query is a hit at k when ``rank < k``.

    Args:
        ranks: (Q,) int64 0-based ranks (>= 0).
        ks: cut-offs (>= 1).

    Returns:
        ``{k: recall_percent}`` in the order of ``ks``.

    Raises:
        ValueError: Q == 0, a non-1-D tensor, a negative rank or k < 1.
    """
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be (Q,), got shape {tuple(ranks.shape)}")
    if ranks.numel() == 0:
        raise ValueError("recall over zero queries is undefined")
    ranks = ranks.detach().to("cpu", torch.long)
    if ranks.min() < 0:
        raise ValueError("ranks must be >= 0")
    ks = _check_ks(ks)
    return {k: _percent(ranks < k) for k in ks}


def subset_recall_at_k(
    ranked_ids: Tensor, target_ids: Tensor, group_ids: Tensor, ks: Sequence[int]
) -> dict[int, float]:
    """CIRR Recall_subset@k: recall@k on each ranking filtered to the query's group.

    Each query's ranking is reduced to the entries that belong to its group, keeping ranking
    order; the query is a hit at k when its target is among the first k of that filtered list.
    A target outside its group (or absent from the ranking) is a miss.

    The result is exact only if ``ranked_ids`` contains every group member: pass the full
    ranking, or the output of ``cir_cli.ranking.rank_within_groups`` (then the filter is a no-op).

    Args:
        ranked_ids: (Q, L) int64 gallery indices, best first (-1 padding allowed).
        target_ids: (Q,) int64 target gallery index per query (>= 0).
        group_ids: (Q, G) int64 group members per query, -1 as padding. For CIRR:
            ``img_set.members`` minus the reference.
        ks: cut-offs (>= 1); a k larger than the group uses the whole group.

    Returns:
        ``{k: recall_percent}`` in the order of ``ks``.

    Raises:
        ValueError: Q == 0, bad shapes, k < 1 or a negative target.
    """
    ranked_ids = _check_ranked(ranked_ids)
    num_queries = ranked_ids.shape[0]
    target_ids = _check_targets(target_ids, num_queries)
    ks = _check_ks(ks)
    group_ids = group_ids.detach().to("cpu", torch.long)
    if group_ids.dim() != 2 or group_ids.shape[0] != num_queries:
        raise ValueError(
            f"group_ids must have shape ({num_queries}, G), got {tuple(group_ids.shape)}"
        )

    # One (Q, L) comparison per group column rather than a (Q, L, G) tensor: L can be the whole
    # gallery, G is small.
    in_group = torch.zeros_like(ranked_ids, dtype=torch.bool)
    for g in range(group_ids.shape[1]):
        member = group_ids[:, g : g + 1]
        in_group |= (ranked_ids == member) & (member >= 0)
    position_in_group = in_group.cumsum(dim=1) - 1
    target_here = (ranked_ids == target_ids.unsqueeze(1)) & in_group
    # Rows without the target get a position no k can reach; the first occurrence wins.
    never = torch.full_like(position_in_group, torch.iinfo(torch.long).max)
    target_position = torch.where(target_here, position_in_group, never).min(dim=1).values
    return {k: _percent(target_position < k) for k in ks}


def fashioniq_summary(per_category: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """FashionIQ report from per-category recalls.

    Args:
        per_category: ``{category: {10: R@10, 50: R@50, ...}}``, e.g. dress, shirt, toptee.

    Returns:
        ``{cat}_recall_at10`` and ``{cat}_recall_at50`` for each category (input order), then
        ``average_recall_at10`` and ``average_recall_at50`` (unweighted means over categories)
        and ``average_recall`` = (average_recall_at10 + average_recall_at50) / 2.

    Raises:
        ValueError: no categories, or a category without R@10 or R@50.
    """
    if not per_category:
        raise ValueError("fashioniq_summary needs at least one category")
    out: dict[str, float] = {}
    for cat, recalls in per_category.items():
        missing = [k for k in FASHIONIQ_KS if k not in recalls]
        if missing:
            raise ValueError(f"category {cat!r} lacks recall at k={missing}")
        for k in FASHIONIQ_KS:
            out[f"{cat}_recall_at{k}"] = float(recalls[k])
    avg10 = statistics.fmean(float(r[10]) for r in per_category.values())
    avg50 = statistics.fmean(float(r[50]) for r in per_category.values())
    out["average_recall_at10"] = avg10
    out["average_recall_at50"] = avg50
    out["average_recall"] = (avg10 + avg50) / 2
    return out


def cirr_summary(recall: Mapping[int, float], subset: Mapping[int, float]) -> dict[str, float]:
    """CIRR report from global and subset recalls.

    Args:
        recall: ``{1, 5, 10, 50: R@k}`` over the gallery with the reference removed.
        subset: ``{1, 2, 3: Recall_subset@k}``.

    Returns:
        ``recall_at{1,5,10,50}``, ``group_recall_at{1,2,3}``, ``mean_r5_rs1`` =
        (recall_at5 + group_recall_at1) / 2 (the CIRR headline number), and the
        ``arithmetic_mean``, ``harmonic_mean`` and ``geometric_mean`` of those 7 values
        (Python's ``statistics``). If any value is 0 the harmonic mean is 0 (as ``statistics``
        returns) and the geometric mean is reported as 0.0 (its limit; ``statistics`` raises).

    Raises:
        ValueError: a required k is missing, or a value is negative.
    """
    missing = [f"recall@{k}" for k in CIRR_KS if k not in recall]
    missing += [f"subset@{k}" for k in CIRR_SUBSET_KS if k not in subset]
    if missing:
        raise ValueError(f"cirr_summary lacks {', '.join(missing)}")
    out: dict[str, float] = {f"recall_at{k}": float(recall[k]) for k in CIRR_KS}
    out.update({f"group_recall_at{k}": float(subset[k]) for k in CIRR_SUBSET_KS})
    values = list(out.values())
    if any(v < 0 for v in values):
        raise ValueError("recalls must be >= 0")
    out["mean_r5_rs1"] = (out["recall_at5"] + out["group_recall_at1"]) / 2
    out["arithmetic_mean"] = statistics.fmean(values)
    out["harmonic_mean"] = float(statistics.harmonic_mean(values))
    out["geometric_mean"] = 0.0 if 0.0 in values else statistics.geometric_mean(values)
    return out


# --------------------------------------------------------------------------------------------
# Multiple ground truths (CIRCO) and per-query candidate sets (GeneCIS)

CIRCO_KS: tuple[int, ...] = (5, 10, 25, 50)
GENECIS_KS: tuple[int, ...] = (1, 2, 3)


def average_precision_at_k(
    ranked_ids: Tensor, gt_ids: Tensor, ks: Sequence[int]
) -> dict[int, Tensor]:
    """Per-query AP@k with several ground truths, CIRCO's official formula.

    rel_i = [p_i in G], Prec_i = (sum_{j<=i} rel_j) / i,
    AP@k = (sum_{i<=k} rel_i * Prec_i) / min(|G|, k).

    Args:
        ranked_ids: (Q, L) int64 predictions, best first, unique per row (-1 padding allowed).
        gt_ids: (Q, G) int64 ground truths per query, -1 as padding, at least one per row.
        ks: cut-offs (>= 1); k > L uses the whole list.

    Returns:
        ``{k: (Q,) float64 AP@k}`` (fractions in [0, 1]).

    Raises:
        ValueError: Q == 0, bad shapes, k < 1 or a query without ground truth.
    """
    ranked_ids = _check_ranked(ranked_ids)
    ks = _check_ks(ks)
    gt_ids = gt_ids.detach().to("cpu", torch.long)
    if gt_ids.dim() != 2 or gt_ids.shape[0] != ranked_ids.shape[0]:
        raise ValueError(
            f"gt_ids must have shape ({ranked_ids.shape[0]}, G), got {tuple(gt_ids.shape)}"
        )
    num_gt = (gt_ids >= 0).sum(dim=1)
    if bool((num_gt == 0).any()):
        raise ValueError("every query needs at least one ground truth")
    relevant = torch.zeros_like(ranked_ids, dtype=torch.bool)
    for g in range(gt_ids.shape[1]):
        member = gt_ids[:, g : g + 1]
        relevant |= (ranked_ids == member) & (member >= 0)
    rel = relevant.double()
    positions = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    precision = rel.cumsum(dim=1) / positions
    gains = (rel * precision).cumsum(dim=1)
    out = {}
    for k in ks:
        upto = min(k, rel.shape[1])
        out[k] = gains[:, upto - 1] / torch.clamp(num_gt, max=k).double()
    return out


def mean_average_precision_at_k(
    ranked_ids: Tensor, gt_ids: Tensor, ks: Sequence[int]
) -> dict[int, float]:
    """mAP@k in percent: the mean over queries of :func:`average_precision_at_k`."""
    per_query = average_precision_at_k(ranked_ids, gt_ids, ks)
    return {k: 100.0 * float(ap.mean()) for k, ap in per_query.items()}


def circo_summary(
    map_at: Mapping[int, float],
    recall: Mapping[int, float],
    tag_map: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """CIRCO report: ``map_at{5,10,25,50}``, ``recall_at{k}`` (of `target_img_id`) and
    ``map_at10_<aspect>`` per semantic aspect (what the official evaluator prints)."""
    out = {f"map_at{k}": float(v) for k, v in map_at.items()}
    out.update({f"recall_at{k}": float(v) for k, v in recall.items()})
    for tag, value in (tag_map or {}).items():
        out[f"map_at10_{tag}"] = float(value)
    return out


def genecis_summary(per_split: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """GeneCIS report: ``{split}_recall_at{1,2,3}`` and ``average_recall_at1`` over the splits."""
    if not per_split:
        raise ValueError("genecis_summary needs at least one split")
    out: dict[str, float] = {}
    for name, recalls in per_split.items():
        for k in GENECIS_KS:
            out[f"{name}_recall_at{k}"] = float(recalls[k])
    out["average_recall_at1"] = statistics.fmean(float(r[1]) for r in per_split.values())
    return out


# The public surface (README "Python API"); tests/test_public_api.py imports each name.
__all__ = [
    "average_precision_at_k",
    "circo_summary",
    "cirr_summary",
    "fashioniq_summary",
    "genecis_summary",
    "mean_average_precision_at_k",
    "recall_at_k",
    "recall_from_ranks",
    "subset_recall_at_k",
]
