"""Tests for cir_cli.ranking.

Most cases use small-integer features so dot products are exact and ties are real ties; the
expected orders are written out by hand or produced by a plain-Python reference sort.
"""

from __future__ import annotations

import pytest
import torch

from cir_cli import metrics, ranking


def _features(first_coords: list[float]) -> torch.Tensor:
    # (N, 2) features whose score against the query [1, 0] is exactly the first coordinate.
    return torch.tensor([[c, 0.0] for c in first_coords])


QUERY = torch.tensor([[1.0, 0.0]])
# scores against QUERY: [1, 3, 3, 2, 3, 0] -> stable order 1, 2, 4, 3, 0, 5
GALLERY = _features([1, 3, 3, 2, 3, 0])


def _reference_order(scores: list[float], excluded: int = -1) -> list[int]:
    # Independent plain-Python path: sort by (-score, index).
    items = [j for j in range(len(scores)) if j != excluded]
    return sorted(items, key=lambda j: (-scores[j], j))


def test_ties_lower_index_first() -> None:
    res = ranking.rank_gallery(QUERY, GALLERY, k=6)
    assert res.indices.tolist() == [[1, 2, 4, 3, 0, 5]]
    assert res.scores.tolist() == [[3.0, 3.0, 3.0, 2.0, 1.0, 0.0]]


def test_ties_at_topk_boundary() -> None:
    # Three items tie at the cut: the two lowest indices must win.
    assert ranking.rank_gallery(QUERY, GALLERY, k=2).indices.tolist() == [[1, 2]]
    assert ranking.rank_gallery(QUERY, GALLERY, k=1).indices.tolist() == [[1]]


def test_k_larger_than_gallery() -> None:
    res = ranking.rank_gallery(QUERY, GALLERY, k=50)
    assert res.indices.tolist() == [[1, 2, 4, 3, 0, 5]]


def test_gallery_of_one() -> None:
    gallery = _features([5])
    res = ranking.rank_gallery(QUERY.repeat(3, 1), gallery, k=10)
    assert res.indices.tolist() == [[0], [0], [0]]
    # Excluding the only image leaves nothing.
    excl = ranking.rank_gallery(QUERY, gallery, k=10, exclude=torch.tensor([0]))
    assert excl.indices.shape == (1, 0)
    assert ranking.target_ranks(QUERY, gallery, torch.tensor([0])).tolist() == [0]


def test_exclusion_of_reference() -> None:
    queries = QUERY.repeat(3, 1)
    exclude = torch.tensor([2, 5, -1])
    res = ranking.rank_gallery(queries, GALLERY, k=10, exclude=exclude)
    # N_eff = 5 because some query excludes something; the -1 row keeps its top 5.
    assert res.indices.tolist() == [
        [1, 4, 3, 0, 5],
        [1, 2, 4, 3, 0],
        [1, 2, 4, 3, 0],
    ]
    top2 = ranking.rank_gallery(queries, GALLERY, k=2, exclude=exclude)
    assert top2.indices.tolist() == [[1, 4], [1, 2], [1, 2]]


def test_excluded_never_appears() -> None:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.randint(0, 3, (40, 4), generator=gen).float()
    queries = torch.randint(0, 3, (25, 4), generator=gen).float()
    exclude = torch.randint(-1, 40, (25,), generator=gen)
    res = ranking.rank_gallery(queries, gallery, k=39, exclude=exclude)
    for row, ex in zip(res.indices.tolist(), exclude.tolist(), strict=True):
        assert ex not in row
        assert len(set(row)) == 39


def test_single_query_and_batch_of_one() -> None:
    single = ranking.rank_gallery(QUERY, GALLERY, k=3, chunk_size=1)
    assert single.indices.tolist() == [[1, 2, 4]]
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # second query's scores: [-1, -3, -3, -2, -3, 0] -> 5, 0, 3, 1, 2, 4
    res = ranking.rank_gallery(queries, GALLERY, k=6, chunk_size=1)
    assert res.indices.tolist() == [[1, 2, 4, 3, 0, 5], [5, 0, 3, 1, 2, 4]]


