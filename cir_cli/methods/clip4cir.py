"""CLIP4Cir (Baldrati et al.): element-wise sum (stage I) and the Combiner (stage II).

Spec: clip4cir_blip4cir.md sections 3.2 (stage I), 4 (Combiner) and 5 (validation).
With `method.combining = "sum"` and no fine-tuning this is also the zero-shot CLIP sum
baseline (`clip_sum_*` recipes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cir_cli.backbones import build_backbone
from cir_cli.checkpoints import extract_state_dict, load_torch_checkpoint
from cir_cli.data.images import ImageFiles
from cir_cli.errors import CirError
from cir_cli.methods.base import FusedFeatureMethod
from cir_cli.methods.clip4cir_config import Clip4CirMethodConfig
from cir_cli.methods.training import CombinerStage, TripletTrainingTask
from cir_cli.progress import progress_bar
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from pathlib import Path

    from cir_cli.config import Recipe


@register_method("clip4cir", config=Clip4CirMethodConfig)
class Clip4Cir(FusedFeatureMethod):
    cfg: Clip4CirMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.backbone = build_backbone(recipe.backbone)
        # Created by stage II or by loading a checkpoint that holds Combiner weights.
        self.combiner = None
        self.logit_scale = self.cfg.logit_scale
        # Which towers are being trained right now (set by the trainer): a trainable image
        # tower must not be served from the feature cache.
        self.image_tower_trainable = False

    # -- towers ------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image features (B, D)."""
        return self.backbone.encode_image(pixels.to(self.device))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw CLIP text features (B, D)."""
        tokens = self.backbone.tokenize(list(texts)).to(self.device)
        return self.backbone.encode_text(tokens)

    # -- method contract ---------------------------------------------------------------------

    def image_cache_key(self) -> str | None:
        if self.image_tower_trainable:
            return None
        return self.backbone.image_cache_key(self.preprocessing_id())

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "combining": self.combining_in_use(),
            "backbone": self.backbone.source,
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def import_published(self, file: Path) -> None:
        """The seeds' layouts (spec 7): `{'epoch', 'CLIP': state_dict}` (fine-tuned CLIP, loaded
        strictly into the backbone) and `{'epoch', 'Combiner': state_dict}`. Our own
        checkpoints load through `CIRMethod.load_checkpoint`; a Combiner checkpoint of ours
        names the stage-I checkpoint it was trained on, which is loaded first."""
        ckpt = load_torch_checkpoint(file)
        if "Combiner" in ckpt:
            self.import_combiner(ckpt, file)
        elif "CLIP" in ckpt:
            from cir_cli.backbones.open_clip_towers import load_clip_state

            load_clip_state(self.backbone.model, extract_state_dict(ckpt, "CLIP", file), str(file))
        else:
            raise CirError(
                f"{file}: not a CLIP4Cir checkpoint (expected a 'CLIP' or 'Combiner' entry; "
                f"found {sorted(ckpt)[:8]})"
            )

    # -- training ------------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> Clip4CirFinetune:
        return Clip4CirFinetune(self, device, self.recipe.finetune, **self.task_sections())

    def combiner_task(self, device: torch.device) -> Clip4CirCombinerTraining:
        recipe = self.recipe
        return Clip4CirCombinerTraining(
            self, device, recipe.combiner, finetune=recipe.finetune, **self.task_sections()
        )


class Clip4CirFinetune(TripletTrainingTask):
    """Stage I (spec 3.2): sum of raw features, normalised, 100 x cosine, CE over the batch."""

    stage = "finetune"

    def __init__(self, model: Clip4Cir, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        model.image_tower_trainable = self.cfg.encoder in ("both", "image")
        # Stage I is the element-wise sum (spec 3.2): train and validate without a Combiner.
        model.combiner = None
        self.features = None
        self.pixels = None
        if not model.image_tower_trainable:
            # encoder = text: the image tower is frozen, so its features are computed once
            # (cached on disk) and never re-encoded per epoch.
            self.features = self.train_image_features()
        elif self.data.cache_pixels:
            self.pixels = self.train_pixels()
        if self.cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)

    def train_pixels(self) -> tuple[dict[str, int], torch.Tensor]:
        """Preprocessed pixels of every training image, decoded once through the cache."""
        names = self.split.image_names()

        def compute(chunk: list[str]) -> torch.Tensor:
            files = ImageFiles.from_names(chunk, self.split.image_paths, self.model.preprocess)
            loader = DataLoader(files, batch_size=256, num_workers=self.data.num_workers)
            out = []
            with progress_bar("decoding training images", len(chunk)) as advance:
                for _, pixels in loader:
                    out.append(pixels)
                    advance(len(pixels))
            return torch.cat(out)

        key = f"pixels-{self.model.preprocessing_id()}"
        pixels = self.cache.get_or_compute_images(key, names, self.split.image_paths, compute)
        return {n: i for i, n in enumerate(names)}, pixels

    def dataset(self):
        if self.features is not None or self.pixels is not None:
            return None
        from cir_cli.data.training import TripletImages

        ds = TripletImages(self.split, self.model.preprocess, self.policy, self.seed)
        ds.epoch = self.epoch
        return ds

    def collate(self, items):
        from cir_cli.data.training import collate_triplets

        return collate_triplets(items)

    def gather(self, indices: list[int]):
        from cir_cli.data.training import training_text

        rows, feats = self.features if self.features is not None else self.pixels
        ts = [self.split.triplets[i] for i in indices]
        refs = feats[[rows[t.reference] for t in ts]]
        tgts = feats[[rows[t.target] for t in ts]]
        texts = [training_text(self.split, self.policy, self.seed, self.epoch, i) for i in indices]
        return refs, tgts, texts

    def param_groups(self) -> list[dict]:
        backbone = self.model.backbone
        params = {
            "both": backbone.image_parameters() + backbone.text_parameters(),
            "text": backbone.text_parameters(),
            "image": backbone.image_parameters(),
        }[self.cfg.encoder]
        return [{"params": params, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]

    def set_train_mode(self) -> None:
        # CLIP4Cir keeps CLIP in eval mode while fine-tuning (spec 3.2 / bug 22): BatchNorm of
        # RN backbones uses its running statistics; CLIP has no dropout. Kept for fidelity.
        self.model.eval()

    def compute_loss(self, batch):
        from cir_cli.engine.losses import contrastive_loss

        refs, tgts, texts = batch
        if self.features is not None:
            ref_feats = refs.to(self.device)
            tgt_feats = tgts.to(self.device)
        else:
            # One forward for references and targets: same result (the tower is in eval
            # mode, no batch statistics), fewer and larger matrix products.
            both = self.model.encode_images(torch.cat([refs, tgts]))
            ref_feats, tgt_feats = both[: len(refs)], both[len(refs) :]
        text_feats = self.model.encode_texts(texts)
        queries = F.normalize(ref_feats.float() + text_feats.float(), dim=-1)
        targets = F.normalize(tgt_feats.float(), dim=-1)
        loss = contrastive_loss(queries, targets, self.model.logit_scale)
        return loss, {}


class Clip4CirCombinerTraining(CombinerStage, TripletTrainingTask):
    """Stage II (spec 4.2): the Combiner on cached features of the frozen stage-I encoders.

    Image features are computed once per image and text features once per caption variant
    (FashionIQ: the 4 joins), both through the feature cache; an epoch is then pure MLP work on
    in-memory tensors (the seeds re-encoded everything every batch of every epoch).
    """

    stage = "combiner"

    def __init__(self, model: Clip4Cir, *args: Any, **kwargs: Any) -> None:
        # args: device, the stage's section, and the sections of methods/training.py
        super().__init__(model, *args, **kwargs)
        model.image_tower_trainable = False
        if model.combiner is None:
            model.add_combiner()
            model.combiner.to(self.device)
        from cir_cli.data.training import all_text_variants

        self.rows, self.image_feats = self.train_image_features()
        variants = all_text_variants(self.split, self.policy)
        texts = list(dict.fromkeys(v for vs in variants for v in vs))
        text_key = f"clip-text-{self.model.backbone.arch}-{self._text_fingerprint()}"
        text_feats = self.cache.get_or_compute(text_key, texts, self.encode_texts_once)
        text_row = {t: i for i, t in enumerate(texts)}
        width = max(len(vs) for vs in variants)
        # (n_triplets, width) indices into text_feats; single-variant rows repeat their text.
        self.variant_rows = torch.tensor(
            [[text_row[vs[min(j, len(vs) - 1)]] for j in range(width)] for vs in variants]
        )
        self.text_feats = text_feats
        self.index_triplet_rows(self.rows)

    def _text_fingerprint(self) -> str:
        from cir_cli.cache import state_fingerprint

        backbone = self.model.backbone
        text_modules = [m for n, m in backbone.model.named_children() if n != "visual"]
        return state_fingerprint(*text_modules)

    def gather(self, indices: list[int]):
        from cir_cli.data.training import text_variant

        idx = torch.tensor(indices)
        variant = (
            torch.tensor(
                [text_variant(self.split, self.policy, self.seed, self.epoch, i) for i in indices]
            )
            if self.variant_rows.shape[1] > 1
            else torch.zeros(len(indices), dtype=torch.long)
        )
        text_rows = self.variant_rows[idx, variant]
        return (
            self.image_feats[self.ref_rows[idx]],
            self.text_feats[text_rows],
            self.image_feats[self.tgt_rows[idx]],
        )

    def compute_loss(self, batch):
        from cir_cli.engine.losses import contrastive_loss

        refs, texts, tgts = (t.to(self.device, non_blocking=True) for t in batch)
        queries = self.model.combiner.combine_features(refs, texts)
        targets = F.normalize(tgts, dim=-1)
        return contrastive_loss(queries, targets, self.model.logit_scale), {}
