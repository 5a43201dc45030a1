"""Per-query evaluation data for `cir validate --report`, and the modality audit.

One pass per split: the image representations are computed once (or read from the feature
cache), the split is evaluated exactly as `cir validate` does (evaluation.evaluate_split, so the
metrics are the same numbers), and the same representations then feed the single-modality
queries of the method (`CIRMethod.single_modality_queries`: the reference image alone, the
caption alone), ranked with the method's own score and the split's protocol (reference removal)
by ranking.target_ranks. Nothing is re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cir_cli import ranking
from cir_cli.evaluation import (
    Evaluation,
    SplitResult,
    evaluate_split,
    split_representations,
    summarize_with_first_stage,
)

if TYPE_CHECKING:
    from pathlib import Path

    from cir_cli.config import Recipe
    from cir_cli.data.base import CIRSplit
    from cir_cli.methods.base import CIRMethod

# The recall cut-offs of the audit table ("solved at R@1 / R@10").
AUDIT_KS = (1, 10)
MODALITIES = ("image", "text")


@dataclass
class QueryRecord:
    """One query as the report shows it (ranks 1-based; None: not defined for this query)."""

    index: int
    query_id: str
    reference: str
    target: str | None
    text: str
    rank: int | None
    top: list[str]
    # CIRR: the query's group members (reference removed) in ranked order.
    group_top: list[str] = field(default_factory=list)
    modality_ranks: dict[str, int] = field(default_factory=dict)


@dataclass
class SplitReport:
    label: str
    dataset: str
    category: str
    gallery_size: int
    image_paths: dict[str, Path]
    records: list[QueryRecord]
    recall: dict[int, float]
    subset_recall: dict[int, float]
    # Modalities the method defines single-modality queries for (empty: not defined).
    modalities: tuple[str, ...] = ()

    @property
    def ranked(self) -> list[QueryRecord]:
        return [r for r in self.records if r.rank is not None]

    def worst(self, n: int) -> list[QueryRecord]:
        """The n queries whose target is ranked lowest (ties: earlier query first)."""
        return sorted(self.ranked, key=lambda r: (-r.rank, r.index))[:n]

    def best(self, n: int) -> list[QueryRecord]:
        return sorted(self.ranked, key=lambda r: (r.rank, r.index))[:n]

    def audit(self, worst_n: int) -> dict[str, Any]:
        """Per split: how many queries each query type solves at R@1/R@10, and which of the
        `worst_n` worst composed queries a single modality ranks better."""
        ranked = self.ranked
        out: dict[str, Any] = {"queries": len(ranked), "defined": list(self.modalities)}
        kinds = ("composed", *self.modalities)
        for kind in kinds:
            ranks = [r.rank if kind == "composed" else r.modality_ranks[kind] for r in ranked]
            out[kind] = {f"solved_at{k}": sum(rank <= k for rank in ranks) for k in AUDIT_KS}
        for kind in self.modalities:
            # Queries where the single modality alone ranks the target strictly better.
            out[kind]["beats_composed"] = sum(r.modality_ranks[kind] < r.rank for r in ranked)
        lost = []
        for r in self.worst(worst_n):
            better = [m for m in self.modalities if r.modality_ranks[m] < r.rank]
            if better:
                lost.append(
                    {
                        "query_id": r.query_id,
                        "composed_rank": r.rank,
                        **{f"{m}_rank": r.modality_ranks[m] for m in self.modalities},
                        "lost_to": better,
                    }
                )
        out["worst_lost_to_single_modality"] = lost
        return out


def _display_texts(split: CIRSplit) -> list[str]:
    """The captions as a person wrote them (FashionIQ's pair joined by ' / ')."""
    return [" / ".join(t.captions) for t in split.triplets]


@torch.no_grad()
def modality_ranks(
    model: CIRMethod,
    split: CIRSplit,
    names: list[str],
    reps: torch.Tensor,
    batch_size: int,
    rank_chunk: int,
) -> dict[str, torch.Tensor]:
    """0-based target rank of every query under each single-modality query the method defines."""
    if not all(t.target is not None for t in split.triplets) or not split.triplets:
        return {}
    row_of = {n: i for i, n in enumerate(names)}
    ref_rows = torch.tensor([row_of[t.reference] for t in split.triplets], dtype=torch.long)
    texts = model.query_texts(split)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), batch_size):
        refs = reps[ref_rows[start : start + batch_size]].to(model.device)
        queries = model.single_modality_queries(refs, texts[start : start + batch_size])
        for kind, feats in queries.items():
            parts.setdefault(kind, []).append(feats)
    if not parts:
        model.train(was_training)
        return {}
    gidx = split.gallery_index
    gallery_rows = torch.tensor([row_of[n] for n in split.gallery], dtype=torch.long)
    gallery = model.targets_from_representation(reps[gallery_rows].to(model.device))
    model.train(was_training)
    targets = torch.tensor([gidx[t.target] for t in split.triplets], dtype=torch.long)
    exclude = None
    if split.remove_reference:
        exclude = torch.tensor([gidx.get(t.reference, -1) for t in split.triplets])
    return {
        kind: ranking.target_ranks(
            torch.cat(chunks),
            gallery,
            targets,
            exclude=exclude,
            score_fn=model.score,
            chunk_size=rank_chunk,
        )
        for kind, chunks in parts.items()
    }


