"""Candidate re-ranking (Liu, Sun, Teney, Gould, TMLR 2024) on BLIP ViT-B; spec reranking.md.

Stage I (`cir finetune`, spec 3): BLIP's image-grounded text encoder. The caption, with [ENC]
over [CLS] and no truncation, cross-attends to all 577 ViT tokens of the reference:

    q_i = normalize(text_proj(h_i[0])),  τ_j = normalize(vision_proj(V_j[0])),
    L = CE_j(q_i·τ_j / temp, i)          temp learnable (from model_base.pth), unclamped.

Stage II (`cir train-combiner`, spec 5): the dual multi-modal encoder (modules/dual_encoder.py)
scores (query, candidate) pairs from z_t (stage I's last hidden states), the caption and the
candidate's ViT tokens; L = CE over the B x B in-batch pairs (B passes of B rows).

Re-ranking (spec 6, `[rerank]` in the recipe): the first K candidates of a first stage (this
method's stage I, or any method's candidate list, or the reference's top-K file) are re-ordered
by the stage-II score (fusion "none", the reference) or score + w x first-stage score ("sum").
Ranks past K keep the first-stage order. CIRR's subset: stage II scores the 5 members directly.

The ViT is frozen in both stages: its 577 tokens are computed once per image, cached on disk
(method.token_precision), and serve as reference tokens (stage I, z_t), target CLS vectors
(stage I) and candidate tokens (stage II). The reference code had a second, identical ViT copy
for stage II (spec 11.2); one copy is kept here.

Fixed (cannot change a number): ties in the re-ranked order keep the first-stage order (CR's
argsort is unstable); queries whose target is not among the K are re-ranked like the others
(CR set their scores to -99999.99 using the labels, spec 11.5). Switches (reference default):
`fixes.step_cosine`, `method.noisy_z_t`, `method.token_precision` (README deviations).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli import metrics
from cir_cli.backbones import build_backbone
from cir_cli.backbones.blip import convert_blip_state, read_blip_checkpoint
from cir_cli.cache import memoised_fingerprint
from cir_cli.candidates import load_candidates
from cir_cli.checkpoints import extract_state_dict, load_state_dict_strict, load_torch_checkpoint
from cir_cli.data import get_dataset
from cir_cli.errors import CirError
from cir_cli.evaluation import (
    RANKING_DEPTH,
    SplitResult,
    evaluate_split,
    split_representations,
)
from cir_cli.methods.base import CIRMethod
from cir_cli.methods.rerank_config import RerankMethodConfig
from cir_cli.methods.training import CachedRowsStage, TripletTrainingTask
from cir_cli.modules.dual_encoder import DualEncoderConfig, DualEncoderScorer, init_from_bert
from cir_cli.progress import progress_bar
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from pathlib import Path

    from cir_cli.cache import FeatureCache
    from cir_cli.config import CombinerConfig, FinetuneConfig, Recipe
    from cir_cli.data.base import CIRSplit

# Scores of (query, candidate) pairs whose candidate slot is padding.
_PAD_SCORE = -math.inf


@register_method("rerank", config=RerankMethodConfig)
class Rerank(CIRMethod):
    cfg: RerankMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        if recipe.backbone.name != "blip":
            raise CirError(
                f"method rerank needs backbone.name = 'blip' (got '{recipe.backbone.name}')"
            )
        size = recipe.data.image_size
        self.backbone = build_backbone(recipe.backbone)
        if size is not None and size != self.backbone.image_size:
            raise CirError(
                f"data.image_size = {size} differs from the BLIP model's {self.backbone.image_size}"
                " px; set backbone.image_size instead"
            )
        # BLIP's ITC temperature; model_base.pth's value replaces it below.
        self.temp = nn.Parameter(torch.tensor(0.07))
        pretrained = recipe.backbone.pretrained
        if pretrained and _is_blip_file(pretrained):
            self._load_temp(pretrained)
        text_config = self.backbone.text_encoder.config
        dual = DualEncoderConfig.from_text_config(text_config, self.cfg.merge_from_layer)
        self.scorer = DualEncoderScorer(dual)
        # Both branches start from the pre-trained BERT (model_base.pth's text_encoder), not
        # from stage I's fine-tuned one (spec 5): the backbone holds model_base right now.
        init_from_bert(self.scorer, self.backbone.text_encoder.state_dict(), "stage-II init")
        # True once stage-II weights were loaded (or while stage II trains): only then can
        # validation re-rank.
        self.scorer_ready = False
        # Stage I turns re-ranking off for its own validations.
        self.rerank_disabled = False
        self.representation_dtype = (
            torch.float16 if self.cfg.token_precision == "fp16" else torch.float32
        )
        self.enc_token_id = self.backbone.tokenizer.convert_tokens_to_ids("[ENC]")

    def _load_temp(self, path: str) -> None:
        from pathlib import Path

        state = read_blip_checkpoint(Path(path).expanduser())
        if "temp" in state:
            with torch.no_grad():
                self.temp.copy_(state["temp"].reshape(()))

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    # -- texts and towers --------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask padded to the longest, [ENC] over [CLS] (spec 2). CR does not truncate;
        only texts longer than the position table (BERT: 512) are cut, where CR would crash."""
        limit = self.backbone.text_encoder.config.max_position_embeddings
        enc = self.backbone.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=limit, return_tensors="pt"
        )
        ids = enc["input_ids"].clone()
        ids[:, 0] = self.enc_token_id
        return ids.to(self.device), enc["attention_mask"].to(self.device)

    def stage1_states(
        self, reference: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, D) last hidden states of the caption cross-attending to the reference's
        tokens (all-ones image mask): CR's z_t, and h of stage I."""
        reference = reference.to(self.device, torch.float32)
        image_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=self.device)
        return self.backbone.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=reference,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        """All 577 ViT tokens after the final LayerNorm, (B, T, 768)."""
        return self.backbone.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state

    def image_cache_key(self) -> str | None:
        weights = memoised_fingerprint(self.backbone.vision_model)
        precision = self.cfg.token_precision
        return f"blip-tokens-{self.backbone.arch}-{weights}-{self.preprocessing_id()}-{precision}"

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        h = self.stage1_states(reference, ids, mask)
        return F.normalize(self.backbone.text_proj(h[:, 0]).float(), dim=-1)

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        cls = representation[:, 0].to(self.device, torch.float32)
        return F.normalize(self.backbone.vision_proj(cls).float(), dim=-1)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_representation(pixels)

    # -- stage II scoring --------------------------------------------------------------------

    def pair_scores(
        self, ids: torch.Tensor, mask: torch.Tensor, z_t: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """(R,) stage-II scores of R (query, candidate) rows."""
        return self.scorer(ids, mask, z_t, candidates.to(self.device, torch.float32))

    @torch.no_grad()
    def score_candidates(
        self,
        reps: Any,
        ref_rows: torch.Tensor,
        texts: list[str],
        cand_rows: torch.Tensor,
        pairs_per_batch: int = 64,
        query_chunk: int = 32,
    ) -> torch.Tensor:
        """(Q, K) stage-II scores of each query's K candidates (rows of `reps`; -1 = padding,
        scored -inf). z_t is computed once per query, in eval mode (spec 6)."""
        was_training = self.training
        self.eval()
        q_total, k = cand_rows.shape
        out = torch.full((q_total, k), _PAD_SCORE)
        with progress_bar("re-ranking", q_total) as advance:
            for start in range(0, q_total, query_chunk):
                rows = slice(start, start + query_chunk)
                ids, mask = self.tokenize(texts[rows])
                z_t = self.stage1_states(reps[ref_rows[rows]], ids, mask)
                cands = cand_rows[rows]
                q_idx, k_idx = (cands >= 0).nonzero(as_tuple=True)
                scores = []
                for p in range(0, len(q_idx), pairs_per_batch):
                    qi, ki = q_idx[p : p + pairs_per_batch], k_idx[p : p + pairs_per_batch]
                    tokens = reps[cands[qi, ki]]
                    dev = qi.to(self.device)
                    scores.append(self.pair_scores(ids[dev], mask[dev], z_t[dev], tokens).cpu())
                if scores:
                    out[start + q_idx, k_idx] = torch.cat(scores).float()
                advance(cands.shape[0])
        self.train(was_training)
        return out

    # -- re-ranking in evaluation ------------------------------------------------------------

    def reranking(self) -> bool:
        """Whether validation re-ranks (rerank.candidates set and stage II available)."""
        source = self.recipe.rerank.candidates
        if self.rerank_disabled or not source:
            return False
        if not self.scorer_ready:
            raise CirError(
                f"rerank.candidates = {source!r} but no stage-II weights were loaded: pass "
                "--checkpoint <train-combiner run> or the published stage2 blip_mean.pt, or "
                "--set rerank.candidates='' to evaluate stage I alone"
            )
        return True

    def rerank_split(
        self,
        split: CIRSplit,
        cache: FeatureCache | None,
        batch_size: int,
        num_workers: int,
        rank_chunk: int,
        depth: int,
    ) -> SplitResult | None:
        """The split's result re-ranked by stage II (None when re-ranking is off)."""
        if not self.reranking():
            return None
        if get_dataset(split.dataset).candidate_prefix is None:
            raise CirError(
                f"re-ranking follows the CIRR / FashionIQ protocols; {split.label} is not one"
            )
        cfg = self.recipe.rerank
        k = cfg.k
        names, reps = split_representations(self, split, cache, batch_size, num_workers)
        row_of = {n: i for i, n in enumerate(names)}
        if cfg.candidates == "self":
            first = evaluate_split(
                self,
                split,
                batch_size=batch_size,
                rank_chunk=rank_chunk,
                representations=(names, reps),
                depth=max(k, depth),
            )
            lists, list_scores = first.top, first.top_scores
        else:
            cands = load_candidates(cfg.candidates, split)
            if cands.k < k:
                raise CirError(
                    f"{cfg.candidates}: {cands.k} candidates per query, fewer than rerank.k = {k}"
                )
            lists, list_scores = cands.names, cands.scores
            first = result_from_lists(split, lists, list_scores)
        if cfg.fusion == "sum" and list_scores is None:
            raise CirError(
                f"rerank.fusion = 'sum' needs first-stage scores; {cfg.candidates} has none "
                "(the reference's top-K files hold names only)"
            )
        texts = self.query_texts(split)
        ref_rows = torch.tensor([row_of[t.reference] for t in split.triplets])
        cand_rows = torch.tensor([[row_of[n] for n in row[:k]] for row in lists])
        final = self.score_candidates(reps, ref_rows, texts, cand_rows, cfg.batch_size)
        if cfg.fusion == "sum":
            final = final + cfg.fusion_weight * torch.tensor([row[:k] for row in list_scores])
        # Stable: ties keep the first-stage order (CR's argsort was not stable).
        order = torch.sort(final, dim=1, descending=True, stable=True).indices
        keep = max(depth, RANKING_DEPTH)

        result = SplitResult(split)
        result.first_stage = first
        for q, row in enumerate(lists):
            head = [row[j] for j in order[q].tolist()]
            result.top.append(head + list(row[k:keep]))
            tail = [] if list_scores is None else list(list_scores[q][k:keep])
            result.top_scores.append(final[q, order[q]].tolist() + tail)
        self._score_recalls(split, result, first, lists, k)
        if split.has_groups and split.remove_reference:
            self._rerank_subset(split, result, reps, row_of, ref_rows, texts, lists, list_scores)
        return result

    def _score_recalls(
        self, split: CIRSplit, result: SplitResult, first: SplitResult, lists, k: int
    ) -> None:
        if not all(t.target is not None for t in split.triplets):
            return
        ranks = []
        for q, t in enumerate(split.triplets):
            head = result.top[q][:k]
            if t.target in head:
                ranks.append(head.index(t.target))
            else:  # first-stage rank (a list without the target: the gallery size, a miss)
                ranks.append(int(first.target_ranks[q]))
        result.target_ranks = torch.tensor(ranks, dtype=torch.long)
        ks = get_dataset(split.dataset).recall_ks
        result.recall = metrics.recall_from_ranks(result.target_ranks, ks)

    def _rerank_subset(
        self, split, result, reps, row_of, ref_rows, texts, lists, list_scores
    ) -> None:
        """CIRR subset (spec 6.5): stage II scores the 5 non-reference members directly."""
        cfg = self.recipe.rerank
        members = [[m for m in t.group if m != t.reference] for t in split.triplets]
        width = max(len(m) for m in members)
        rows = torch.full((len(members), width), -1, dtype=torch.long)
        for q, m in enumerate(members):
            rows[q, : len(m)] = torch.tensor([row_of[n] for n in m], dtype=torch.long)
        scores = self.score_candidates(reps, ref_rows, texts, rows, cfg.batch_size)
        if cfg.fusion == "sum":
            for q, m in enumerate(members):
                known = dict(zip(lists[q], list_scores[q], strict=False))
                # A member below the list scores at most the list's last score.
                floor = list_scores[q][-1]
                for j, n in enumerate(m):
                    scores[q, j] += cfg.fusion_weight * known.get(n, floor)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        gidx = split.gallery_index
        result.subset_top = [
            [members[q][j] for j in order[q].tolist() if j < len(members[q])]
            for q in range(len(members))
        ]
        if all(t.target is not None for t in split.triplets):
            ordered = torch.full_like(rows, -1)
            groups = torch.full_like(rows, -1)
            for q, ranked in enumerate(result.subset_top):
                ordered[q, : len(ranked)] = torch.tensor([gidx[n] for n in ranked])
                groups[q, : len(ranked)] = torch.tensor([gidx[n] for n in members[q]])
            targets = torch.tensor([gidx[t.target] for t in split.triplets])
            result.subset_recall = metrics.subset_recall_at_k(
                ordered, targets, groups, metrics.CIRR_SUBSET_KS
            )

    # -- checkpoints ---------------------------------------------------------------------------

    def prepare_for_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        if any(k.startswith("scorer.") for k in state):
            self.scorer_ready = True

    def import_published(self, file: Path) -> None:
        """The published files (spec 3, 5, 8), strictly, with weights_only=True:
        `{'BLIP_Retrieval': ...}` (stage I: visual_encoder.*, text_encoder.* with cross-attention,
        vision_proj, text_proj, temp), `{'BLIP_NLVR': ...}` (stage II: visual_encoder.*,
        text_encoder.* of the dual encoder, cls_head.*), and BLIP's `model_base.pth`
        (`{'model': ...}`: the towers and temp). `optimizer_state_dict`, `epoch` and
        `position_ids` are ignored."""
        ckpt = load_torch_checkpoint(file)
        if "BLIP_Retrieval" in ckpt:
            self.load_stage1_state(extract_state_dict(ckpt, "BLIP_Retrieval", file), str(file))
        elif "BLIP_NLVR" in ckpt:
            self.load_stage2_state(extract_state_dict(ckpt, "BLIP_NLVR", file), str(file))
        elif "model" in ckpt:
            self.backbone.load_blip_checkpoint(file)
            self._load_temp(str(file))
        else:
            raise CirError(
                f"{file}: not a re-ranking checkpoint (expected a 'BLIP_Retrieval' (stage I), "
                f"'BLIP_NLVR' (stage II) or 'model' entry; found {sorted(map(str, ckpt))[:8]})"
            )

    def load_stage1_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A `BLIP_Retrieval` state dict: converted like model_base (timm ViT names, pos_embed
        resized if needed) and loaded strictly into the towers; `temp` into the temperature."""
        _check_layout(
            state,
            "BLIP_Retrieval",
            source,
            must=("temp", "text_proj.weight"),
            forbid=("cls_head.",),
        )
        rest = {k: v for k, v in state.items() if k != "temp"}
        other = [
            k
            for k in rest
            if not k.startswith(("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj."))
        ]
        if other:
            raise CirError(f"{source}: BLIP_Retrieval has unexpected keys: {', '.join(other[:5])}")
        converted = convert_blip_state(rest, self.backbone.grid, source)
        load_state_dict_strict(self.backbone, converted, source, ignore=["position_ids"])
        with torch.no_grad():
            self.temp.copy_(state["temp"].reshape(()))

    def load_stage2_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A `BLIP_NLVR` state dict: `text_encoder.*` + `cls_head.*` strictly into the dual
        encoder; `visual_encoder.*` (the stage-II ViT copy) strictly into the shared ViT."""
        _check_layout(
            state,
            "BLIP_NLVR",
            source,
            must=("cls_head.0.weight",),
            forbid=("text_proj.", "vision_proj.", "temp"),
        )
        vit = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
        scorer = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
        load_state_dict_strict(self.scorer, scorer, source, ignore=["position_ids"])
        if vit:
            converted = convert_blip_state(vit, self.backbone.grid, source)
            load_state_dict_strict(
                self.backbone.vision_model,
                {k.removeprefix("vision_model."): v for k, v in converted.items()},
                source,
                ignore=["position_ids"],
            )
        self.scorer_ready = True

    def describe(self) -> dict[str, Any]:
        cfg = self.recipe.rerank
        return {
            "method": self.name,
            "backbone": self.backbone.source,
            "stage2_loaded": self.scorer_ready,
            "rerank": {
                "candidates": cfg.candidates,
                "k": cfg.k,
                "fusion": cfg.fusion,
                "fusion_weight": cfg.fusion_weight,
            },
        }

    # -- training ----------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> RerankStage1:
        return RerankStage1(self, device, self.recipe.finetune, **self.task_sections())

    def combiner_task(self, device: torch.device) -> RerankStage2:
        if not self.recipe.rerank.candidates:
            # Validating stage II means re-ranking: the method's own stage-I list by default
            # (the checkpoint records this recipe).
            recipe = self.recipe.model_copy(deep=True)
            recipe.rerank.candidates = "self"
            self.recipe = recipe
        recipe = self.recipe
        return RerankStage2(
            self, device, recipe.combiner, finetune=recipe.finetune, **self.task_sections()
        )


def _is_blip_file(pretrained: str) -> bool:
    from pathlib import Path

    return Path(pretrained).expanduser().is_file()


def _check_layout(
    state: dict[str, torch.Tensor], entry: str, source: str, must: tuple, forbid: tuple
) -> None:
    """One clear error when a file's entry holds the other stage's layout."""
    missing = [k for k in must if k not in state]
    wrong = [k for k in state if k.startswith(forbid)]
    if missing or wrong:
        other = "BLIP_NLVR (stage II)" if entry == "BLIP_Retrieval" else "BLIP_Retrieval (stage I)"
        found = wrong[0] if wrong else f"no {missing[0]}"
        raise CirError(
            f"{source}: '{entry}' does not hold the {entry} layout ({found}); is it a "
            f"{other} state dict?"
        )


def result_from_lists(
    split: CIRSplit, lists: list[list[str]], scores: list[list[float]] | None
) -> SplitResult:
    """A SplitResult for a first stage given only as candidate lists: recalls from positions
    in the lists (a target beyond the list is a miss), subset order = list order (members
    outside the list are filtered out, as metrics.subset_recall_at_k does)."""
    result = SplitResult(split, top=[list(r) for r in lists])
    result.top_scores = [list(r) for r in scores] if scores is not None else []
    if not all(t.target is not None for t in split.triplets):
        return result
    gidx = split.gallery_index
    ranks = [
        row.index(t.target) if t.target in row else len(split.gallery)
        for t, row in zip(split.triplets, lists, strict=True)
    ]
    ks = get_dataset(split.dataset).recall_ks
    result.target_ranks = torch.tensor(ranks, dtype=torch.long)
    result.recall = metrics.recall_from_ranks(result.target_ranks, ks)
    if split.has_groups and split.remove_reference:
        width = max(len(r) for r in lists)
        ranked = torch.full((len(lists), width), -1, dtype=torch.long)
        groups = torch.full((len(lists), 6), -1, dtype=torch.long)
        for q, (t, row) in enumerate(zip(split.triplets, lists, strict=True)):
            ranked[q, : len(row)] = torch.tensor([gidx[n] for n in row])
            members = [gidx[m] for m in t.group if m != t.reference][:6]
            groups[q, : len(members)] = torch.tensor(members, dtype=torch.long)
        targets = torch.tensor([gidx[t.target] for t in split.triplets])
        result.subset_recall = metrics.subset_recall_at_k(
            ranked, targets, groups, metrics.CIRR_SUBSET_KS
        )
    return result


# ------------------------------------------------------------------------------------------------
# Training


class _RerankTask(CachedRowsStage, TripletTrainingTask):
    model: Rerank

    def gather(self, indices: list[int]):
        from cir_cli.data.training import training_text

        idx = torch.tensor(indices)
        texts = [training_text(self.split, self.policy, self.seed, self.epoch, i) for i in indices]
        return self.features[self.ref_rows[idx]], self.features[self.tgt_rows[idx]], texts


class RerankStage1(_RerankTask):
    """Stage I (spec 3): text encoder (with cross-attention), text_proj and temp train."""

    stage = "finetune"

    def __init__(self, model: Rerank, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        model.rerank_disabled = True
        self.rows, self.features = self.train_image_features(lazy=True)
        self.index_triplet_rows(self.rows)

    def param_groups(self) -> list[dict]:
        b = self.model.backbone
        params = [*b.text_encoder.parameters(), *b.text_proj.parameters(), self.model.temp]
        return [{"params": params, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]


    def set_train_mode(self) -> None:
        self.model.eval()
        self.model.backbone.text_encoder.train()  # BERT dropout 0.1 as CR; the ViT is cached

    def compute_loss(self, batch):
        from cir_cli.engine.distributed import global_batch

        model = self.model
        refs, tgts, texts = batch
        ids, mask = model.tokenize(texts)
        h = model.stage1_states(refs.to(self.device), ids, mask)
        queries = F.normalize(model.backbone.text_proj(h[:, 0]).float(), dim=-1)
        with torch.no_grad():  # targets under no_grad: vision_proj gets no gradient (spec 3)
            targets = model.targets_from_representation(tgts)
        all_targets, labels = global_batch(targets)
        loss = F.cross_entropy(queries @ all_targets.T / model.temp, labels)
        return loss, {"temp": float(model.temp.detach())}


class RerankStage2(_RerankTask):
    """Stage II (spec 5): the dual encoder + cls_head train on in-batch B x B pairs."""

    stage = "combiner"

    def __init__(
        self,
        model: Rerank,
        device: torch.device,
        cfg: CombinerConfig,
        *,
        finetune: FinetuneConfig,
        **sections: Any,
    ) -> None:
        super().__init__(model, device, cfg, **sections)
        self.finetune = finetune
        if not finetune.checkpoint:
            raise CirError(
                "stage II needs the trained stage I: set finetune.checkpoint (a finetune run, "
                "'latest', or the published stage1 blip_mean.pt)"
            )
        model.scorer_ready = True
        self.rows, self.features = self.train_image_features(lazy=True)
        self.index_triplet_rows(self.rows)

    def param_groups(self) -> list[dict]:
        wd = self.cfg.weight_decay
        return [
            {"params": list(self.model.scorer.parameters()), "lr": self.cfg.lr, "weight_decay": wd}
        ]


    def set_train_mode(self) -> None:
        self.model.eval()
        self.model.scorer.train()
        if self.model.cfg.noisy_z_t:
            self.model.backbone.text_encoder.train()  # CR: stage I in train mode (dropout)

    def checkpoint_metadata(self) -> dict:
        meta = super().checkpoint_metadata()
        from cir_cli.runs import resolve_weights_file

        meta["base_checkpoint"] = str(resolve_weights_file(self.finetune.checkpoint).resolve())
        return meta

    def compute_loss(self, batch):
        model = self.model
        refs, tgts, texts = batch
        ids, mask = model.tokenize(texts)
        with torch.no_grad():
            z_t = model.stage1_states(refs.to(self.device), ids, mask)
        logits = pair_logits(model, ids, mask, z_t, tgts.to(self.device))
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels), {}


def pair_logits(
    model: Rerank, ids: torch.Tensor, mask: torch.Tensor, z_t: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """(B, B) s_ij = score(query i, target j) (spec 5). CR ran B passes of B rows; one pass of
    B² rows gives the same scores with far fewer kernel launches, and no more memory (autograd
    kept every pass's activations for the backward anyway)."""
    b = ids.shape[0]
    rows = torch.arange(b, device=ids.device).repeat_interleave(b)  # query of each pair
    cols = torch.arange(b, device=ids.device).repeat(b)  # target of each pair
    scores = model.pair_scores(ids[rows], mask[rows], z_t[rows], targets[cols])
    return scores.view(b, b)
