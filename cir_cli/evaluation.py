"""Validation and test-split ranking through the method contract (methods/base.py).

One code path for every dataset and method: image representations are computed once per image
(cached on disk when the tower is frozen), references are looked up in them by name (never
re-encoded), queries are composed in batches, and ranking is exact, chunked and stable
(ranking.py). Dataset differences are data: `remove_reference` and groups on the CIRSplit, and
the summary protocol below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cir_cli import metrics, ranking
from cir_cli.cache import FeatureCache
from cir_cli.data import get_dataset
from cir_cli.data.base import CIRSplit
from cir_cli.data.images import ImageFiles
from cir_cli.errors import CirError
from cir_cli.progress import progress_bar

if TYPE_CHECKING:
    from cir_cli.config import EvalConfig

    # Typing only: evaluation drives any method through its contract and sits below methods/.
    from cir_cli.methods.base import CIRMethod


def selection_metric(recipe) -> str:
    """The metric that picks the `best` checkpoint: eval.selection_metric or the dataset's."""
    return eval_selection_metric(recipe.eval, recipe.data.dataset)


def eval_selection_metric(eval_cfg: EvalConfig, dataset: str) -> str:
    """`selection_metric` from the [eval] section and the dataset name."""
    return eval_cfg.selection_metric or get_dataset(dataset).selection_metric


RANKING_DEPTH = 50  # what the CIRR/CIRCO servers take


@dataclass
class SplitResult:
    split: CIRSplit
    recall: dict[int, float] = field(default_factory=dict)
    subset_recall: dict[int, float] = field(default_factory=dict)
    # Per query: top-50 gallery names (reference removed where the protocol says so); deeper
    # when evaluate() was asked for a larger `depth` (candidate lists, re-ranking).
    top: list[list[str]] = field(default_factory=list)
    # The scores of `top`, per query (for candidate lists).
    top_scores: list[list[float]] = field(default_factory=list)
    # Each query's 0-based target rank over the whole gallery (splits with targets).
    target_ranks: torch.Tensor | None = None
    # A re-ranked split keeps the first stage's result here (its metrics: first_stage_*).
    first_stage: SplitResult | None = None
    # Per query: the group members (minus reference) in ranked order (CIRR subset protocol).
    subset_top: list[list[str]] = field(default_factory=list)
    # Multi-target splits (Triplet.targets, CIRCO): mAP@k of the top-50, and mAP@10 per tag.
    map_at: dict[int, float] = field(default_factory=dict)
    tag_map: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    splits: list[SplitResult]

    def rankings(self) -> dict[str, list[str]]:
        """query id -> top-50 gallery names (the shape the CIRR/CIRCO servers take)."""
        return {
            t.query_id: names[:RANKING_DEPTH]
            for result in self.splits
            for t, names in zip(result.split.triplets, result.top, strict=True)
        }