def test_matches_reference_sort_on_tie_heavy_data() -> None:
    gen = torch.Generator().manual_seed(1)
    gallery = torch.randint(-2, 3, (200, 3), generator=gen).float()
    queries = torch.randint(-2, 3, (30, 3), generator=gen).float()
    exclude = torch.randint(-1, 200, (30,), generator=gen)
    scores = (queries @ gallery.T).tolist()
    for k in (1, 7, 50, 199):
        res = ranking.rank_gallery(queries, gallery, k=k, exclude=exclude)
        for i in range(30):
            expected = _reference_order(scores[i], int(exclude[i]))[:k]
            assert res.indices[i].tolist() == expected


def test_chunk_sizes_identical() -> None:
    gen = torch.Generator().manual_seed(2)
    gallery = torch.randint(-2, 3, (60, 4), generator=gen).float()
    queries = torch.randint(-2, 3, (10, 4), generator=gen).float()
    exclude = torch.randint(-1, 60, (10,), generator=gen)
    targets = (exclude + 1) % 60
    results = [
        ranking.rank_gallery(queries, gallery, k=20, exclude=exclude, chunk_size=c)
        for c in (1, 3, 10_000)
    ]
    for other in results[1:]:
        assert torch.equal(other.indices, results[0].indices)
        assert torch.equal(other.scores, results[0].scores)
    ranks = [
        ranking.target_ranks(queries, gallery, targets, exclude=exclude, chunk_size=c)
        for c in (1, 3, 10_000)
    ]
    assert torch.equal(ranks[0], ranks[1]) and torch.equal(ranks[0], ranks[2])


def test_target_ranks_hand_worked() -> None:
    queries = QUERY.repeat(4, 1)
    # order 1, 2, 4, 3, 0, 5; with exclude 2: 1, 4, 3, 0, 5
    targets = torch.tensor([4, 4, 5, 1])
    exclude = torch.tensor([-1, 2, 1, -1])
    ranks = ranking.target_ranks(queries, GALLERY, targets, exclude=exclude)
    assert ranks.tolist() == [2, 1, 4, 0]


def test_target_ranks_exclude_equal_target_raises() -> None:
    with pytest.raises(ValueError):
        ranking.target_ranks(QUERY, GALLERY, torch.tensor([1]), exclude=torch.tensor([1]))


