"""Bi-BLIP4CIR (Liu et al., WACV 2024): BLIP ViT-B towers, forward + reversed queries.

Spec clip4cir_blip4cir.md sections 3.1 (encoders), 3.3 (stage I), 4.3 (stage II), 7 (checkpoint
layouts) and 9 (what this fixes). A query is normalize(r + t) with raw BLIP features in stage I
(the element-wise sum) and the Combiner in stage II. Both stages add a *reversed* query: the
target image with the backward-marked text must retrieve the reference,

    L = L_f + w L_r,   w = method.finetune_reverse_weight / method.combiner_reverse_weight

(seeds: 0.4 / 0.5 on FashionIQ, 0.1 / 0.1 on CIRR; w = 0 is the BLIP4CIR baseline). Unlike the
seeds, the reversed logits never build B x B x D tensors: stage I uses the exact closed form of
spec 3.3, stage II the Combiner's factored first layers, in chunks of reference rows.

The image tower is always frozen, so its features are computed once per image through the
feature cache (the seeds re-encoded every image every epoch, spec 9.1); stage II also encodes
every caption variant x direction once before training.

Texts: the method reads captions with direction prompts (methods/prompts.py); evaluation asks
`query_texts(split)` for them, so the compat markers go into the raw captions before FashionIQ's
join exactly as in the published pipeline. `queries_from_representation` takes texts as the
model reads them; `forward_texts([...])` marks plain captions for notebook use.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cir_cli.backbones import build_backbone
from cir_cli.cache import memoised_fingerprint, state_fingerprint
from cir_cli.checkpoints import extract_state_dict, load_state_dict_strict, load_torch_checkpoint
from cir_cli.data.base import Triplet, caption_variants
from cir_cli.errors import CirError
from cir_cli.methods.base import FusedFeatureMethod
from cir_cli.methods.blip4cir_config import Blip4CirMethodConfig
from cir_cli.methods.prompts import DIRECTION_TOKENS, directed_text
from cir_cli.methods.training import CachedRowsStage, CombinerStage, TripletTrainingTask
from cir_cli.modules.combiner import CombinerParts
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from pathlib import Path

    from cir_cli.config import Recipe
    from cir_cli.data.base import CIRSplit
    from cir_cli.modules.combiner import Combiner


# --------------------------------------------------------------------------------------------
# Losses


def _global_targets(targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Targets of the global batch under torchrun (with gradients) and this rank's row offset."""
    from cir_cli.engine.distributed import gather_with_grad

    everything = gather_with_grad(targets)
    if everything.shape[0] == targets.shape[0]:
        return everything, 0
    import torch.distributed as dist

    return everything, dist.get_rank() * targets.shape[0]


def reversed_sum_logits(
    reference: torch.Tensor, targets: torch.Tensor, backward_text: torch.Tensor, scale: float
) -> torch.Tensor:
    """Stage I reversed logits (spec 3.3) in closed form, (B, N), with only B x N matmuls.

    logits_r[i, j] = scale · normalize(τ_j + u_i) · r̂_i, with r̂_i = normalize(reference_i)
    (raw in, normalised here), τ_j the *normalised* targets and u_i the raw backward texts:

        normalize(τ_j + u_i) · r̂_i = (τ_j·r̂_i + u_i·r̂_i) / max(‖τ_j + u_i‖, 1e-12),
        ‖τ_j + u_i‖² = ‖τ_j‖² + 2 u_i·τ_j + ‖u_i‖².
    """
    r_hat = F.normalize(reference, dim=-1)
    numerator = r_hat @ targets.T + (backward_text * r_hat).sum(-1, keepdim=True)
    squared = (
        (targets * targets).sum(-1)[None, :]
        + 2 * backward_text @ targets.T
        + (backward_text * backward_text).sum(-1, keepdim=True)
    )
    # max(sqrt(x), 1e-12) = sqrt(max(x, 1e-24)); clamping before the root keeps its gradient
    # finite where τ_j + u_i = 0.
    return scale * numerator / squared.clamp_min(1e-24).sqrt()


# Above this many (reference x target x hidden) activations the stage II pairing is checkpointed.
CHECKPOINT_PAIRS = 1 << 26