def split_report(result: SplitResult, modality: dict[str, torch.Tensor], top_k: int) -> SplitReport:
    split = result.split
    texts = _display_texts(split)
    ranks = result.target_ranks.tolist() if result.target_ranks is not None else None
    mod = {kind: r.tolist() for kind, r in modality.items()}
    records = []
    for qi, t in enumerate(split.triplets):
        records.append(
            QueryRecord(
                index=qi,
                query_id=t.query_id,
                reference=t.reference,
                target=t.target,
                text=texts[qi],
                rank=ranks[qi] + 1 if ranks is not None else None,
                top=result.top[qi][:top_k],
                group_top=result.subset_top[qi] if result.subset_top else [],
                modality_ranks={kind: r[qi] + 1 for kind, r in mod.items()},
            )
        )
    return SplitReport(
        label=split.label,
        dataset=split.dataset,
        category=split.subset or split.split,
        gallery_size=len(split.gallery),
        image_paths=dict(split.image_paths),
        records=records,
        recall=dict(result.recall),
        subset_recall=dict(result.subset_recall),
        modalities=tuple(m for m in MODALITIES if m in modality),
    )


def evaluate_with_report(
    model: CIRMethod,
    recipe: Recipe,
    split: str | None = None,
    use_cache: bool = True,
    top_k: int = 10,
    depth: int | None = None,
) -> tuple[Evaluation, list[SplitReport]]:
    """`api.validate`'s evaluation (same metrics) plus the per-query report data per split."""
    from cir_cli.cache import default_cache
    from cir_cli.data import load_eval_splits
    from cir_cli.evaluation import RANKING_DEPTH

    splits = load_eval_splits(recipe, split)
    cache = default_cache(recipe) if use_cache else None
    bs, nw, chunk = recipe.eval.batch_size, recipe.data.num_workers, recipe.eval.rank_chunk
    depth = depth or RANKING_DEPTH
    # A re-ranking recipe evaluates a split its own way (as evaluation.evaluate does); the
    # page then shows the re-ranked lists, without the single-modality audit.
    rerank = getattr(model, "rerank_split", None)
    results, reports = [], []
    for s in splits:
        result = rerank(s, cache, bs, nw, chunk, depth) if rerank is not None else None
        modality = {}
        if result is None:
            reps = split_representations(model, s, cache, bs, nw)
            result = evaluate_split(model, s, cache, bs, nw, chunk, representations=reps,
                                    depth=depth)
            # Only where the split has per-query target ranks (not GeneCIS's candidate sets).
            if result.target_ranks is not None:
                modality = modality_ranks(model, s, reps[0], reps[1], bs, chunk)
            del reps
        results.append(result)
        reports.append(split_report(result, modality, top_k))
    return Evaluation(summarize_with_first_stage(results), results), reports


def audit_table(reports: list[SplitReport], worst_n: int) -> dict[str, Any]:
    """The modality audit of every split, keyed by split label (what metrics.json stores)."""
    return {r.label: r.audit(worst_n) for r in reports if r.ranked}
