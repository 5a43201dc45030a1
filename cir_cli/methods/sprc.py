"""SPRC (Bai et al., ICLR 2024): sentence-level prompts on a BLIP-2 Q-Former.

Spec: sprc_cala.md section 1 (model, losses, training), 2 (validation, checkpoints), 4.4 (key
map). Built on `Blip2Backbone` (transformers, no LAVIS at run time). Single stage: `cir finetune`.

Image representation (what the feature cache stores, once per image, reused by training and
evaluation) = the frozen ViT's tokens *before* ln_vision, (T, Dv) per image (257 x 1408 for
ViT-g), fp16 when `backbone.precision` is fp16/bf16. Queries: pass 1 (P-mm: query tokens +
caption attend to the reference) yields the 32-token prompt P; pass 2 ([P, CLS, caption], no
image) gives f_q = norm(text_proj(h[:, Nq])). Targets: the Nq projected query tokens of P-img,
(N, Nq, E); score = max over them.

Differences from the published code, on purpose:
- OneCycle (the engine's "onecycle" schedule, finetune.*) spans finetune.schedule_epochs: 80 in
  the CIRR recipes as SPRC's script, whatever the run length (a 50-epoch run stops at ~62% of
  the cosine); fixes.onecycle_spans_run spans the run instead. Past its end the final lr holds
  (SPRC's script crashed above 80 epochs). Beta1 cycling is explicit (`cycle_momentum`).
- The prompt's CLS index is num_query_tokens, not a hard-coded 32; loss_align expands the
  (1, D) prompt mean explicitly instead of broadcasting with a warning.
- Under torchrun the targets of all ranks are gathered (N processes = one process's batch).
- Loading published checkpoints is strict up to a printed list of intentionally dropped keys.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli.backbones import build_backbone
from cir_cli.checkpoints import extract_state_dict, load_torch_checkpoint
from cir_cli.errors import CirError
from cir_cli.methods.base import CIRMethod
from cir_cli.methods.sprc_config import SprcMethodConfig
from cir_cli.methods.training import CachedRowsStage, TripletTrainingTask
from cir_cli.ranking import max_over_tokens_score
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from pathlib import Path

    from cir_cli.config import Recipe

# SPRC's checkpoint entry (spec 2.5): {"epoch": int, "Blip2QformerCirAlignPrompt": state_dict}.
SPRC_CHECKPOINT_KEY = "Blip2QformerCirAlignPrompt"
_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS `blip_caption` (eval) preprocessing (spec 1.6).

    Lowercase; each of . ! " ( ) * # : ; ~ becomes a space; repeated whitespace collapses; strip;
    keep the first 50 words.
    """
    text = _CAPTION_PUNCT.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


