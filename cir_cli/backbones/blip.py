"""BLIP ViT-B/16 towers on transformers' BLIP modules, with BLIP's original checkpoint layout.

Spec clip4cir_blip4cir.md 3.1 and 7. The image tower is `BlipVisionModel` (ViT, pre-norm blocks,
LayerNorm eps 1e-6) + `vision_proj`; the feature is the final-LayerNorm output of the CLS token,
projected, unnormalised. The text tower is `BlipTextModel` (BLIP's BERT: word + position
embeddings, no token-type embedding) run in text-only mode (no cross-attention) + `text_proj`,
[CLS] pooling, unnormalised. The attribute names equal `BlipForImageTextRetrieval`'s
(`vision_model`, `vision_proj`, `text_encoder`, `text_proj`), so hub ids such as
`Salesforce/blip-itm-base-coco` and `save_pretrained` folders load with `from_pretrained`.

`backbone.pretrained` may be:
- BLIP's original `model_base.pth` (`{'model': state_dict}` with `visual_encoder.*`,
  `vision_proj.*`, `text_encoder.*`, `text_proj.*`): converted key by key (`convert_blip_state`),
  the 14x14 position grid of 224 px pretraining resized bicubically to this model's grid (CLS
  kept), loaded strictly on those four prefixes; everything else in the file (momentum encoders,
  queues, ITM head, decoder) is ignored, as the seeds do. `backbone.sha1` checks the file.
- a transformers folder or hub id (`from_pretrained`, offline from the local cache);
- None / "": random initialisation (tests, the toy recipe).

Architectures: `blip-base` (the published ViT-B model, 384 px, BERT-base, 256-d features) and
`cir-tiny-blip` (same code, 2-layer 64-wide towers at 64 px and a small built-in WordPiece vocab
covering the toy dataset's words, for tests and `toy_blip4cir`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli.checkpoints import check_sha1, load_state_dict_strict, load_torch_checkpoint
from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import BlipBackboneConfig

# BLIP's tokenizer additions (spec 3.1): bos "[DEC]" (id 30522) and "[ENC]" (id 30523).
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
MAX_TEXT_LENGTH = 77
# The published model_base.pth (BB README; spec 7).
MODEL_BASE_SHA1 = "5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50"
# Module prefixes of the original checkpoint that the two towers use (spec 3.1).
TOWER_PREFIXES = ("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj.")


@dataclass(frozen=True)
class BlipArch:
    """A BLIP architecture: transformers config fields of both towers and the feature size."""

    vision: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    # None: BERT-uncased (`backbone.tokenizer`, default the hub id bert-base-uncased).
    builtin_vocab: tuple[str, ...] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# Toy-dataset words (and the direction-marker words) for the tiny vocabulary; any other word
# still tokenizes through the single-character pieces.
_TINY_WORDS_TEXT = """
    a and be bit blue bottom but centre change circle colour corner down from give green in
    instead into is it its large left little make medium middle mirror move nudge of one orange
    paint place position purple put rainbow red reflect replace resize right same shape shift
    should sits size slightly small square star step the through to top triangle turn up use
    where with yellow bigger smaller larger next previous forward backward