def _autocast(model: CIRMethod):
    device = model.device
    precision = model.recipe.backbone.precision
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def compute_representations(
    model: CIRMethod,
    names: Sequence[str],
    paths: dict,
    batch_size: int,
    num_workers: int,
    description: str = "encoding images",
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the method's image path (or `encode`) over image files, decoded in DataLoader
    workers, in eval mode and without gradients."""
    from torch.utils.data import DataLoader

    dataset = ImageFiles([(n, paths[n]) for n in names], model.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    chunks = []
    was_training = model.training
    model.eval()
    with progress_bar(description, len(names)) as advance, torch.no_grad(), _autocast(model):
        for _, pixels in loader:
            reps = (encode or model.image_representation)(pixels.to(model.device))
            # Float32 unless the method keeps large per-image tensors in half precision
            # (`representation_dtype`, e.g. SPRC's 257 x 1408 ViT tokens in fp16).
            chunks.append(reps.to(getattr(model, "representation_dtype", torch.float32)).cpu())
            advance(len(pixels))
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def split_representations(
    model: CIRMethod,
    split: CIRSplit,
    cache: FeatureCache | None,
    batch_size: int,
    num_workers: int,
) -> tuple[list[str], torch.Tensor]:
    """Representations of every image the split needs (gallery first), cached when frozen."""
    split.require_images()
    names = split.image_names()
    key = model.image_cache_key() if cache is not None else None

    def compute(chunk: list[str]) -> torch.Tensor:
        return compute_representations(
            model,
            chunk,
            split.image_paths,
            batch_size,
            num_workers,
            description=f"encoding {split.label}",
        )

    if key is None:
        return names, compute(names)
    return names, cache.get_or_compute_images(key, names, split.image_paths, compute)


@torch.no_grad()
def evaluate_split(
    model: CIRMethod,
    split: CIRSplit,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    rank_chunk: int = 1024,
    representations: tuple[list[str], torch.Tensor] | None = None,
    depth: int = RANKING_DEPTH,
) -> SplitResult:
    """Rank every query of `split` against its gallery and compute the split's recalls.

    `result.top` keeps the best `depth` names per query (at least the servers' 50)."""
    names, reps = representations or split_representations(
        model, split, cache, batch_size, num_workers
    )
    row_of = {n: i for i, n in enumerate(names)}
    was_training = model.training
    model.eval()
    device = model.device
    gallery_rows = torch.tensor([row_of[n] for n in split.gallery], dtype=torch.long)
    gallery = model.targets_from_representation(reps[gallery_rows].to(device))
    ref_rows = torch.tensor([row_of[t.reference] for t in split.triplets], dtype=torch.long)
    texts = model.query_texts(split)

    queries = []
    with progress_bar(f"queries {split.label}", len(texts)) as advance:
        for start in range(0, len(texts), batch_size):
            rows = ref_rows[start : start + batch_size]
            refs = reps[rows].to(device)
            queries.append(
                model.queries_from_representation(refs, texts[start : start + batch_size])
            )
            advance(len(rows))
    query_features = torch.cat(queries) if queries else torch.empty(0, device=device)
    model.train(was_training)

    gidx = split.gallery_index
    exclude = None
    if split.remove_reference:
        exclude = torch.tensor([gidx.get(t.reference, -1) for t in split.triplets])
    result = SplitResult(split)
    has_targets = all(t.target is not None for t in split.triplets)
    ks = get_dataset(split.dataset).recall_ks
    targets = None
    if has_targets:
        missing = [t.target for t in split.triplets if t.target not in gidx]
        if missing:
            raise CirError(
                f"{split.label}: {len(missing)} target(s) not in the gallery, e.g. {missing[0]}"
            )
        targets = torch.tensor([gidx[t.target] for t in split.triplets], dtype=torch.long)
    groups = None
    if split.has_groups:
        width = max(len(t.group) for t in split.triplets)  # CIRR 6, GeneCIS 15
        groups = torch.full((len(split.triplets), width), -1, dtype=torch.long)
        for qi, t in enumerate(split.triplets):
            # CIRR's subset drops the reference (removed from rankings); GeneCIS keeps all.
            members = [gidx[m] for m in t.group if m != t.reference or not split.remove_reference]
            groups[qi, : len(members)] = torch.tensor(members, dtype=torch.long)

    # One scoring of each query chunk gives the top-50, the target ranks and the group orders
    # (ranking.rank_split). The groups already lack the reference, so its exclusion from them
    # (rank_split removes the excluded item from groups) changes nothing.
    ranked = ranking.rank_split(
        query_features,
        gallery,
        max(depth, RANKING_DEPTH),
        exclude=exclude,
        target_ids=targets if (targets is not None and ks) else None,
        score_fn=model.score,
        chunk_size=rank_chunk,
        groups=groups,
    )
    top = ranked.top
    result.top = [[split.gallery[i] for i in row] for row in top.indices.tolist()]
    result.top_scores = top.scores.tolist()
    if has_targets and any(t.targets for t in split.triplets):
        # CIRCO's mAP is over the servers' 50, also when a deeper list was kept.
        result.map_at, result.tag_map = _multi_target_map(
            split, top.indices[:, :RANKING_DEPTH]
        )
    if ranked.ranks is not None:
        result.recall = metrics.recall_from_ranks(ranked.ranks, ks)
        result.target_ranks = ranked.ranks
    if groups is not None:
        assert ranked.groups is not None
        ordered = ranked.groups
        result.subset_top = [[split.gallery[i] for i in row if i >= 0] for row in ordered.tolist()]
        if targets is not None:
            result.subset_recall = metrics.subset_recall_at_k(
                ordered, targets, groups, metrics.CIRR_SUBSET_KS
            )
    return result


def _multi_target_map(split: CIRSplit, top: torch.Tensor) -> tuple[dict, dict]:
    """mAP@k (CIRCO's formula) of the top-50 rankings and mAP@10 per tag, in percent."""
    gidx = split.gallery_index
    width = max(len(t.targets or (t.target,)) for t in split.triplets)
    gts = torch.full((len(split.triplets), width), -1, dtype=torch.long)
    for qi, t in enumerate(split.triplets):
        ids = [gidx[n] for n in (t.targets or (t.target,)) if n in gidx]
        gts[qi, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    per_query = metrics.average_precision_at_k(top, gts, metrics.CIRCO_KS)
    map_at = {k: 100.0 * float(ap.mean()) for k, ap in per_query.items()}
    tags = sorted({tag for t in split.triplets for tag in t.tags})
    tag_map = {}
    for tag in tags:
        rows = torch.tensor([tag in t.tags for t in split.triplets])
        tag_map[tag] = 100.0 * float(per_query[10][rows].mean())
    return map_at, tag_map


def summarize(results: list[SplitResult]) -> dict[str, float]:
    """The dataset's reported aggregates (spec 5) from per-split recalls."""
    if not results:
        return {}
    return get_dataset(results[0].split.dataset).summarize(results)


def evaluate(
    model: CIRMethod,
    splits: list[CIRSplit],
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    rank_chunk: int = 1024,
    depth: int = RANKING_DEPTH,
) -> Evaluation:
    results = []
    # A method with a second stage (re-ranking) evaluates a split its own way when the recipe
    # asks for it (`rerank_split` returns None otherwise).
    rerank = getattr(model, "rerank_split", None)
    for s in splits:
        result = None
        if rerank is not None:
            result = rerank(s, cache, batch_size, num_workers, rank_chunk, depth)
        if result is None:
            result = evaluate_split(
                model, s, cache, batch_size, num_workers, rank_chunk, depth=depth
            )
        results.append(result)
    return Evaluation(summarize_with_first_stage(results), results)


def summarize_with_first_stage(results: list[SplitResult]) -> dict[str, float]:
    """summarize(), plus the first stage's metrics as first_stage_* for re-ranked splits."""
    summary = summarize(results)
    firsts = [r.first_stage for r in results]
    if results and all(f is not None for f in firsts):
        summary.update({f"first_stage_{k}": v for k, v in summarize(firsts).items()})
    return summary