@register_method("sprc", config=SprcMethodConfig)
class Sprc(CIRMethod):
    cfg: SprcMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        if recipe.backbone.name != "blip2":
            raise CirError(
                f"method sprc needs backbone.name = 'blip2' (got {recipe.backbone.name!r})"
            )
        self.backbone = build_backbone(recipe.backbone)
        nq, hidden = self.backbone.num_query_tokens, self.backbone.hidden_size
        if self.cfg.max_text_length + nq > self.backbone.qformer.config.max_position_embeddings:
            raise CirError(
                f"method.max_text_length {self.cfg.max_text_length} + {nq} query tokens exceed "
                f"the Q-Former's {self.backbone.qformer.config.max_position_embeddings} positions"
            )
        # The learnable auxiliary text prompt (spec 1.1): one global (1, Nq, D) tensor.
        self.prompt_tokens = nn.Parameter(torch.empty(1, nq, hidden).normal_(0.0, 0.02))

    @property
    def representation_dtype(self) -> torch.dtype:
        # The cached ViT tokens are large (257 x 1408 per ViT-g image): fp16 halves them. LAVIS
        # runs this tower in fp16 anyway; bf16 runs are stored as fp16 too (numpy has no bf16).
        return torch.float32 if self.recipe.backbone.precision == "fp32" else torch.float16

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption preprocessing (spec 1.6) + BERT ids padded to max_text_length."""
        return self.backbone.tokenize(
            [blip_caption(t) for t in texts], max_length=self.cfg.max_text_length
        )

    # -- the two passes ----------------------------------------------------------------------

    def fusion_prompt(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Pass 1 (P-mm): the Nq query outputs = the sentence-level prompt P, (B, Nq, D)."""
        nq = self.backbone.num_query_tokens
        return self.backbone.multimodal_outputs(image_embeds, ids, mask)[:, :nq]

    def compose(self, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pass 2 (P-prefix, no image): f_q = norm(text_proj(h[:, Nq])), the caption's CLS."""
        hidden = self.backbone.prefix_text_outputs(prompt, ids, mask, spliced=False)
        return self.backbone.project_text(hidden[:, prompt.shape[1]])

    def prompt_query(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """rtc path: [CLS, prompt_tokens, caption[1:]] with positions, no image; CLS output."""
        hidden = self.backbone.prefix_text_outputs(self.prompt_tokens, ids, mask, spliced=True)
        return self.backbone.project_text(hidden[:, 0])

    def target_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """P-img, projected and normalised per token: (B, Nq, E)."""
        return self.backbone.project_image(self.backbone.query_outputs(image_embeds))

    # -- method contract -----------------------------------------------------------------------

    def image_cache_key(self) -> str | None:
        # The ViT never trains, so its tokens are always cacheable.
        return self.backbone.token_cache_key(
            self.recipe.backbone.precision, self.preprocessing_id()
        )

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.vision_tokens(pixels).to(self.representation_dtype)

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        # SPRC runs both passes in fp32 at inference (spec 1.5).
        with torch.autocast(device_type=self.device.type, enabled=False):
            image = self.backbone.image_embeds(reference.to(self.device))
            ids, mask = self.tokenize(texts)
            return self.compose(self.fusion_prompt(image, ids, mask), ids, mask).float()

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        # The representations may be a whole gallery (N x 257 x 1408): embed it in batches.
        batch = self.recipe.eval.batch_size
        out = []
        with torch.autocast(device_type=self.device.type, enabled=False):
            for start in range(0, representation.shape[0], batch):
                chunk = representation[start : start + batch].to(self.device)
                out.append(self.target_features(self.backbone.image_embeds(chunk)).float())
        if not out:
            return torch.empty(0, self.backbone.num_query_tokens, self.backbone.feature_dim)
        return torch.cat(out)

    def score(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(Q, E) x (N, Nq, E) -> (Q, N): max over the target's query tokens (spec 1.5)."""
        if targets.dim() == 2:
            return queries @ targets.T
        return max_over_tokens_score(queries, targets)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Target features (B, Nq, E) of images."""
        return self.targets_from_representation(self.image_representation(pixels))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Text-only features norm(text_proj(CLS of P-txt)), (B, E)."""
        ids, mask = self.tokenize(texts)
        return self.backbone.project_text(self.backbone.text_outputs(ids, mask)[:, 0])

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "backbone": self.backbone.source, "arch": self.backbone.arch}

    # -- checkpoints -----------------------------------------------------------------------------

    def import_published(self, file: Path) -> None:
        """SPRC's published files (`sprc_cirr.pt`, `sprc_fiq.pt`: {"epoch",
        SPRC_CHECKPOINT_KEY: sd}; also accepted: {"model": sd} or a bare state dict, with or
        without `module.`). Our own checkpoints load through `CIRMethod.load_checkpoint`.

        Published files are converted with the spec's key map and loaded strictly; the only
        tolerated differences are printed (LM head, position_ids buffer; the ViT if absent).
        """
        ckpt = load_torch_checkpoint(file)
        key = next((k for k in (SPRC_CHECKPOINT_KEY, "model", "state_dict") if k in ckpt), None)
        if key is not None:
            state = extract_state_dict(ckpt, key, file)
        elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = dict(ckpt)
        else:
            raise CirError(
                f"{file}: not an SPRC checkpoint (expected a {SPRC_CHECKPOINT_KEY!r} entry; "
                f"found {sorted(ckpt)[:8]})"
            )
        converted = self.backbone.convert_lavis(state, str(file), extra_keys=("prompt_tokens",))
        prompt = converted.extras.get("prompt_tokens")
        if prompt is None:
            raise CirError(
                f"{file}: no prompt_tokens, so not an SPRC checkpoint (a BLIP-2 pretrain file "
                "belongs in backbone.pretrained)"
            )
        if tuple(prompt.shape) != tuple(self.prompt_tokens.shape):
            raise CirError(
                f"{file}: prompt_tokens {tuple(prompt.shape)} does not fit "
                f"{tuple(self.prompt_tokens.shape)} (wrong backbone.arch?)"
            )
        self.backbone.load_converted(converted, str(file), allow_missing_vision=True)
        with torch.no_grad():
            self.prompt_tokens.copy_(prompt.to(self.prompt_tokens.dtype))

    # -- training ------------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> SprcFinetune:
        return SprcFinetune(self, device, self.recipe.finetune, **self.task_sections())


class SprcFinetune(CachedRowsStage, TripletTrainingTask):
    """SPRC training (spec 1.3, 1.4, 1.7) on cached frozen-ViT tokens."""

    stage = "finetune"

    def __init__(self, model: Sprc, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        self.method_cfg = model.cfg
        if self.cfg.encoder != "both":
            raise CirError(
                "finetune.encoder: SPRC trains the Q-Former (the ViT is always frozen); "
                "leave it at 'both'"
            )
        # Frozen ViT tokens, computed once (the entries evaluation uses), read lazily.
        self.rows, self.features = self.train_image_features(lazy=True)
        self.index_triplet_rows(self.rows)

    # -- optimisation ----------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        model: Sprc = self.model
        params = [*model.backbone.trainable_parameters(), model.prompt_tokens]
        lr, wd = self.cfg.lr, self.cfg.weight_decay
        if self.method_cfg.decay_all:
            # SPRC: one group, weight decay on everything (spec 1.7).
            return [{"params": params, "lr": lr, "weight_decay": wd}]
        # LAVIS's own rule (get_optimizer_params): no decay on 1-D tensors (biases, norms,
        # temp); the 3-D query / prompt tokens keep it, as there.
        wanted = {id(p) for p in params}
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if id(p) in wanted:
                (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
        return [
            {"params": decay, "lr": lr, "weight_decay": wd},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]

    def set_train_mode(self) -> None:
        # Q-Former dropout active; the backbone keeps its ViT in eval (spec 1.7 mode switching).
        self.model.train()

    # -- the loss ---------------------------------------------------------------------------------

    def compute_loss(self, batch):
        from cir_cli.engine.distributed import global_batch

        model: Sprc = self.model
        backbone = model.backbone
        refs, tgts, texts = batch
        if self.method_cfg.clamp_temp:
            with torch.no_grad():
                backbone.temp.clamp_(0.001, 0.5)
        temp = backbone.temp
        reference = backbone.image_embeds(refs.to(self.device, non_blocking=True))
        target = backbone.image_embeds(tgts.to(self.device, non_blocking=True))
        ids, mask = model.tokenize(texts)

        prompt = model.fusion_prompt(reference, ids, mask)  # pass 1, (B, Nq, D)
        queries = model.compose(prompt, ids, mask)  # pass 2, (B, E)
        targets = model.target_features(target)  # (B, Nq, E)

        all_targets, labels = global_batch(targets)

        def contrastive(q: torch.Tensor) -> torch.Tensor:
            # One direction (query -> target), max over the target's query tokens (spec 1.3.6).
            sims = torch.einsum("be,nke->bnk", q, all_targets).amax(-1)
            return F.cross_entropy(sims / temp, labels)

        loss_itc = contrastive(queries)
        loss_rtc = contrastive(model.prompt_query(ids, mask))
        # The prompt side is detached: only the fusion pass learns to match the prompt (1.3.8).
        prompt_mean = model.prompt_tokens.detach().mean(1).expand(prompt.shape[0], -1)
        loss_align = F.mse_loss(prompt.mean(1), prompt_mean.to(prompt.dtype))
        mc = self.method_cfg
        loss = loss_itc + mc.loss_rtc * loss_rtc + mc.loss_align * loss_align
        parts = {
            "loss_itc": float(loss_itc.detach()),
            "loss_rtc": float(loss_rtc.detach()),
            "loss_align": float(loss_align.detach()),
            "temp": float(temp.detach()),
        }
        return loss, parts
