"""One-pass ranking (ranking.rank_split) == the former three passes, exactly.

The former implementation (one full scoring per pass: rank_gallery, target_ranks,
rank_within_groups, with full-chunk tie repair) is kept here, verbatim in behaviour, as the
independent second path; a brute-force argsort by (-score, index) is the third.
"""

from __future__ import annotations

import pytest
import torch

from cir_cli import ranking


# --- the former three-pass implementation (before issue 16), kept only as a test oracle ------
def _old_stable_topk(scores, m):
    num_rows, n = scores.shape
    vals, idx = torch.topk(scores, m, dim=1, largest=True, sorted=False)
    if m < n:
        boundary = vals.min(dim=1, keepdim=True).values
        n_above = (scores > boundary).sum(dim=1)
        n_equal = (scores == boundary).sum(dim=1)
        ambiguous = (n_above + n_equal > m).nonzero().squeeze(1)
        for rows in ambiguous.split(64):
            sub, bound = scores[rows], boundary[rows]
            need = (m - n_above[rows]).unsqueeze(1)
            is_equal = sub == bound
            keep = (sub > bound) | (is_equal & (is_equal.cumsum(dim=1) <= need))
            fixed = keep.nonzero()[:, 1].view(rows.numel(), m)
            idx[rows] = fixed
            vals[rows] = sub.gather(1, fixed)
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _old_rank_gallery(queries, gallery, k, exclude, chunk):
    has_exclusion = exclude is not None and bool((exclude >= 0).any())
    length = min(k, gallery.shape[0] - int(has_exclusion))
    m = length + int(has_exclusion)
    out_i, out_s = [], []
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ gallery.T
        vals, idx = _old_stable_topk(scores, m)
        if has_exclusion:
            excl = exclude[start : start + scores.shape[0]].unsqueeze(1)
            keep = idx != excl
            keep[keep.all(dim=1), -1] = False
            idx = idx[keep].view(excl.shape[0], length)
            vals = vals[keep].view(excl.shape[0], length)
        out_i.append(idx)
        out_s.append(vals)
    return torch.cat(out_i), torch.cat(out_s)


def _old_target_ranks(queries, gallery, targets, exclude, chunk):
    ranks = []
    n = gallery.shape[0]
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ gallery.T
        q = scores.shape[0]
        tgt = targets[start : start + q].unsqueeze(1)
        t = scores.gather(1, tgt)
        columns = torch.arange(n).unsqueeze(0)
        before = (scores > t) | ((scores == t) & (columns < tgt))
        if exclude is not None:
            excl = exclude[start : start + q]
            rows = (excl >= 0).nonzero().squeeze(1)
            before[rows, excl[rows]] = False
        ranks.append(before.sum(dim=1))
    return torch.cat(ranks)


def _old_rank_within_groups(queries, gallery, groups, exclude, chunk):
    n = gallery.shape[0]
    groups = groups.clone()
    if exclude is not None:
        groups[(groups == exclude.unsqueeze(1)) & (groups >= 0)] = -1
    out = []
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ gallery.T
        members = groups[start : start + scores.shape[0]]
        valid = members >= 0
        member_scores = scores.gather(1, members.clamp(min=0))
        key_idx = torch.where(valid, members, torch.full_like(members, n))
        key_idx, order = key_idx.sort(dim=1, stable=True)
        member_scores, valid = member_scores.gather(1, order), valid.gather(1, order)
        _, order2 = member_scores.sort(dim=1, descending=True, stable=True)
        key_idx, valid = key_idx.gather(1, order2), valid.gather(1, order2)
        _, order3 = (~valid).to(torch.uint8).sort(dim=1, stable=True)
        key_idx, valid = key_idx.gather(1, order3), valid.gather(1, order3)
        out.append(torch.where(valid, key_idx, torch.full_like(key_idx, -1)))
    return torch.cat(out)


# --- brute force ------------------------------------------------------------------------------
def _full_order(scores_row: list[float], excluded: int) -> list[int]:
    items = [j for j in range(len(scores_row)) if j != excluded]
    return sorted(items, key=lambda j: (-scores_row[j], j))