def reversed_combiner_logits(
    combiner: Combiner,
    reference: torch.Tensor,
    targets: torch.Tensor,
    backward_text: torch.Tensor,
    scale: float,
    chunk: int = 64,
) -> torch.Tensor:
    """Stage II reversed logits (spec 4.3), (B, N): scale · C(T_j, u_i) · normalize(r_i).

    The raw target T_j takes the Combiner's image slot and the backward text u_i the text slot.
    The first layers are computed once per row (`project_image` on the N targets,
    `project_text` on the B texts); only the pairwise ReLU/hidden part runs on pairs, a chunk of
    reference rows at a time. While training with large pairings (> CHECKPOINT_PAIRS) each chunk
    is checkpointed, so autograd keeps no (chunk, N, H) activations between chunks (dropout masks
    are replayed exactly).
    """
    image = combiner.project_image(targets).unsqueeze(0)  # (1, N, ·)
    text = combiner.project_text(backward_text)  # (B, ·)
    r_hat = F.normalize(reference, dim=-1)

    def block(hidden: torch.Tensor, gate: torch.Tensor, raw: torch.Tensor, refs: torch.Tensor):
        pairs = combiner.combine_parts(image, CombinerParts(hidden, gate, raw).unsqueeze(1))
        return scale * (pairs * refs[:, None, :]).sum(-1)  # (c, N)

    rows = []
    # Checkpointing trades a second forward for memory; it pays only when the pairwise
    # activations are large (seeds' CIRR stage II: 512 x 512 x 5120 per tensor, ~36 GB peak).
    pairs = backward_text.shape[0] * targets.shape[0] * combiner.hidden_dim
    use_checkpoint = torch.is_grad_enabled() and combiner.training and pairs > CHECKPOINT_PAIRS
    for start in range(0, backward_text.shape[0], chunk):
        part = slice(start, start + chunk)
        args = (text.hidden[part], text.gate[part], text.raw[part], r_hat[part])
        if use_checkpoint:
            rows.append(checkpoint(block, *args, use_reentrant=False))
        else:
            rows.append(block(*args))
    return torch.cat(rows)


def _ce(logits: torch.Tensor, offset: int) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------
# The method