"""
_TINY_WORDS = tuple(_TINY_WORDS_TEXT.split())


def _tiny_vocab() -> tuple[str, ...]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punctuation = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [f"##{c}" for c in letters + digits]
    tokens = specials + punctuation + digits + letters + pieces + list(_TINY_WORDS)
    return tuple(dict.fromkeys(tokens))


_BERT_BASE_TEXT = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "encoder_hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}

ARCHS: dict[str, BlipArch] = {
    # BLIP ViT-B/16 (model_base.pth, BB's BLIPImgEncoder / BLIPTextEncoder; spec 3.1).
    "blip-base": BlipArch(
        vision={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 384,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        text=_BERT_BASE_TEXT,
        embed_dim=256,
    ),
    "cir-tiny-blip": BlipArch(
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "layer_norm_eps": 1e-6,
            # The toy recipe keeps this tower random and frozen (as BLIP4CIR freezes its ViT):
            # a wide init spreads the random features (mean pairwise cosine 0.89 on toy images
            # against 0.98 at 0.02), so the text tower has image differences to work with.
            "initializer_range": 0.3,
        },
        text={
            "hidden_size": 64,
            "encoder_hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 80,
            "layer_norm_eps": 1e-12,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
        },
        embed_dim=64,
        builtin_vocab=_tiny_vocab(),
    ),
}


# --------------------------------------------------------------------------------------------
# Tokenizer


def _add_blip_tokens(tokenizer: Any) -> Any:
    """BLIP's additions (spec 3.1): bos [DEC], then [ENC], as ids 30522 and 30523."""
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def _bert_from_vocab_file(path: Path) -> Any:
    from transformers import BertTokenizer

    # Positional path: transformers 5 ignores the `vocab_file=` keyword (environment notes).
    return BertTokenizer(str(path), do_lower_case=True)


def build_tokenizer(source: str | None, arch: BlipArch) -> Any:
    """BERT-uncased + [DEC]/[ENC] (spec 3.1) from a vocab.txt, a tokenizer folder or a hub id."""
    if source is None and arch.builtin_vocab is not None:
        # Built-in vocabularies are written to a temporary vocab.txt: transformers 4.x only
        # builds a BertTokenizer from a file.
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.txt"
            vocab_file.write_text("\n".join(arch.builtin_vocab) + "\n", encoding="utf-8")
            return _add_blip_tokens(_bert_from_vocab_file(vocab_file))
    source = source or "bert-base-uncased"
    path = Path(source).expanduser()
    if path.is_file():
        tokenizer = _bert_from_vocab_file(path)
    else:
        from transformers import BertTokenizer

        try:
            tokenizer = BertTokenizer.from_pretrained(str(path) if path.is_dir() else source)
        except (OSError, ValueError) as exc:
            raise CirError(
                f"backbone.tokenizer '{source}': cannot load a BERT tokenizer "
                f"({type(exc).__name__}); offline, set backbone.tokenizer to a bert-base-uncased "
                "vocab.txt"
            ) from None
    # Offline, transformers 5 can return an empty 5-token tokenizer instead of raising.
    if len(tokenizer) <= 5:
        raise CirError(
            f"backbone.tokenizer '{source}': got a {len(tokenizer)}-token vocabulary (offline "
            "without a cached copy?); set backbone.tokenizer to a bert-base-uncased vocab.txt"
        )
    return _add_blip_tokens(tokenizer)


# --------------------------------------------------------------------------------------------
# The original checkpoint layout (model_base.pth) -> transformers' BLIP modules


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ViT position embedding (1, 1 + g*g, D) to a grid x grid patch grid.

    The CLS position is kept as is; the g x g patch positions are resized as an image with
    bicubic interpolation, align_corners=False (spec 3.1: 14x14 at 224 px -> 24x24 at 384 px).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a (1, N, D) position embedding, got {tuple(pos_embed.shape)}")
    n_patches = pos_embed.shape[1] - 1
    old = math.isqrt(n_patches)
    if old * old != n_patches:
        raise ValueError(f"position embedding of {n_patches} patches is not a square grid")
    if old == grid:
        return pos_embed
    dim = pos_embed.shape[2]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False
    ).to(pos_embed.dtype)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


