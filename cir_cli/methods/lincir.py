"""LinCIR (Gu et al., CVPR 2024): zero-shot CIR with a language-only trained Phi.

Spec: lincir_searle_circo.md sections 1.3 (Phi), 1.4 (pseudo-token injection), 1.5 (prompts),
1.6 (self-masking projection training), 1.7 (inference) and 3 (evaluation protocols).

Inference (spec 1.7): query = normalize(T(prompt with `$` := Phi(I(ref)))), gallery =
normalize(I(g)), score = cosine. I(.) is the raw (un-normalised) CLIP image feature, which is
what the feature cache stores, so every benchmark's gallery is encoded once per backbone.

Training (`cir finetune`, spec 1.6): text only. For a caption c with frozen feature t = T(c):
x = t + u * eps (u ~ U[0,1) per sample, eps ~ N(0, I)), v = Phi(x), and the loss is
MSE(T(masked c with every `[$]` := v), t). Only Phi trains; t is computed once per caption and
kept in an on-disk store (the seeds encoded it again at every step, spec 6.11).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cir_cli.backbones import build_backbone
from cir_cli.backbones.pseudo_tokens import (
    PLACEHOLDER,
    check_placeholder_id,
    encode_with_pseudo_tokens,
    prompt_pieces,
    token_width_of,
    tokenize_pieces,
)
from cir_cli.cache import state_fingerprint
from cir_cli.checkpoints import load_state_dict_strict
from cir_cli.data import get_dataset, text_corpus
from cir_cli.data.text_corpus import corpus_digest
from cir_cli.errors import CirError
from cir_cli.evaluation import evaluate
from cir_cli.io import read_json, write_text_atomic
from cir_cli.methods.base import CIRMethod
from cir_cli.methods.lincir_config import LinCirMethodConfig
from cir_cli.modules.phi import Phi
from cir_cli.progress import progress_bar
from cir_cli.registry import register_method

if TYPE_CHECKING:
    from cir_cli.config import Recipe
    from cir_cli.data.base import CIRSplit

QueryText = str | tuple[str, ...]


def _strip_fiq(text: str) -> str:
    return text.strip(".?, ")


@register_method("lincir", config=LinCirMethodConfig)
class LinCir(CIRMethod):
    cfg: LinCirMethodConfig

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        cfg = self.cfg
        self.backbone = build_backbone(recipe.backbone)
        check_placeholder_id(self.backbone.tokenizer)
        if PLACEHOLDER not in cfg.prompt:
            raise CirError(
                f"method.prompt = {cfg.prompt!r} has no '$' placeholder for the pseudo token"
            )
        d = self.backbone.feature_dim
        self.phi = Phi(
            d, 4 * d, token_width_of(self.backbone), cfg.phi_dropout, cfg.l2_normalize
        )
        self.phi_ema: Phi | None = None

    # -- pieces ------------------------------------------------------------------------------

    def active_phi(self) -> Phi:
        """The Phi used for queries: the EMA copy when `method.use_ema` and one is loaded."""
        if self.cfg.use_ema and self.phi_ema is not None:
            return self.phi_ema
        return self.phi

    def add_ema(self) -> Phi:
        if self.phi_ema is None:
            self.phi_ema = copy.deepcopy(self.phi)
            self.phi_ema.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
            self.phi_ema.eval()
            for p in self.phi_ema.parameters():
                p.requires_grad_(False)
        return self.phi_ema

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image features (B, d)."""
        return self.backbone.encode_image(pixels.to(self.device))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw CLIP text features (B, d) of plain texts (no pseudo token)."""
        return self.backbone.encode_text(self.backbone.tokenize(list(texts)).to(self.device))

    def encode_prompts(
        self, vectors: torch.Tensor, pieces: list[list[str]], context: str = "prompt"
    ) -> torch.Tensor:
        """Raw text features of texts given as pieces around `$`, each `$` := vectors[row]."""
        ids, mask = tokenize_pieces(self.backbone.tokenizer, pieces)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            text = PLACEHOLDER.join(pieces[empty[0]])
            raise CirError(
                f"{context} {text[:80]!r}: the '$' pseudo token was cut by the text tower's "
                f"context length ({ids.shape[1]} tokens); shorten the prompt or caption"
            )
        return encode_with_pseudo_tokens(self.backbone, ids, mask, vectors)

    def pseudo_tokens(self, reference: torch.Tensor) -> torch.Tensor:
        phi = self.active_phi()
        return phi(reference.to(phi.layers[0].weight.device).float())

    # -- method contract ---------------------------------------------------------------------

    def image_cache_key(self) -> str | None:
        # Same key scheme as CLIP4Cir: the raw CLIP image feature of a frozen tower, so the two
        # methods share cached galleries for the same backbone and preprocessing.
        weights = state_fingerprint(self.backbone.image_module())
        return f"clip-image-{self.backbone.arch}-{weights}-{self.preprocessing_id()}"

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_images(pixels).float()

    def query_texts(self, split: CIRSplit) -> list[QueryText]:
        """What `queries_from_representation` gets per query of `split` (evaluation hook).

        FashionIQ: the two raw captions (both orders are encoded and averaged, spec 1.5);
        otherwise the single caption / condition.
        """
        if get_dataset(split.dataset).caption_pairs and self.cfg.fiq_both_orders:
            return [
                tuple(t.captions) if len(t.captions) == 2 else t.captions[0]
                for t in split.triplets
            ]
        return split.texts()

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[QueryText]
    ) -> torch.Tensor:
        """normalize(T(prompt with `$` := Phi(reference))); pairs = FashionIQ's two orders."""
        template = self.cfg.prompt
        if self.cfg.text_only:
            return self._text_only_queries(template, texts)
        v = self.pseudo_tokens(reference)
        pairs = [isinstance(t, tuple | list) for t in texts]
        if not any(pairs):
            pieces = [prompt_pieces(template, t) for t in texts]
            return F.normalize(self.encode_prompts(v, pieces).float(), dim=-1)
        first, second = [], []
        for t in texts:
            if isinstance(t, tuple | list):
                c1, c2 = (_strip_fiq(c) for c in t)
                first.append(prompt_pieces(template, f"{c1} and {c2}"))
                second.append(prompt_pieces(template, f"{c2} and {c1}"))
            else:
                first.append(prompt_pieces(template, t))
                second.append(prompt_pieces(template, t))
        f1 = F.normalize(self.encode_prompts(v, first).float(), dim=-1)
        f2 = F.normalize(self.encode_prompts(v, second).float(), dim=-1)
        return F.normalize((f1 + f2) / 2, dim=-1)

    def _text_only_queries(self, template: str, texts: list[QueryText]) -> torch.Tensor:
        """The no-pseudo-token baseline: "a photo of that {caption}" (image ignored)."""
        plain = " ".join(template.replace(PLACEHOLDER, " ").split())
        orders: list[list[str]] = [[], []]
        for t in texts:
            if isinstance(t, tuple | list):
                c1, c2 = (_strip_fiq(c) for c in t)
                pair = (f"{c1} and {c2}", f"{c2} and {c1}")
            else:
                pair = (t, t)
            for order, caption in zip(orders, pair, strict=True):
                order.append(plain.replace("{caption}", caption))
        feats = [F.normalize(self.encode_texts(o).float(), dim=-1) for o in orders]
        return F.normalize((feats[0] + feats[1]) / 2, dim=-1)

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        return F.normalize(representation.float(), dim=-1)

    def single_modality_queries(
        self, reference: torch.Tensor, texts: list[QueryText]
    ) -> dict[str, torch.Tensor]:
        # Image alone: the reference's CLIP feature; text alone: the method's own no-pseudo-token
        # baseline (the prompt with `$` dropped), both in the CLIP space of the targets.
        return {
            "image": self.targets_from_representation(reference.to(self.device)),
            "text": self._text_only_queries(self.cfg.prompt, texts),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "backbone": self.backbone.source,
            "prompt": self.cfg.prompt,
            "phi": "ema" if self.active_phi() is self.phi_ema else "phi",
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def prepare_for_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Our run checkpoints hold `phi.*` and, when trained with an EMA, `phi_ema.*`."""
        if not any(k.startswith("phi.") for k in state):
            raise CirError(f"{source}: not a LinCIR checkpoint (no phi.* weights)")
        if any(k.startswith("phi_ema.") for k in state):
            self.add_ema().to(self.device)

    def import_published(self, file: Path) -> None:
        """A published `{'epoch', 'Phi'}` .pt (LinCIR's `lincir_large.pt`, SEARLE's files)."""
        published = Phi.from_checkpoint(file)
        own = (self.phi.input_dim, self.phi.output_dim)
        if (published.input_dim, published.output_dim) != own:
            raise CirError(
                f"{file}: Phi maps {published.input_dim} -> {published.output_dim}, but this "
                f"backbone needs {own[0]} -> {own[1]} (wrong backbone for the checkpoint?)"
            )
        load_state_dict_strict(self.phi, published.state_dict(), str(file))

    def export_phi(self, path: str | Path, ema: bool | None = None, epoch: int = 0) -> Path:
        """Write Phi (or its EMA) in the published `{'epoch', 'Phi'}` layout."""
        use_ema = self.cfg.use_ema if ema is None else ema
        phi = self.phi_ema if use_ema and self.phi_ema is not None else self.phi
        clean = Phi(phi.input_dim, phi.hidden_dim, phi.output_dim)
        clean.load_state_dict({k: v for k, v in phi.state_dict().items() if k != "num_updates"})
        return clean.save_checkpoint(path, epoch=epoch)

    # -- training ------------------------------------------------------------------------------

    def finetune_task(self, device: torch.device) -> LinCirFinetune:
        return LinCirFinetune(self, device)


# ------------------------------------------------------------------------------- feature store


class CaptionFeatureStore:
    """Frozen text features of a whole corpus in one memory-mapped .npy, filled in chunks.

    `<cache>/lincir-captions/<key hash>/features.npy` plus `progress.json` (rows done, written
    after each flushed chunk), so an interrupted encoding resumes where it stopped. Rows are
    float32, or float16 when float32 would exceed 4 GiB (multi-million-caption corpora).
    """

    def __init__(self, root: Path, key: str, rows: int, dim: int) -> None:
        self.folder = Path(root) / "lincir-captions" / hashlib.sha256(key.encode()).hexdigest()[:32]
        self.key, self.rows, self.dim = key, rows, dim
        self.dtype = np.float32 if rows * dim * 4 <= 4 * 2**30 else np.float16
        self.array_path = self.folder / "features.npy"
        self.progress_path = self.folder / "progress.json"

    def done(self) -> int:
        if not (self.progress_path.is_file() and self.array_path.is_file()):
            return 0
        info = read_json(self.progress_path, "text-feature progress file", dict)
        if info.get("key") != self.key or info.get("rows") != self.rows:
            return 0
        return int(info.get("done", 0))

    def fill(self, encode, texts: list[str], chunk: int, description: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        start = self.done()
        if start >= self.rows:
            return
        if start == 0:
            np.lib.format.open_memmap(
                self.array_path, mode="w+", dtype=self.dtype, shape=(self.rows, self.dim)
            ).flush()
            write_text_atomic(self.folder / "key.txt", self.key + "\n")
        array = np.lib.format.open_memmap(self.array_path, mode="r+")
        with progress_bar(description, self.rows - start) as advance:
            for lo in range(start, self.rows, chunk):
                hi = min(lo + chunk, self.rows)
                array[lo:hi] = encode(texts[lo:hi]).float().cpu().numpy().astype(self.dtype)
                array.flush()
                info = {"key": self.key, "rows": self.rows, "done": hi}
                write_text_atomic(self.progress_path, json.dumps(info))
                advance(hi - lo)
        del array

    def open(self) -> np.ndarray:
        return np.load(self.array_path, mmap_mode="r")


# ------------------------------------------------------------------------------------ training


class LinCirFinetune:
    """Self-masking projection (spec 1.6): only Phi trains, on text only; steps, not epochs."""

    stage = "finetune"

    def __init__(self, model: LinCir, device: torch.device) -> None:
        self.model = model
        self.recipe = model.recipe
        self.device = device
        self.cfg = self.recipe.finetune
        mcfg = self.recipe.method
        # Only Phi trains (spec 1.6): no gradients are kept for the frozen CLIP towers.
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        self.mcfg = mcfg
        self.epoch = 0
        backbone = model.backbone
        tokenizer = backbone.tokenizer
        raw = text_corpus.load_texts(
            mcfg.text_files, mcfg.hf_datasets, mcfg.text_column, mcfg.max_texts
        )
        max_tokens = int(tokenizer.context_length) - 2
        self.texts = [text_corpus.clean_caption(t, tokenizer, max_tokens) for t in raw]
        extractor = text_corpus.KeywordExtractor(mcfg.keywords, mcfg.spacy_model)
        self.keyword_mode = extractor.mode
        self.keywords = extractor(self.texts)
        self.ema = model.add_ema().to(device) if mcfg.ema_decay is not None else None
        from cir_cli.cache import default_cache

        self.cache = default_cache(self.recipe)
        self.store = None
        if mcfg.cache_caption_features:
            self.store = self._caption_features()
        self.val_splits, self.selection_metric = self._validation_data()

    # -- data --------------------------------------------------------------------------------

    def _text_key(self) -> str:
        backbone = self.model.backbone
        text_module = getattr(backbone, "text_module", None)
        if text_module is not None:
            modules = [text_module()]
        else:  # open_clip: everything but the image tower
            modules = [m for n, m in backbone.model.named_children() if n != "visual"]
        weights = state_fingerprint(*modules)
        return f"lincir-text-{backbone.arch}-{weights}-{corpus_digest(self.texts)}"

    @torch.no_grad()
    def _encode_plain(self, texts: list[str]) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return self.model.encode_texts(texts).float()
        finally:
            self.model.train(was)

    def _autocast(self):
        if self.device.type != "cuda":
            return torch.autocast(device_type=self.device.type, enabled=False)
        precision = self.recipe.backbone.precision
        if precision == "fp32":
            return torch.autocast(device_type="cuda", enabled=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _caption_features(self) -> CaptionFeatureStore:
        from cir_cli.engine.distributed import barrier
        from cir_cli.progress import is_main_process

        store = CaptionFeatureStore(
            self.cache.root, self._text_key(), len(self.texts), self.model.backbone.feature_dim
        )
        if is_main_process():
            store.fill(
                self._encode_plain,
                self.texts,
                chunk=max(self.recipe.eval.batch_size, 256),
                description="encoding training captions",
            )
        barrier()  # the other ranks wait for rank 0's encoding
        self.features = store.open()
        return store

    def _validation_data(self) -> tuple[list, str]:
        from cir_cli.data import load_eval_splits
        from cir_cli.evaluation import selection_metric

        data = self.recipe.data
        metric = selection_metric(self.recipe)
        if not Path(data.root).expanduser().exists():
            warnings.warn(
                f"data.root {data.root} does not exist: training Phi without validation "
                "(no `best` checkpoint; set data.root to validate, e.g. on CIRR val as LinCIR)",
                stacklevel=2,
            )
            return [], metric
        return load_eval_splits(self.recipe, data.val_split), metric

    def num_samples(self) -> int:
        return len(self.texts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def dataset(self):
        return None

    def collate(self, items):
        return items

    def gather(self, indices: list[int]):
        from cir_cli.data.text_corpus import FALLBACK_MASKED, mask_caption, masked_pieces
        from cir_cli.data.training import sample_rng

        tokenizer = self.model.backbone.tokenizer
        pieces = []
        for i in indices:
            rng = sample_rng(self.recipe.seed, self.epoch, i)
            pieces.append(masked_pieces(mask_caption(self.texts[i], self.keywords[i], rng)))
        ids, mask = tokenize_pieces(tokenizer, pieces)
        indicator = mask.any(dim=1)
        if not bool(indicator.all()):
            # No placeholder survived (no words, or all cut by the context length): LinCIR's
            # fallback prompt, counted in preproc_rate (spec 1.6 step 4).
            fb_ids, fb_mask = tokenize_pieces(tokenizer, [masked_pieces(FALLBACK_MASKED)])
            missing = ~indicator
            ids[missing] = fb_ids[0]
            mask[missing] = fb_mask[0]
        if self.store is not None:
            rows = np.asarray(indices)
            order = np.argsort(rows)  # sorted reads from the memory map
            feats = np.empty((len(rows), self.features.shape[1]), dtype=np.float32)
            feats[order] = self.features[rows[order]]
            captions = torch.from_numpy(feats)
        else:
            captions = [self.texts[i] for i in indices]
        return captions, ids, mask, indicator.float()

    # -- optimisation ----------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        return [
            {
                "params": list(self.model.phi.parameters()),
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]

    def after_optimizer_step(self) -> None:
        """The trainer calls it after every real optimizer step (not after a GradScaler skip)."""
        if self.ema is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of Phi with LinCIR's warm-up: decay_n = min(decay, (1 + n) / (10 + n)).

        LinCIR's EMAModel.step increments its counter before computing the decay, so the n-th
        update uses n = 1, 2, ... (first decay 2/11); fixes.ema_warmup_from_zero counts from 0.
        """
        ema = self.ema
        n = int(ema.num_updates) + (0 if self.recipe.fixes.ema_warmup_from_zero else 1)
        decay = min(float(self.mcfg.ema_decay), (1 + n) / (10 + n))
        for e, p in zip(ema.parameters(), self.model.phi.parameters(), strict=True):
            e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1 - decay)
        ema.num_updates += 1

    def set_train_mode(self) -> None:
        self.model.eval()  # frozen CLIP towers stay in eval mode
        self.model.phi.train()  # dropout 0.5 (spec 1.3)

    def compute_loss(self, batch):
        captions, ids, mask, indicator = batch
        if isinstance(captions, torch.Tensor):
            target = captions.to(self.device, non_blocking=True).float()
        else:
            target = self._encode_plain(captions)
        # x = t + u * eps, u ~ U[0,1) once per sample, eps ~ N(0, I) (spec 1.6).
        u = torch.rand(target.shape[0], 1, device=target.device)
        noise = torch.randn_like(target) * self.mcfg.noise_multiplier
        v = self.model.phi(target + u * noise)
        predicted = encode_with_pseudo_tokens(self.model.backbone, ids, mask, v)
        loss = F.mse_loss(predicted.float(), target)
        return loss, {"preproc_rate": float(indicator.mean())}

    # -- validation and checkpoints ---------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.val_splits:
            return {}
        result = evaluate(
            self.model,
            self.val_splits,
            cache=self.cache,
            batch_size=self.recipe.eval.batch_size,
            num_workers=self.recipe.data.num_workers,
            rank_chunk=self.recipe.eval.rank_chunk,
        )
        return result.metrics

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"phi.{k}": v.detach() for k, v in self.model.phi.state_dict().items()}
        if self.ema is not None:
            state.update({f"phi_ema.{k}": v.detach() for k, v in self.ema.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from cir_cli.checkpoints import load_named_state

        load_named_state(self.model, state, "resume state")

    def checkpoint_metadata(self) -> dict:
        phi = self.model.phi
        return {
            "stage": self.stage,
            "recipe": self.recipe.to_dict(),
            "phi_dims": [phi.input_dim, phi.hidden_dim, phi.output_dim],
            "keywords": self.keyword_mode,
            "texts": len(self.texts),
            "ema_decay": self.mcfg.ema_decay,
        }

