"""CaLa (Jiang et al., SIGIR 2024): complementary association learning for CIR.

Spec: sprc_cala.md section 3. A query frame ("sum": q = norm(r + m), or ARTEMIS) is trained
together with two training-only heads that add logits to the loss:

- TBIA / TAC: the visual gap g between reference and target tokens should match the text m,
  logits_tac = 10 m g^T;
- CTR / HCA: reference tokens + text tokens + target tokens give a pseudo-target p that should
  match the reference feature r, logits_hca = 10 p r^T;
- L = h CE(logits_hca) + (1 - h) CE(tau logits_tac + (1 - tau) logits_main).

Encoders (`backbone.name`):

- `blip2` (CaLa: the ViT-L BLIP-2, three full LAVIS copies): one frozen ViT, shared, whose
  tokens are cached once per image (the SPRC cache entries); the visual Q-Former is the
  backbone's own (targets t = norm(P-img[:, 0]), reference tokens for TAC), and two separately
  trainable copies serve the text (m = P-txt CLS, C = its token outputs) and the multimodal
  reference (R = P-mm query outputs, r = R[:, 0]). Features are the unprojected Q-Former
  outputs, as in CaLa.
- `open_clip` ResNet (CaLa: RN50x4): r, m, t are CLIP's projected globals; TAC / HCA read the
  layer-4 map before the attention pool and the ln_final token sequence, taken with forward
  hooks (backbones/open_clip_towers.py), never by patching the library. The visual tower is
  frozen and its outputs cached; the text tower trains.

Differences from the published code, on purpose (each named in the recipes):
- the validation runs in eval mode (CaLa left the Q-Formers' dropout on);
- the schedule, its parameter groups and which of them follow it are CaLa's by default
  (finetune.scheduler = "epoch_cosine", schedule_groups = "first", query tokens in their own
  groups); fixes.step_cosine / fixes.schedule_query_tokens switch to cir's versions;
- switches, off in the paper recipes (which reproduce CaLa): HCA can mask padded caption
  tokens (`method.text_padding_mask`; CaLa has no mask) and CLIP maps can become tokens with a
  proper permute (`method.compat_reshape = false`; the recipes keep CaLa's `.view`);
- the CLIP visual tower stays in eval mode (CaLa let BatchNorm statistics drift in a tower it
  never steps);
- checkpoints hold the trained tensors only (CaLa saved three full BLIP-2 copies, ViT included).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cir_cli.backbones import build_backbone
from cir_cli.backbones.blip2_convert import summarize_dropped
from cir_cli.checkpoints import extract_state_dict, load_state_dict_strict, load_torch_checkpoint
from cir_cli.errors import CirError
from cir_cli.methods.base import CIRMethod
from cir_cli.methods.cala_config import CalaMethodConfig
from cir_cli.methods.training import CachedRowsStage, TripletTrainingTask
from cir_cli.modules.cala_heads import (
    Artemis,
    HingeCrossAttention,
    TwinAttentionCompositor,
    spatial_tokens,
)
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from cir_cli.config import FinetuneConfig, FixesConfig, Recipe

# Class-name keys of CaLa's saved files: {"epoch": int, "<class name>": state_dict} (spec 3.7).
BLIP2_KEY = "Blip2Qformer"
HEAD_KEYS = {
    "TwinAttentionCompositorBLIP2": "tac",
    "TwinAttentionCompositorCLIP": "tac",
    "HingebasedCrossAttentionBLIP2": "hca",
    "HingebasedCrossAttentionCLIP": "hca",
    "Artemis": "artemis",
}
# Parameters of CaLa's modules that its forward never uses (dropped on import, printed).
UNUSED_HEAD_KEYS = {
    "hca": (r"(query_ref2|key_text2|key_tar2|value2)\..*", "HCA's second parameter set"),
    "artemis": (r"temperature", "ARTEMIS's temperature (defined, never used)"),
}
# File name patterns in CaLa's `saved_models/` folder (spec 3.7).
CALA_FILES = {
    "visual": "tuned_blip_visual*.pt",
    "text": "tuned_blip_text*.pt",
    "multi": "tuned_blip_multi*.pt",
    "clip": "tuned_clip*.pt",
    "tac": "tuned_tac*.pt",
    "hca": "tuned_hca*.pt",
    "artemis": "tuned_artemis*.pt",
}


def _note(message: str) -> None:
    print(message, file=sys.stderr)


@register_method("cala", config=CalaMethodConfig)
class Cala(CIRMethod):
    cfg: CalaMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        family = recipe.backbone.name
        if family not in ("blip2", "open_clip"):
            raise CirError(
                f"method cala needs backbone.name = 'blip2' or 'open_clip' (got {family!r})"
            )
        self.family = family
        # Checked before building the backbone (a 1 B-parameter model for BLIP-2 ViT-L).
        allowed = ("multi", "both") if family == "blip2" else ("text",)
        if self.cfg.encoder not in allowed:
            raise CirError(
                f"method.encoder = {self.cfg.encoder!r}: "
                + (
                    "with BLIP-2 CaLa trains 'multi' (multimodal + textual Q-Formers) or 'both' "
                    "(also the visual one)"
                    if family == "blip2"
                    else "with CLIP CaLa trains the text tower only ('text'); its visual "
                    "tower is never stepped"
                )
            )
        self.backbone = build_backbone(recipe.backbone)
        map_channels = None
        if family == "blip2":
            from cir_cli.backbones.blip2 import QFormerCopy

            dim = self.backbone.hidden_size
            # Separately trained roles (spec 3.6); the visual role is the backbone's Q-Former.
            self.text_qformer = QFormerCopy(self.backbone)
            self.multimodal_qformer = QFormerCopy(self.backbone)
        else:
            dim = self.backbone.feature_dim
            width = int(self.backbone.model.ln_final.normalized_shape[0])
            if width != dim:
                raise CirError(
                    f"backbone.arch {self.backbone.arch}: CaLa's HCA needs the text width "
                    f"({width}) to equal the embedding size ({dim}), as in RN50x4 (640)"
                )
            map_channels, _ = self.backbone.map_shape()
        self.dim = dim
        self.tac = TwinAttentionCompositor(dim, map_channels)
        self.hca = HingeCrossAttention(dim, map_channels)
        self.artemis = Artemis(dim) if self.cfg.frame == "artemis" else None

    # -- preprocessing & representation ----------------------------------------------------

    @property
    def representation_dtype(self) -> torch.dtype:
        # BLIP-2 ViT tokens are large (257 x 1024 per ViT-L image): fp16 unless fp32 is asked.
        if self.family == "blip2" and self.recipe.backbone.precision != "fp32":
            return torch.float16
        return torch.float32

    def image_cache_key(self) -> str | None:
        if self.family == "blip2":
            return self.backbone.token_cache_key(
                self.recipe.backbone.precision, self.preprocessing_id()
            )
        # The same entries as CLIP4Cir's frozen image features (raw projected globals).
        return self.backbone.image_cache_key(self.preprocessing_id())

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self.family == "blip2":
            return self.backbone.vision_tokens(pixels).to(self.representation_dtype)
        return self.backbone.encode_image(pixels).float()

    # -- features ----------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask). BLIP-2: padded to the longest caption, no truncation below the
        Q-Former's positions (LAVIS `extract_features`); CLIP: open_clip's 77 tokens, mask up
        to and including the end-of-text token."""
        if self.family == "blip2":
            limit = self.backbone.qformer.config.max_position_embeddings
            return self.backbone.tokenize(list(texts), max_length=limit, padding="longest")
        ids = self.backbone.tokenize(list(texts)).to(self.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return ids, (positions[None, :] <= ids.argmax(-1)[:, None]).long()

    def text_features(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m (B, d), caption tokens C (B, L, d')) of the text encoder: the textual Q-Former's
        CLS and outputs, or CLIP's text global and ln_final sequence."""
        if self.family == "blip2":
            caption = self.text_qformer.text_outputs(ids, mask)
            return caption[:, 0], caption
        return self.backbone.encode_text_with_sequence(ids)

    def reference_tokens(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """BLIP-2 P-mm on the multimodal copy: the Nq query outputs R (B, Nq, d); r = R[:, 0]."""
        nq = self.multimodal_qformer.num_query_tokens
        return self.multimodal_qformer.multimodal_outputs(image_embeds, ids, mask)[:, :nq]

    def compose(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The frame's query from raw r and m: norm(r + m) (sum) or ARTEMIS's (B, 4, d)."""
        if self.artemis is not None:
            return self.artemis.query_features(reference, text)
        return F.normalize(reference.float() + text.float(), dim=-1)

    # -- method contract -------------------------------------------------------------------

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        reference = reference.to(self.device)
        ids, mask = self.tokenize(texts)
        m = self.text_features(ids, mask)[0]
        if self.family == "blip2":
            image = self.backbone.image_embeds(reference)
            r = self.reference_tokens(image, ids, mask)[:, 0]
        else:
            r = reference.float()
        return self.compose(r, m)

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        if self.family != "blip2":
            return F.normalize(representation.float(), dim=-1)
        # A whole gallery of ViT tokens: embed it in batches.
        batch = self.recipe.eval.batch_size
        out = [
            self.target_features(representation[start : start + batch].to(self.device))
            for start in range(0, representation.shape[0], batch)
        ]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def target_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """BLIP-2: t = norm(P-img(ln_vision(tokens))[:, 0]) of the visual (backbone) Q-Former."""
        return F.normalize(
            self.backbone.query_outputs(self.backbone.image_embeds(tokens))[:, 0], dim=-1
        )

    def score(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.artemis is not None:
            return Artemis.score(queries, targets)
        return queries @ targets.T

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised target features (B, d)."""
        return self.targets_from_representation(self.image_representation(pixels))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw text features m (B, d): the textual Q-Former's CLS, or CLIP's text global."""
        return self.text_features(*self.tokenize(texts))[0]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "frame": self.cfg.frame,
            "encoder": self.cfg.encoder,
            "backbone": self.backbone.source,
            "arch": self.backbone.arch,
        }

    # -- checkpoints -----------------------------------------------------------------------

    def load_checkpoint(self, path: str, _chain: tuple[Path, ...] = ()) -> None:
        """Our checkpoints (run / checkpoint dir, .safetensors of the trained tensors), or
        CaLa's saved files: its `saved_models/` folder, or one of its `.pt` files."""
        folder = Path(path).expanduser()
        if folder.is_dir() and any(folder.glob("tuned_*.pt")):
            self.import_cala_folder(folder)
        else:
            super().load_checkpoint(path, _chain)

    def import_published(self, file: Path) -> None:
        self.import_cala_file(file)

    def import_cala_folder(self, folder: Path) -> None:
        """Load every CaLa file of a run folder (visual Q-Former first: it brings the parts the
        other two files must share)."""
        found = {}
        for role, pattern in CALA_FILES.items():
            matches = sorted(folder.glob(pattern))
            if len(matches) > 1:
                names = ", ".join(m.name for m in matches)
                raise CirError(f"{folder}: several {pattern} files ({names}); pass one file")
            if matches:
                found[role] = matches[0]
        required = ["visual", "text", "multi"] if self.family == "blip2" else ["clip"]
        if self.artemis is not None:
            required.append("artemis")
        missing = [CALA_FILES[r] for r in required if r not in found]
        if missing:
            raise CirError(f"{folder}: no {', '.join(missing)} (CaLa's saved_models layout)")
        for role in ("visual", "text", "multi", "clip", "tac", "hca", "artemis"):
            if role in found:
                self.import_cala_file(found[role])

    def import_cala_file(self, file: Path) -> None:
        """One CaLa file, by its class-name key; strict after the key map (spec 3.7, 4.4)."""
        ckpt = load_torch_checkpoint(file)
        if BLIP2_KEY in ckpt:
            role = re.search(r"tuned_blip_(visual|text|multi)", file.name)
            if role is None:
                raise CirError(
                    f"{file}: a {BLIP2_KEY!r} file whose name does not say its role "
                    "(tuned_blip_visual|text|multi_*.pt)"
                )
            if self.family != "blip2":
                raise CirError(f"{file}: a BLIP-2 file, but backbone.name is {self.family!r}")
            self._import_qformer(extract_state_dict(ckpt, BLIP2_KEY, file), role.group(1), file)
            return
        if "CLIP" in ckpt:
            from cir_cli.backbones.open_clip_towers import load_clip_state

            if self.family != "open_clip":
                raise CirError(f"{file}: a CLIP file, but backbone.name is {self.family!r}")
            load_clip_state(self.backbone.model, extract_state_dict(ckpt, "CLIP", file), str(file))
            return
        key = next((k for k in HEAD_KEYS if k in ckpt), None)
        if key is None:
            raise CirError(
                f"{file}: not a CaLa file (expected one of {BLIP2_KEY}, CLIP, "
                f"{', '.join(HEAD_KEYS)}; found {sorted(ckpt)[:6]})"
            )
        self._import_head(HEAD_KEYS[key], extract_state_dict(ckpt, key, file), file)

    def _import_head(self, role: str, state: dict[str, torch.Tensor], file: Path) -> None:
        module = getattr(self, role)
        if module is None:
            _note(f"{file}: skipped (method.frame = {self.cfg.frame!r} has no ARTEMIS)")
            return
        if role in UNUSED_HEAD_KEYS:
            pattern, why = UNUSED_HEAD_KEYS[role]
            dropped = [k for k in state if re.fullmatch(pattern, k)]
            if dropped:
                _note(f"{file}: left out on purpose: {len(dropped)} key(s) {why}")
            state = {k: v for k, v in state.items() if k not in dropped}
        load_state_dict_strict(module, state, str(file))

    def _import_qformer(self, state: dict[str, torch.Tensor], role: str, file: Path) -> None:
        """A full LAVIS `Blip2Qformer` state dict into the role's Q-Former.

        visual: the whole backbone (ViT, ln_vision, projections, ...). text / multi: the
        Q-Former part into the copy; the rest must equal the backbone's, since CaLa never
        trains it and the three files of one run carry the same values.
        """
        converted = self.backbone.convert_lavis(state, str(file))
        if role == "visual":
            self.backbone.load_converted(converted, str(file), allow_missing_vision=True)
            return
        copy = self.text_qformer if role == "text" else self.multimodal_qformer
        own = copy.state_dict()
        qformer_part = {k: v for k, v in converted.state.items() if k in own}
        load_state_dict_strict(copy, qformer_part, str(file), ignore=["position_ids"])
        backbone_state = self.backbone.state_dict()
        unknown, differ = [], []
        for key, value in converted.state.items():
            if key in own:
                continue
            if key not in backbone_state:
                unknown.append(key)
            elif not torch.equal(backbone_state[key], value.to(backbone_state[key].dtype)):
                differ.append(key)
        if unknown:
            raise CirError(f"{file}: keys with no slot: {', '.join(unknown[:6])}")
        if differ:
            raise CirError(
                f"{file}: {len(differ)} frozen tensor(s) differ from the visual Q-Former file's "
                f"(e.g. {differ[0]}); CaLa never trains them, so the files of one run agree "
                "(load the run's folder, or tuned_blip_visual first)"
            )
        lines = summarize_dropped(converted.dropped)
        if lines:
            _note(f"{file}: loaded the {role} Q-Former; left out on purpose:")
            for line in lines:
                _note(f"  - {line}")

    def training_features(
        self, refs: torch.Tensor, tgts: torch.Tensor, texts: list[str]
    ) -> dict[str, Any]:
        """Everything the loss reads, from cached reference / target rows and the captions.

        BLIP-2 rows are ViT tokens (B, T, Dv); CLIP rows are [global | layer-4 map] as the
        training cache stores them (`CalaFinetune`).
        """
        mc = self.cfg
        refs = refs.to(self.device, non_blocking=True)
        tgts = tgts.to(self.device, non_blocking=True)
        ids, mask = self.tokenize(texts)
        m, caption = self.text_features(ids, mask)
        out: dict[str, Any] = {"m": m, "caption": caption, "mask": mask}
        if self.family == "blip2":
            bb = self.backbone
            ref_image = bb.image_embeds(refs)
            reference = self.reference_tokens(ref_image, ids, mask)
            target = bb.query_outputs(bb.image_embeds(tgts))
            out.update(
                r=reference[:, 0],
                reference_tokens=reference,
                t=F.normalize(target[:, 0], dim=-1),
                target_tokens=target,
            )
            if mc.tac_weight > 0:
                # TAC reads the visual Q-Former's reference tokens (CaLa's `Ref_v`).
                out["tac_reference"] = bb.query_outputs(ref_image)
                out["tac_target"] = target
        else:
            dim = self.dim
            channels, positions = self.backbone.map_shape()

            def tokens(rows: torch.Tensor) -> torch.Tensor:
                feature_map = rows[:, dim:].float().view(-1, channels, positions, 1)
                return spatial_tokens(feature_map, compat=mc.compat_reshape)

            ref_tokens, tgt_tokens = tokens(refs), tokens(tgts)
            out.update(
                r=refs[:, :dim].float(),
                reference_tokens=ref_tokens,
                t=F.normalize(tgts[:, :dim].float(), dim=-1),
                target_tokens=tgt_tokens,
                tac_reference=ref_tokens,
                tac_target=tgt_tokens,
            )
        return out

    # -- training ------------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> CalaFinetune:
        recipe = self.recipe
        return CalaFinetune(
            self, device, recipe.finetune, fixes=recipe.fixes, **self.task_sections()
        )


class CalaFinetune(CachedRowsStage, TripletTrainingTask):
    """CaLa training (spec 3.5-3.7) on cached frozen image features."""

    stage = "finetune"

    def __init__(
        self,
        model: Cala,
        device: torch.device,
        cfg: FinetuneConfig,
        *,
        fixes: FixesConfig,
        **sections: Any,
    ) -> None:
        super().__init__(model, device, cfg, **sections)
        self.fixes = fixes
        self.method_cfg = model.cfg
        if self.cfg.encoder != "both":
            raise CirError(
                "finetune.encoder: CaLa chooses what trains with method.encoder; leave "
                "finetune.encoder at 'both'"
            )
        if model.family == "blip2":
            # Frozen ViT tokens (the entries evaluation and SPRC use), read lazily.
            self.rows, self.features = self.train_image_features(lazy=True)
        else:
            # Globals + layer-4 maps of the frozen CLIP visual tower, computed once (float32:
            # RN50x4 takes (640 + 2560 x 81) x 4 bytes = 0.83 MB per image, memory-mapped).
            backbone = model.backbone
            weights = backbone.image_fingerprint()
            key = f"cala-clip-maps-{backbone.arch}-{weights}-{model.preprocessing_id()}"
            self.rows, self.features = self.train_image_features(
                lazy=True, key=key, encode=self._clip_maps
            )
        self.index_triplet_rows(self.rows)

    def _clip_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """[global (D) | layer-4 map (C * H * W, channel-major)] per image, one flat row."""
        features, feature_map = self.model.backbone.encode_image_with_map(pixels)
        return torch.cat([features.float(), feature_map.flatten(1).float()], dim=1)

    # -- optimisation ----------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """Spec 3.6, in CaLa's order (src/blip_fine_tune.py): the multimodal Q-Former, its
        query_tokens, the textual Q-Former, (encoder "both") the visual Q-Former and its
        query_tokens, all at lr; TAC / HCA at 2x, ARTEMIS at 10x; AdamW weight decay on all.

        CaLa's cosine_lr_schedule(onlyGroup0=True) moves group 0 only (finetune.schedule_groups
        = "first"): the query tokens, in their own groups, keep the base lr all run unless
        fixes.schedule_query_tokens puts them in their Q-Former's group.
        """
        model: Cala = self.model
        mc, lr, wd = self.method_cfg, self.cfg.lr, self.cfg.weight_decay
        merge_tokens = self.fixes.schedule_query_tokens
        if model.family == "blip2":
            mm = model.multimodal_qformer
            body = [p for p in mm.parameters() if p is not mm.query_tokens]
            tokens = mm.query_tokens
            encoders = [body + [tokens]] if merge_tokens else [body, [tokens]]
            encoders.append(model.text_qformer.text_path_parameters())
            if mc.encoder == "both":
                tokens = model.backbone.query_tokens
                body = [p for p in model.backbone.query_path_parameters() if p is not tokens]
                encoders += [body + [tokens]] if merge_tokens else [body, [tokens]]
        else:
            encoders = [model.backbone.text_parameters()]
        groups = [{"params": params, "lr": lr, "weight_decay": wd} for params in encoders]
        heads = []
        if mc.tac_weight > 0:
            heads.append((model.tac, mc.tac_lr_scale))
        if mc.hca_weight > 0:
            heads.append((model.hca, mc.hca_lr_scale))
        if model.artemis is not None:
            heads.append((model.artemis, mc.artemis_lr_scale))
        for module, scale in heads:
            groups.append(
                {"params": list(module.parameters()), "lr": lr * scale, "weight_decay": wd}
            )
        return groups

    def set_train_mode(self) -> None:
        # Dropout of the Q-Formers and HCA on; the BLIP-2 ViT stays in eval (backbone.train),
        # and so does the frozen CLIP visual tower (no BatchNorm statistics drift).
        self.model.train()
        if self.model.family != "blip2":
            self.model.backbone.model.visual.eval()

    # -- the loss ---------------------------------------------------------------------------------

    def compute_loss(self, batch):
        refs, tgts, texts = batch
        return cala_loss(self.model, self.model.training_features(refs, tgts, texts))


def cala_loss(model: Cala, f: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """L = h CE(logits_hca) + (1 - h) CE(tau logits_tac + (1 - tau) logits_main) (spec 3.5).

    A weight of 0 leaves its head out entirely (its logits are not computed), so tau = h = 0
    is the frame's plain contrastive loss. Under torchrun every logit matrix spans the global
    batch (targets, gaps and references gathered with gradients).
    """
    from cir_cli.engine.distributed import global_batch

    mc = model.cfg
    tau, h = mc.tac_weight, mc.hca_weight
    all_t, labels = global_batch(f["t"])
    if model.artemis is not None:
        main = model.artemis(f["r"], f["m"], all_t)
    else:
        main = mc.logit_scale * F.normalize(f["r"].float() + f["m"].float(), dim=-1) @ all_t.T
    parts: dict[str, float] = {}
    logits = main
    if tau > 0:
        gap = model.tac(f["tac_reference"], f["tac_target"])
        all_gap, _ = global_batch(gap)
        tac_logits = mc.head_logit_scale * f["m"].float() @ all_gap.float().T
        logits = tau * tac_logits + (1 - tau) * main
    loss = F.cross_entropy(logits, labels)
    parts["loss_main"] = float(loss.detach())
    if h > 0:
        mask = f["mask"] if mc.text_padding_mask else None
        pseudo = model.hca(f["reference_tokens"], f["caption"], f["target_tokens"], mask)
        all_r, _ = global_batch(f["r"])
        hca_logits = mc.head_logit_scale * pseudo.float() @ all_r.float().T
        loss_hca = F.cross_entropy(hca_logits, labels)
        parts["loss_hca"] = float(loss_hca.detach())
        loss = h * loss_hca + (1 - h) * loss
    return loss, parts