@register_method("blip4cir", config=Blip4CirMethodConfig)
class Blip4Cir(FusedFeatureMethod):
    cfg: Blip4CirMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        if recipe.backbone.name != "blip":
            raise CirError(
                f"method blip4cir needs backbone.name = 'blip' (got '{recipe.backbone.name}')"
            )
        self.backbone = build_backbone(recipe.backbone)
        self.prompts = self.cfg.prompts
        if self.prompts == "token":
            # Real tokens, initialised where the compat prompt starts ("[", "forward", "]").
            tokens = tuple(DIRECTION_TOKENS.values())
            self.backbone.add_special_tokens(tokens, {t: t for t in tokens})
        size = recipe.data.image_size
        if size is not None and size != self.backbone.image_size:
            raise CirError(
                f"data.image_size = {size} differs from the BLIP model's {self.backbone.image_size}"
                " px; set backbone.image_size instead (the position grid is resized on loading)"
            )
        # Created by stage II or by loading a checkpoint that holds Combiner weights.
        self.combiner = None
        self.logit_scale = self.cfg.logit_scale

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    # -- towers and texts --------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw BLIP image features (B, 256)."""
        return self.backbone.encode_image(pixels.to(self.device))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw BLIP text features (B, 256) of texts as the model reads them (marked)."""
        tokens = {k: v.to(self.device) for k, v in self.backbone.tokenize(list(texts)).items()}
        return self.backbone.encode_text(tokens)

    def direction_text(
        self, triplet: Triplet, policy: str, direction: str, variant: int | None = None
    ) -> str:
        """`triplet`'s text in `direction` under `policy`, with this model's prompt mode."""
        return directed_text(triplet, policy, direction, self.prompts, variant)  # type: ignore

    def forward_texts(self, captions: list[str]) -> list[str]:
        """Plain modification texts -> the forward-marked texts this model reads."""
        return [
            self.direction_text(Triplet("", "", None, (c,)), "verbatim", "forward")
            for c in captions
        ]

    def query_texts(self, split: CIRSplit) -> list[str]:
        return [self.direction_text(t, split.caption_policy, "forward") for t in split.triplets]

    # -- method contract ---------------------------------------------------------------------

    def image_cache_key(self) -> str | None:
        # The image tower never trains in BLIP4CIR: its features are always cacheable.
        weights = memoised_fingerprint(self.backbone.image_module())
        return f"blip-image-{self.backbone.arch}-{weights}-{self.preprocessing_id()}"

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "combining": self.combining_in_use(),
            "prompts": self.prompts,
            "backbone": self.backbone.source,
        }

    # -- checkpoints -------------------------------------------------------------------------

    def import_published(self, file: Path) -> None:
        """The published .pt files (spec 7), loaded strictly with weights_only=True:
        `tuned_blip_{best,mean}.pt` = `{'epoch', 'BLIPTextEncoder': text_encoder.* + text_proj.*
        [, 'optimizer_state_dict']}` and `combiner{,_mean}.pt` = `{'epoch', 'Combiner': ...}`;
        only `optimizer_state_dict` and `position_ids` are ignored. BLIP's `model_base.pth`
        (`{'model': ...}`) loads the two towers.
        """
        ckpt = load_torch_checkpoint(file)
        if "BLIPTextEncoder" in ckpt:
            state = extract_state_dict(ckpt, "BLIPTextEncoder", file)
            vocab = state.get("text_encoder.embeddings.word_embeddings.weight")
            if (
                self.prompts == "token"
                and vocab is not None
                and vocab.shape[0] != len(self.backbone.tokenizer)
            ):
                raise CirError(
                    f"{file}: a compat-prompt text encoder ({vocab.shape[0]} tokens) cannot load "
                    "into method.prompts = 'token' (which adds [FORWARD]/[BACKWARD]); use 'compat'"
                )
            load_state_dict_strict(
                self.backbone.text_module(), state, str(file), ignore=["position_ids"]
            )
        elif "Combiner" in ckpt:
            self.import_combiner(ckpt, file)
        elif "model" in ckpt:
            self.backbone.load_blip_checkpoint(file)
        else:
            raise CirError(
                f"{file}: not a BLIP4CIR checkpoint (expected a 'BLIPTextEncoder', 'Combiner' or "
                f"'model' entry; found {sorted(map(str, ckpt))[:8]})"
            )

    # -- training ----------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> Blip4CirFinetune:
        return Blip4CirFinetune(self, device, self.recipe.finetune, **self.task_sections())

    def combiner_task(self, device: torch.device) -> Blip4CirCombinerTraining:
        recipe = self.recipe
        return Blip4CirCombinerTraining(
            self, device, recipe.combiner, finetune=recipe.finetune, **self.task_sections()
        )


class _DirectedTask(TripletTrainingTask):
    """Shared by both stages: forward / backward training texts per (seed, epoch, sample)."""

    model: Blip4Cir

    def variants(self, index: int) -> tuple[int | None, int | None]:
        """FashionIQ join variants (forward, backward) of sample `index` this epoch.

        The forward draw is the engine's (`sample_rng`, as for every method). compat draws the
        backward join independently, as the seeds' two `generate_randomized_fiq_caption` calls
        do; token mode uses the forward draw for both directions (spec bug 12).
        """
        from cir_cli.data.base import caption_variants
        from cir_cli.data.training import sample_rng

        triplet = self.split.triplets[index]
        if caption_variants(triplet, self.policy) != 4:
            return None, None
        seed = self.seed
        forward = sample_rng(seed, self.epoch, index).randrange(4)
        if self.model.prompts == "token":
            return forward, forward
        backward = random.Random(f"{seed}:{self.epoch}:{index}:backward").randrange(4)
        return forward, backward

    def directed_pair(self, index: int) -> tuple[str, str]:
        triplet = self.split.triplets[index]
        vf, vb = self.variants(index)
        return (
            self.model.direction_text(triplet, self.policy, "forward", vf),
            self.model.direction_text(triplet, self.policy, "backward", vb),
        )


class Blip4CirFinetune(CachedRowsStage, _DirectedTask):
    """Stage I (spec 3.3): the text tower + text_proj train on cached, frozen image features."""

    stage = "finetune"

    def __init__(self, model: Blip4Cir, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        if self.cfg.encoder != "text":
            raise CirError(
                f"finetune.encoder = '{self.cfg.encoder}': BLIP4CIR trains the text tower only "
                "(the image tower is frozen and cached, spec 3.3); set finetune.encoder = 'text'"
            )
        self.weight = model.cfg.finetune_reverse_weight
        # Stage I trains and validates the element-wise sum (spec 3.3), whatever the recipe's
        # `combining`: an untrained Combiner must not pick the best stage-I checkpoint.
        model.combiner = None
        self.rows, self.features = self.train_image_features()
        self.index_triplet_rows(self.rows)
        if self.cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)

    def gather(self, indices: list[int]):
        idx = torch.tensor(indices)
        pairs = [self.directed_pair(i) for i in indices]
        return (
            self.features[self.ref_rows[idx]],
            self.features[self.tgt_rows[idx]],
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )

    def param_groups(self) -> list[dict]:
        backbone = self.model.backbone
        proj = {id(p) for p in backbone.text_proj.parameters()}
        body = [p for p in backbone.text_parameters() if id(p) not in proj]
        method = self.model.cfg
        return [
            {"params": body, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay},
            # Second: the seeds schedule group 0 only (onlyGroup0=True), so with
            # finetune.schedule_groups = "first" text_proj stays at 100x lr all run.
            {
                "params": list(backbone.text_proj.parameters()),
                "lr": self.cfg.lr * method.text_proj_lr_scale,
                "weight_decay": self.cfg.weight_decay,
            },
        ]

    def set_train_mode(self) -> None:
        self.model.eval()
        # BERT dropout (0.1) is active while fine-tuning, as in the seeds; the ViT stays eval.
        self.model.backbone.text_encoder.train()

    def compute_loss(self, batch):
        refs, tgts, forward_texts, backward_texts = batch
        refs = refs.to(self.device).float()
        targets = F.normalize(tgts.to(self.device).float(), dim=-1)
        text = self.model.encode_texts(forward_texts).float()
        all_targets, offset = _global_targets(targets)
        scale = self.model.logit_scale
        queries = F.normalize(refs + text, dim=-1)
        loss_f = _ce(scale * queries @ all_targets.T, offset)
        parts = {"loss_forward": float(loss_f.detach())}
        if self.weight == 0:
            return loss_f, parts
        backward = self.model.encode_texts(backward_texts).float()
        loss_r = _ce(reversed_sum_logits(refs, all_targets, backward, scale), offset)
        parts["loss_reversed"] = float(loss_r.detach())
        return loss_f + self.weight * loss_r, parts


class Blip4CirCombinerTraining(CombinerStage, _DirectedTask):
    """Stage II (spec 4.3): the Combiner on cached image features and precomputed texts.

    Every caption variant x direction is encoded once (FashionIQ: 4 joins x 2 directions per
    triplet; CIRR: 1 x 2) with the frozen stage-I text tower, through the feature cache; an
    epoch is then MLP work on in-memory tensors.
    """

    stage = "combiner"

    def __init__(self, model: Blip4Cir, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        self.weight = model.cfg.combiner_reverse_weight
        if model.combiner is None:
            model.add_combiner()
            model.combiner.to(self.device)
        self.rows, self.image_feats = self.train_image_features()
        per_direction: dict[str, list[list[str]]] = {"forward": [], "backward": []}
        for t in self.split.triplets:
            n = caption_variants(t, self.policy)
            for direction, out in per_direction.items():
                variants = list(range(n)) if n > 1 else [None]
                out.append([model.direction_text(t, self.policy, direction, v) for v in variants])
        texts = list(
            dict.fromkeys(s for vs in (*per_direction.values(),) for row in vs for s in row)
        )
        fingerprint = state_fingerprint(model.backbone.text_module())
        key = f"blip-text-{model.backbone.arch}-{model.prompts}-{fingerprint}"
        self.text_feats = self.cache.get_or_compute(key, texts, self.encode_texts_once)
        row_of = {s: i for i, s in enumerate(texts)}
        self.variant_rows = {
            direction: torch.tensor(
                [[row_of[r[min(j, len(r) - 1)]] for j in range(max(map(len, rows)))] for r in rows]
            )
            for direction, rows in per_direction.items()
        }
        self.index_triplet_rows(self.rows)

    def gather(self, indices: list[int]):
        idx = torch.tensor(indices)
        drawn = [self.variants(i) for i in indices]
        forward = torch.tensor([v[0] or 0 for v in drawn])
        backward = torch.tensor([v[1] or 0 for v in drawn])
        return (
            self.image_feats[self.ref_rows[idx]],
            self.text_feats[self.variant_rows["forward"][idx, forward]],
            self.text_feats[self.variant_rows["backward"][idx, backward]],
            self.image_feats[self.tgt_rows[idx]],
        )

    def compute_loss(self, batch):
        refs, forward, backward, tgts = (t.to(self.device, non_blocking=True) for t in batch)
        combiner = self.model.combiner
        scale = self.model.logit_scale
        all_targets, offset = _global_targets(tgts)
        queries = combiner.combine_features(refs, forward)
        loss_f = _ce(scale * queries @ F.normalize(all_targets, dim=-1).T, offset)
        parts = {"loss_forward": float(loss_f.detach())}
        if self.weight == 0:
            return loss_f, parts
        logits_r = reversed_combiner_logits(
            combiner, refs, all_targets, backward, scale, self.model.cfg.reverse_chunk
        )
        loss_r = _ce(logits_r, offset)
        parts["loss_reversed"] = float(loss_r.detach())
        return loss_f + self.weight * loss_r, parts