def _data(seed: int, q: int, n: int, ties: str):
    gen = torch.Generator().manual_seed(seed)
    if ties == "integer":  # small integers: exact products, ties everywhere
        gallery = torch.randint(-2, 3, (n, 3), generator=gen).float()
        queries = torch.randint(-2, 3, (q, 3), generator=gen).float()
    else:  # float features with duplicated gallery rows: exact ties among random scores
        gallery = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)
        dup = torch.randint(0, n, (n // 3,), generator=gen)
        gallery[torch.randint(0, n, (n // 3,), generator=gen)] = gallery[dup]
        queries = torch.nn.functional.normalize(torch.randn(q, 8, generator=gen), dim=1)
        # Some queries equal to gallery rows: their targets sit at the very top.
        queries[: q // 4] = gallery[torch.randint(0, n, (q // 4,), generator=gen)]
    exclude = torch.randint(-1, n, (q,), generator=gen)
    targets = (exclude.clamp(min=0) + torch.randint(1, n, (q,), generator=gen)) % n
    groups = torch.stack([torch.randperm(n, generator=gen)[:6] for _ in range(q)])
    groups[:, 0] = exclude.clamp(min=0)  # the excluded reference is a member (CIRR)
    groups[: q // 5, -1] = -1  # some padding
    return queries, gallery, exclude, targets, groups


@pytest.mark.parametrize("ties", ["integer", "duplicates"])
@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_one_pass_equals_three_passes(ties: str, k: int, chunk: int) -> None:
    queries, gallery, exclude, targets, groups = _data(k + chunk, 40, 120, ties)
    one = ranking.rank_split(
        queries, gallery, k, exclude, target_ids=targets, groups=groups, chunk_size=chunk
    )
    old_idx, old_scores = _old_rank_gallery(queries, gallery, k, exclude, chunk)
    assert torch.equal(one.top.indices, old_idx)
    assert torch.equal(one.top.scores, old_scores)
    assert torch.equal(one.ranks, _old_target_ranks(queries, gallery, targets, exclude, chunk))
    old_groups = _old_rank_within_groups(queries, gallery, groups, exclude, chunk)
    assert torch.equal(one.groups, old_groups)

    scores = (queries @ gallery.T).tolist()
    for i in range(queries.shape[0]):
        order = _full_order(scores[i], int(exclude[i]))
        assert one.top.indices[i].tolist() == order[:k]
        assert int(one.ranks[i]) == order.index(int(targets[i]))
        members = [g for g in groups[i].tolist() if g >= 0 and g != int(exclude[i])]
        expected = [j for j in order if j in members]
        assert one.groups[i].tolist() == expected + [-1] * (6 - len(expected))


def test_ties_straddling_the_cut_are_repaired_and_detected_cheaply() -> None:
    # Every score ties: each row is ambiguous, the repair keeps the lowest indices.
    gallery = torch.ones(300, 2)
    queries = torch.ones(9, 2)
    exclude = torch.tensor([0, 3, -1, 299, 5, 1, 2, -1, 7])
    one = ranking.rank_split(
        queries, gallery, 10, exclude, target_ids=torch.full((9,), 150), chunk_size=4
    )
    for i in range(9):
        expected = [j for j in range(300) if j != int(exclude[i])][:10]
        assert one.top.indices[i].tolist() == expected
        assert int(one.ranks[i]) == 150 - int(0 <= int(exclude[i]) < 150)


def test_wrappers_equal_rank_split_and_nan_is_rejected() -> None:
    queries, gallery, exclude, targets, groups = _data(3, 30, 80, "integer")
    one = ranking.rank_split(queries, gallery, 20, exclude, target_ids=targets, groups=groups)
    assert torch.equal(ranking.rank_gallery(queries, gallery, 20, exclude).indices, one.top.indices)
    assert torch.equal(ranking.target_ranks(queries, gallery, targets, exclude), one.ranks)
    assert torch.equal(ranking.rank_within_groups(queries, gallery, groups, exclude), one.groups)
    bad = queries.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ranking.rank_split(bad, gallery, 5)
    with pytest.raises(ValueError, match="NaN"):
        ranking.rank_split(bad, gallery[:3], 5)  # k >= N: the whole row is checked