# Original ViT block names (timm layout, BLIP's vit.py) -> BlipEncoderLayer names.
_BLOCK_RENAMES = (
    ("norm1.", "layer_norm1."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("norm2.", "layer_norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)


_VISION_FIXED = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def _vision_key(key: str) -> str | None:
    """`visual_encoder.<x>` suffix -> `vision_model.<y>`, or None for an unknown name."""
    if key in _VISION_FIXED:
        return "vision_model." + _VISION_FIXED[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        for old, new in _BLOCK_RENAMES:
            if parts[2].startswith(old):
                rest = parts[2][len(old) :]
                return f"vision_model.encoder.layers.{parts[1]}.{new}{rest}"
    return None


def original_key(key: str) -> str:
    """This backbone's key -> the original BLIP checkpoint's name (for error messages)."""
    if not key.startswith("vision_model."):
        return key
    rest = key.removeprefix("vision_model.")
    for old, new in _VISION_FIXED.items():
        if rest == new:
            return f"visual_encoder.{old}"
    parts = rest.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layers"]:
        for old, new in _BLOCK_RENAMES:
            if parts[3].startswith(new):
                return f"visual_encoder.blocks.{parts[2]}.{old}{parts[3][len(new) :]}"
    return f"visual_encoder.{rest}"


def convert_blip_state(
    state: Mapping[str, torch.Tensor], grid: int, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map BLIP's original tower keys onto this backbone's (transformers) names.

    Only `visual_encoder.*`, `vision_proj.*`, `text_encoder.*` and `text_proj.*` are taken
    (spec 3.1); `pos_embed` is resized to `grid` x `grid`. The text keys are already the
    transformers names (BLIP's med.py is what `BlipTextModel` ports). An unknown
    `visual_encoder.*` name is an error: the strict load would not tell where it came from.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            new = _vision_key(key.removeprefix("visual_encoder."))
            if new is None:
                unknown.append(key)
                continue
            if key == "visual_encoder.pos_embed":
                value = interpolate_pos_embed(value, grid)
            out[new] = value
        elif key.startswith(("vision_proj.", "text_encoder.", "text_proj.")):
            out[key] = value
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise CirError(f"{source}: unknown BLIP image-encoder keys: {shown}")
    return out


def read_blip_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an original BLIP file: `checkpoint['model']` or a bare state dict."""
    ckpt = load_torch_checkpoint(path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping) or not any(
        isinstance(k, str) and k.startswith(TOWER_PREFIXES) for k in state
    ):
        found = ", ".join(str(k) for k in list(ckpt)[:8])
        raise CirError(
            f"{path}: not a BLIP checkpoint (expected 'model' with visual_encoder.*, "
            f"text_encoder.* keys; found {found})"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------------------------
# The backbone


def _configs(arch: BlipArch, image_size: int | None, vocab_size: int) -> tuple[Any, Any]:
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = dict(arch.vision)
    if image_size is not None:
        vision["image_size"] = image_size
    text = dict(arch.text)
    text["vocab_size"] = vocab_size
    # is_decoder=True creates the cross-attention weights BLIP's checkpoints carry (BLIP's
    # med_config: add_cross_attention); they are never run in text-only mode.
    text_config = BlipTextConfig(
        **text, is_decoder=True, pad_token_id=0, bos_token_id=vocab_size - 2, hidden_act="gelu"
    )
    # transformers' BLIP vision init range is 1e-10 (it expects pretrained weights): random
    # towers would map every image to the same feature. Use BERT's 0.02 for both.
    vision.setdefault("initializer_range", 0.02)
    vision_config = BlipVisionConfig(**vision, hidden_act="gelu", attention_dropout=0.0)
    return vision_config, text_config


class BlipBackbone(nn.Module):
    """BLIP's image and text towers with the backbone surface the methods use."""

    def __init__(
        self,
        vision_model: nn.Module,
        vision_proj: nn.Linear,
        text_encoder: nn.Module,
        text_proj: nn.Linear,
        tokenizer: Any,
        arch: str,
        source: str,
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.vision_proj = vision_proj
        self.text_encoder = text_encoder
        self.text_proj = text_proj
        self.tokenizer = tokenizer
        self.arch = arch
        self.source = source
        if len(tokenizer) != text_encoder.config.vocab_size:
            raise CirError(
                f"BLIP tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary is "
                f"{text_encoder.config.vocab_size} (BLIP: BERT-uncased 30,522 + [DEC], [ENC])"
            )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        arch: str = "blip-base",
        image_size: int | None = None,
        tokenizer: str | Any | None = None,
    ) -> BlipBackbone:
        """Random-initialised towers of a named architecture (weights are loaded separately).

        `tokenizer`: a source for `build_tokenizer` (None: the architecture's default) or an
        already built BLIP tokenizer.
        """
        from transformers import BlipTextModel, BlipVisionModel

        spec = _arch(arch)
        if tokenizer is None or isinstance(tokenizer, str | Path):
            tok = build_tokenizer(None if tokenizer is None else str(tokenizer), spec)
        else:
            tok = tokenizer
        vision_config, text_config = _configs(spec, image_size, len(tok))
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config, add_pooling_layer=False)
        return cls(
            vision,
            nn.Linear(vision_config.hidden_size, spec.embed_dim),
            text,
            nn.Linear(text_config.hidden_size, spec.embed_dim),
            tok,
            arch,
            f"{arch}/random-init",
        )

    @classmethod
    def from_config(cls, config: BlipBackboneConfig) -> BlipBackbone:
        pretrained = config.pretrained or None
        if pretrained and _is_hf_source(pretrained):
            backbone = cls.from_transformers(pretrained, config.image_size, config.tokenizer)
        else:
            backbone = cls.build(config.arch, config.image_size, config.tokenizer)
            if pretrained:
                path = Path(pretrained).expanduser()
                if not path.is_file():
                    raise CirError(f"backbone.pretrained: weights file not found: {path}")
                if config.sha1:
                    check_sha1(path, config.sha1)
                backbone.load_blip_checkpoint(path)
        backbone.eval()
        return backbone

    @classmethod
    def from_transformers(
        cls, source: str, image_size: int | None = None, tokenizer: str | None = None
    ) -> BlipBackbone:
        """A `BlipForImageTextRetrieval` folder or hub id (offline: the local HF cache)."""
        from transformers import BlipForImageTextRetrieval

        try:
            full = BlipForImageTextRetrieval.from_pretrained(source)
        except OSError as exc:
            raise CirError(
                f"backbone.pretrained '{source}': cannot load a BLIP retrieval model "
                f"({str(exc).splitlines()[0][:160]})"
            ) from None
        tok = build_tokenizer(tokenizer or source, _arch("blip-base"))
        vision = full.vision_model
        if image_size is not None and image_size != vision.config.image_size:
            _resize_vision(vision, image_size)
        return cls(
            vision,
            full.vision_proj,
            full.text_encoder,
            full.text_proj,
            tok,
            str(source),
            str(source),
        )

    def load_blip_checkpoint(self, path: Path) -> None:
        """Load BLIP's original `model_base.pth` layout strictly on the four tower prefixes.

        Missing and unexpected keys are reported under the file's own (original) names.
        """
        state = read_blip_checkpoint(path)
        converted = convert_blip_state(state, self.grid, str(path))
        expected = [k for k in self.state_dict() if not k.endswith("position_ids")]
        missing = [original_key(k) for k in expected if k not in converted]
        unexpected = [
            original_key(k) for k in converted if k not in expected and "position_ids" not in k
        ]
        if missing or unexpected:
            problems = []
            for label, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    more = f", ... (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                    problems.append(f"{label} {len(keys)} key(s): {', '.join(keys[:10])}{more}")
            raise CirError(f"{path}: BLIP weights do not fit {self.arch}: " + "; ".join(problems))
        load_state_dict_strict(self, converted, str(path), ignore=["position_ids"])
        self.source = str(path)

    # -- backbone surface --------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        size = self.vision_model.config.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def grid(self) -> int:
        patch = self.vision_model.config.patch_size
        return self.image_size // int(patch[0] if isinstance(patch, tuple | list) else patch)

    @property
    def feature_dim(self) -> int:
        return int(self.text_proj.out_features)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """BERT ids + attention mask, padded to the longest, truncated at 77 (spec 3.1)."""
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_LENGTH,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw 256-d image features: vision_proj(final-LayerNorm CLS token), (B, D)."""
        hidden = self.vision_model(pixel_values=pixels).last_hidden_state
        # last_hidden_state is already post-LayerNorm; pooler_output would apply it twice.
        return self.vision_proj(hidden[:, 0])

    def encode_text(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw 256-d text features: text_proj(last hidden state at [CLS]), text-only mode."""
        out = self.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            is_decoder=False,
        )
        return self.text_proj(out.last_hidden_state[:, 0])

    def image_module(self) -> nn.Module:
        """The image tower as one module (keys `vision_model.*`, `vision_proj.*`)."""
        return nn.ModuleDict({"vision_model": self.vision_model, "vision_proj": self.vision_proj})

    def text_module(self) -> nn.Module:
        """The text tower as one module, keyed like BB's `BLIPTextEncoder` state dict."""
        return nn.ModuleDict({"text_encoder": self.text_encoder, "text_proj": self.text_proj})

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.vision_model.parameters()) + list(self.vision_proj.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        # The cross-attention weights are never used in text-only mode: they would get no
        # gradient (AdamW skips them in the seeds; DDP would wait for them here).
        return [
            p for n, p in self.text_encoder.named_parameters() if ".crossattention." not in f".{n}"
        ] + list(self.text_proj.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.text_encoder.gradient_checkpointing_enable()
        else:
            self.text_encoder.gradient_checkpointing_disable()

    def add_special_tokens(self, tokens: tuple[str, ...], init_from: dict[str, str]) -> None:
        """Add real special tokens to the tokenizer and rows to the word embedding.

        Each new row starts as the mean embedding of the word pieces of `init_from[token]`
        (e.g. "[FORWARD]" -> "[", "forward", "]"), i.e. where the compat prompt starts.
        """
        new = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if not new:
            return
        pieces = {t: self.tokenizer(init_from.get(t, t), add_special_tokens=False) for t in new}
        # Special tokens are matched verbatim (never lower-cased or split into word pieces).
        self.tokenizer.add_tokens(list(new), special_tokens=True)
        old = self.text_encoder.get_input_embeddings()
        n = len(self.tokenizer)
        grown = nn.Embedding(n, old.embedding_dim, padding_idx=old.padding_idx)
        grown.to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            grown.weight[: old.num_embeddings] = old.weight
            for token in new:
                ids = pieces[token]["input_ids"]
                row = self.tokenizer.convert_tokens_to_ids(token)
                grown.weight[row] = old.weight[ids].mean(0) if ids else old.weight.mean(0)
        self.text_encoder.set_input_embeddings(grown)
        self.text_encoder.config.vocab_size = n


def _arch(name: str) -> BlipArch:
    spec = ARCHS.get(name)
    if spec is None:
        raise CirError(
            f"backbone.arch '{name}' is not a BLIP architecture; expected one of "
            f"{', '.join(ARCHS)} (or backbone.pretrained = a transformers BLIP folder / hub id)"
        )
    return spec


def _is_hf_source(pretrained: str) -> bool:
    """A transformers folder (config.json inside) or a hub id like 'Salesforce/blip-itm-...'."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists() or path.suffix:
        return False
    parts = pretrained.split("/")
    return len(parts) == 2 and all(parts) and not pretrained.startswith((".", "~", os.sep))


def _resize_vision(vision: nn.Module, image_size: int) -> None:
    """Rebuild the position embedding of a loaded vision model for another input size."""
    emb = vision.embeddings
    patch = vision.config.patch_size
    grid = image_size // int(patch[0] if isinstance(patch, tuple | list) else patch)
    with torch.no_grad():
        resized = interpolate_pos_embed(emb.position_embedding.data, grid)
    emb.position_embedding = nn.Parameter(resized)
    emb.image_size = image_size
    emb.num_patches = grid * grid
    emb.num_positions = grid * grid + 1
    vision.config.image_size = image_size