@pytest.mark.parametrize("tie_heavy", [False, True])
def test_target_ranks_agree_with_rank_gallery(tie_heavy: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    n, q = 300, 80
    if tie_heavy:
        gallery = torch.randint(-1, 2, (n, 3), generator=gen).float()
        queries = torch.randint(-1, 2, (q, 3), generator=gen).float()
    else:
        gallery = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
        queries = torch.nn.functional.normalize(torch.randn(q, 16, generator=gen), dim=1)
    exclude = torch.randint(0, n, (q,), generator=gen)
    targets = (exclude + torch.randint(1, n, (q,), generator=gen)) % n
    ks = [1, 5, 10, 50]
    ranks = ranking.target_ranks(queries, gallery, targets, exclude=exclude, chunk_size=7)
    top = ranking.rank_gallery(queries, gallery, k=50, exclude=exclude, chunk_size=7)
    assert metrics.recall_from_ranks(ranks, ks) == metrics.recall_at_k(top.indices, targets, ks)
    full = ranking.rank_gallery(queries, gallery, k=n, exclude=exclude)
    positions = (full.indices == targets.unsqueeze(1)).float().argmax(dim=1)
    assert torch.equal(ranks, positions)


def test_max_over_tokens_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(4)
    n, t, d = 30, 4, 8
    gallery = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
    queries = torch.randn(5, d, generator=gen, dtype=torch.float64)
    naive = [
        [max(float(queries[i] @ gallery[j, s]) for s in range(t)) for j in range(n)]
        for i in range(5)
    ]
    got = ranking.max_over_tokens_score(queries, gallery)
    assert torch.allclose(got, torch.tensor(naive, dtype=torch.float64))
    res = ranking.rank_gallery(
        queries, gallery, k=10, score_fn=ranking.max_over_tokens_score, chunk_size=2
    )
    for i in range(5):
        assert res.indices[i].tolist() == _reference_order(naive[i])[:10]
    targets = torch.arange(5)
    ranks = ranking.target_ranks(queries, gallery, targets, score_fn=ranking.max_over_tokens_score)
    for i in range(5):
        assert int(ranks[i]) == _reference_order(naive[i]).index(i)


def test_rank_within_groups_hand_worked() -> None:
    queries = QUERY.repeat(2, 1)
    # scores [1, 3, 3, 2, 3, 0]
    groups = torch.tensor([[0, 4, 3, 2, 5], [5, -1, 3, 1, -1]])
    exclude = torch.tensor([2, -1])
    got = ranking.rank_within_groups(queries, GALLERY, groups, exclude=exclude)
    assert got.tolist() == [[4, 3, 0, 5, -1], [1, 3, 5, -1, -1]]
    # Fed to subset recall, the filter is a no-op: targets 3 (pos 1) and 5 (pos 2).
    targets = torch.tensor([3, 5])
    assert metrics.subset_recall_at_k(got, targets, groups, [1, 2, 3]) == {
        1: 0.0,
        2: 50.0,
        3: 100.0,
    }


def test_rank_within_groups_agrees_with_full_ranking() -> None:
    gen = torch.Generator().manual_seed(5)
    gallery = torch.randint(-1, 2, (50, 3), generator=gen).float()
    queries = torch.randint(-1, 2, (20, 3), generator=gen).float()
    groups = torch.stack([torch.randperm(50, generator=gen)[:6] for _ in range(20)])
    exclude = groups[:, 0].clone()
    targets = groups[:, 1].clone()
    within = ranking.rank_within_groups(queries, gallery, groups, exclude=exclude, chunk_size=3)
    full = ranking.rank_gallery(queries, gallery, k=50, exclude=exclude)
    ks = [1, 2, 3]
    assert metrics.recall_at_k(within[:, :5], targets, ks) == metrics.subset_recall_at_k(
        full.indices, targets, groups, ks
    )
    for i in range(20):
        members = set(groups[i, 1:].tolist())
        filtered = [j for j in full.indices[i].tolist() if j in members]
        assert within[i].tolist() == filtered + [-1]


def test_progress_called_with_cumulative_count() -> None:
    calls: list[int] = []
    ranking.rank_gallery(QUERY.repeat(7, 1), GALLERY, k=2, chunk_size=3, progress=calls.append)
    assert calls == [3, 6, 7]


def test_empty_queries() -> None:
    res = ranking.rank_gallery(torch.empty((0, 2)), GALLERY, k=3)
    assert res.indices.shape == (0, 3)
    assert ranking.target_ranks(torch.empty((0, 2)), GALLERY, torch.empty(0)).shape == (0,)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        ranking.rank_gallery(QUERY, GALLERY, k=0)
    with pytest.raises(ValueError):
        ranking.rank_gallery(QUERY, GALLERY, k=1, chunk_size=0)
    with pytest.raises(ValueError):
        ranking.rank_gallery(QUERY, GALLERY, k=1, exclude=torch.tensor([6]))
    with pytest.raises(ValueError):
        ranking.rank_gallery(torch.tensor([[float("nan"), 0.0]]), GALLERY, k=1)
    with pytest.raises(ValueError):
        ranking.target_ranks(QUERY, GALLERY, torch.tensor([6]))


def test_large_gallery_shape_is_fast() -> None:
    # Smoke test at a realistic shape ratio (scaled down to stay fast): many exact ties.
    gen = torch.Generator().manual_seed(6)
    gallery = torch.randint(0, 2, (20_000, 4), generator=gen).float()
    queries = torch.randint(0, 2, (100, 4), generator=gen).float()
    res = ranking.rank_gallery(queries, gallery, k=50, chunk_size=64)
    scores = (queries @ gallery.T).tolist()
    for i in (0, 57, 99):
        assert res.indices[i].tolist() == _reference_order(scores[i])[:50]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(7)
    gallery = torch.randint(-1, 2, (500, 4), generator=gen).float()
    queries = torch.randint(-1, 2, (40, 4), generator=gen).float()
    exclude = torch.randint(-1, 500, (40,), generator=gen)
    cpu = ranking.rank_gallery(queries, gallery, k=30, exclude=exclude)
    gpu = ranking.rank_gallery(queries.cuda(), gallery.cuda(), k=30, exclude=exclude.cuda())
    assert gpu.indices.device.type == "cpu"
    assert torch.equal(cpu.indices, gpu.indices)
