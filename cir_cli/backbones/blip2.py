"""BLIP-2 first stage on transformers: frozen ViT, ln_vision, Q-Former, projections, temperature.

Spec: sprc_cala.md section 0 (the shared BLIP-2 blocks), 4.3-4.5 (the transformers mapping).
No LAVIS at run time. One `Blip2Backbone` serves SPRC and, next, CaLa:

- `vision_tokens(pixels)`: the frozen ViT's token output *before* ln_vision, (B, T, Dv). This is
  what the feature cache stores (ln_vision trains, so it must stay out of the cache).
- `image_embeds(tokens)`: ln_vision (eps 1e-5, computed in fp32 as LAVIS does).
- `query_outputs(image_embeds)`: P-img, the 32 query outputs (B, Nq, D).
- `text_outputs(ids, mask)`: P-txt, text only (B, L, D); the CLS is at 0.
- `multimodal_outputs(image_embeds, ids, mask)`: P-mm, queries + text attending to the image
  (B, Nq + L, D).
- `prefix_text_outputs(prefix, ids, mask)`: P-prefix (no image; every position takes the text
  FFN), with the prefix either prepended without positions (SPRC pass 2) or spliced after the
  CLS with positions (SPRC's `no_img` prompt path).
- `project_image` / `project_text`: vision_proj / text_proj + L2 normalisation.

Everything except `vision_tokens` is differentiable. Architectures (`backbone.arch`):

- `blip2-vit-g`: EVA-CLIP ViT-g/14, 39 blocks, 1408 wide (transformers `Blip2VisionModel`).
- `blip2-vit-l`: CLIP ViT-L/14 (LAVIS `pretrain_vitL`) as transformers CLIP vision modules.
  LAVIS builds `VisionTransformer(layers=22)` whose `Transformer(layers - 1)` holds **21**
  residual blocks (pip 1.0.2 and upstream HEAD); the spec's "23" is a misreading.
- `blip2-tiny`, `blip2-tiny-vitl`: random-initialised tiny configs of the same code (tests, toy).

Weights (`backbone.pretrained`): None (random), a transformers folder / hub id of
`Blip2ForImageTextRetrieval` (`Salesforce/blip2-itm-vit-g`: ViT-g only, no `temp`), or a LAVIS
checkpoint file (`blip2_pretrained.pth` / `blip2_pretrained_vitL.pth`, `{"model": sd}`) converted
with blip2_convert.py. LAVIS pretrain files hold no ViT (LAVIS deletes frozen params on save):
`backbone.vision_pretrained` then names the ViT weights (`eva_vit_g.pth`, `clip_vit_L.pth`, an
OpenAI / open_clip ViT-L-14 state dict, or the open_clip tag `openai` for ViT-L).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli.backbones.blip2_convert import (
    Converted,
    convert_hf_retrieval_state,
    convert_lavis_state,
    convert_vision_state,
    summarize_dropped,
)
from cir_cli.cache import memoised_fingerprint
from cir_cli.checkpoints import load_state_dict_strict, load_torch_checkpoint
from cir_cli.data import toy
from cir_cli.errors import CirError
from cir_cli.weights import looks_local

if TYPE_CHECKING:
    from cir_cli.config import Blip2BackboneConfig

# Q-Former settings shared by every real BLIP-2 (spec 0.2): bert-base + [DEC] = 30523 rows.
_QFORMER_BASE = {
    "vocab_size": 30523,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "cross_attention_frequency": 2,
}
_QFORMER_TINY = {
    "vocab_size": 0,  # set from the tiny tokenizer
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 128,
    "cross_attention_frequency": 2,
    # Trained from scratch on a random frozen ViT, whose features differ little between images:
    # BERT's 0.1 dropout noise swamps those differences and training collapses to ln(batch).
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

ARCHS: dict[str, dict[str, Any]] = {
    "blip2-vit-g": {
        "vision": "eva",
        # EVA-CLIP-g minus its last block (spec 0.1): mlp_ratio 4.3637 -> 6144, 16 heads.
        "vision_config": {
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "hidden_act": "gelu",
            # transformers' default (1e-10) leaves a random-init ViT constant.
            "initializer_range": 0.02,
        },
        "qformer": _QFORMER_BASE,
        "num_query_tokens": 32,
        "embed_dim": 256,
        "tokenizer": "bert-base-uncased",
    },
    "blip2-vit-l": {
        "vision": "clip",
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 21,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
        "qformer": _QFORMER_BASE,
        "num_query_tokens": 32,
        "embed_dim": 256,
        "tokenizer": "bert-base-uncased",
    },
    "blip2-tiny": {
        "vision": "eva",
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "hidden_act": "gelu",
            # transformers' default (1e-10) leaves a random-init ViT constant.
            "initializer_range": 0.02,
        },
        "qformer": _QFORMER_TINY,
        "num_query_tokens": 8,
        "embed_dim": 64,
        "tokenizer": "cir-tiny",
    },
    "blip2-tiny-vitl": {
        "vision": "clip",
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
        "qformer": _QFORMER_TINY,
        "num_query_tokens": 8,
        "embed_dim": 64,
        "tokenizer": "cir-tiny",
    },
}


# The text FFN of a Q-Former layer (`intermediate` / `output`, not `attention.output` or the
# query FFN `*_query`): only text positions go through it.
_TEXT_FFN = re.compile(r"layer\.\d+\.(intermediate|output)\.")

_NO_HF_VITL = (
    "backbone.pretrained '{}': not a file, and transformers has BLIP-2 weights for ViT-g only; "
    "the ViT-L variant loads LAVIS files (blip2_pretrained_vitL.pth)"
)


def _log(message: str) -> None:
    # Weight-loading notes go to stderr so stdout stays clean for machine-readable output.
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Tokenizer


def tiny_vocab() -> list[str]:
    """A small WordPiece vocabulary: BERT specials, the toy dataset's words, characters.

    Built from the toy generator's templates and attribute names, so every toy caption maps to
    whole-word ids; letters and `##letters` make any other text tokenisable too.
    """
    words: set[str] = set()
    texts = [t for ts in toy.TEMPLATES.values() for t in ts]
    texts += [*toy.SHAPES, *toy.COLOURS, *toy.SIZES, *toy.POSITIONS.values(), *toy.MOVES]
    texts += list(toy.MIRRORS)
    texts += ["bigger", "smaller", "next", "previous", "one", "two", "and", "it", "a", "the"]
    for text in texts:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", text.lower())))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,!?;:'\"()-*#~/")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = letters + [f"##{c}" for c in letters + digits] + digits + punct
    return specials + [w for w in sorted(words) if w not in pieces] + pieces


def load_bert_tokenizer(spec: str, cache_dir: Path | None = None):
    """BERT uncased WordPiece tokenizer + `[DEC]` as bos (LAVIS `init_tokenizer`, spec 0.2).

    `spec`: `cir-tiny` (the built-in tiny vocab), a vocab.txt file, a folder holding vocab.txt,
    or a hub id resolved from the local Hugging Face cache. The tokenizer is always built from
    the plain vocab file (the hub's BLIP-2 processors add an `<image>` token; spec 4.3 caution).
    """
    from transformers import BertTokenizer

    if spec == "cir-tiny":
        import tempfile

        folder = Path(cache_dir or tempfile.gettempdir()) / "cir-tiny-bert"
        folder.mkdir(parents=True, exist_ok=True)
        vocab = folder / "vocab.txt"
        text = "\n".join(tiny_vocab()) + "\n"
        if not vocab.is_file() or vocab.read_text(encoding="utf-8") != text:
            tmp = vocab.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(vocab)
        path = vocab
    else:
        candidate = Path(spec).expanduser()
        if candidate.is_file():
            path = candidate
        elif (candidate / "vocab.txt").is_file():
            path = candidate / "vocab.txt"
        elif candidate.exists() or spec.startswith((".", "/", "~")):
            raise CirError(f"backbone.tokenizer: no vocab.txt at {candidate}")
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(spec, "vocab.txt"))
            except Exception as exc:  # offline / unknown repo come as many exception types
                raise CirError(
                    f"backbone.tokenizer '{spec}': vocab.txt not found locally "
                    f"({type(exc).__name__}); point it at a bert-base-uncased folder or vocab.txt"
                ) from None
    # Positional path: the `vocab_file=` keyword is ignored by some transformers 5 classes.
    tokenizer = BertTokenizer(str(path), do_lower_case=True)
    tokenizer.truncation_side = "right"
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if len(tokenizer) < 10:
        raise CirError(f"backbone.tokenizer: {path} yields an empty vocabulary")
    return tokenizer


# --------------------------------------------------------------------------------------------
# Vision towers: token output before ln_vision, (B, T, Dv)


class EvaVisionTower(nn.Module):
    """EVA-CLIP ViT (transformers `Blip2VisionModel` embeddings + encoder, no post-LN)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import Blip2VisionModel

        model = Blip2VisionModel(config)
        self.config = model.config
        self.embeddings = model.embeddings
        self.encoder = model.encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=self.embeddings(pixels))[0]


class ClipVisionTower(nn.Module):
    """CLIP ViT (transformers CLIP vision modules): ln_pre, blocks, no ln_post on the tokens."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        model = CLIPVisionModel(config)
        # transformers 4.x nests the modules under `.vision_model`; 5.x does not.
        inner = getattr(model, "vision_model", model)
        self.config = model.config
        self.embeddings = inner.embeddings
        self.pre_layrnorm = inner.pre_layrnorm
        self.encoder = inner.encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixels))
        return self.encoder(inputs_embeds=hidden)[0]


def _vision_config(kind: str, values: dict[str, Any]):
    from transformers import Blip2VisionConfig, CLIPVisionConfig

    if kind == "eva":
        return Blip2VisionConfig(**values)
    return CLIPVisionConfig(**values)


# --------------------------------------------------------------------------------------------
# Q-Former paths (shared by the backbone and by separately trained copies)


class QFormerPaths:
    """P-img, P-txt, P-mm and P-prefix over `query_tokens`, `embeddings` and `qformer`.

    Mixed into `Blip2Backbone` and `QFormerCopy`: CaLa trains its textual, multimodal and visual
    Q-Formers separately, on one shared frozen ViT.
    """

    query_tokens: nn.Parameter
    num_query_tokens: int

    def text_path_parameters(self) -> list[nn.Parameter]:
        """What P-txt uses: the text embeddings and the Q-Former without cross-attention and
        query FFN (the rest never receives a gradient from it)."""
        named = [*self.embeddings.named_parameters(), *self.qformer.named_parameters()]
        return [p for name, p in named if "crossattention" not in name and "_query" not in name]

    def query_path_parameters(self) -> list[nn.Parameter]:
        """What P-img uses: the query tokens and the Q-Former without the text FFN (no word or
        position embeddings either)."""
        return [self.query_tokens] + [
            p for name, p in self.qformer.named_parameters() if not _TEXT_FFN.search(name)
        ]

    def _qformer(
        self,
        embeds: torch.Tensor,
        query_length: int,
        mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.qformer(
            query_embeds=embeds,
            query_length=query_length,
            attention_mask=mask,
            encoder_hidden_states=image,
        )[0]

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """P-img: the query tokens cross-attend to the image, (B, Nq, D)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self._qformer(queries, self.num_query_tokens, image=image_embeds)

    def text_outputs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P-txt: text only, (B, L, D); the CLS output is at index 0."""
        return self._qformer(self.embeddings(input_ids=ids), 0, mask)

    def multimodal_outputs(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """P-mm: [queries, text], queries cross-attend to the image, (B, Nq + L, D)."""
        batch = ids.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        embeds = self.embeddings(input_ids=ids, query_embeds=queries)
        full_mask = torch.cat([mask.new_ones(batch, self.num_query_tokens), mask], dim=1)
        return self._qformer(embeds, self.num_query_tokens, full_mask, image_embeds)

    def prefix_text_outputs(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, spliced: bool = False
    ) -> torch.Tensor:
        """P-prefix: prefix embeddings + text, no image; all positions take the text FFN.

        `spliced=False` (SPRC pass 2): [prefix (no position embedding), text with positions
        0..L-1], as upstream embeddings prepend query embeds. `spliced=True` (SPRC's `no_img`
        embeddings, spec 1.2): [CLS, prefix, text[1:]] with positions 0..P+L-1 on all of them.
        The mask is [ones(P), text mask] in both cases (the CLS mask is 1, so it also lines up
        with the spliced order). Output (B, P + L, D).
        """
        batch, length = ids.shape
        prefix = prefix.expand(batch, -1, -1)
        full_mask = torch.cat([mask.new_ones(batch, prefix.shape[1]), mask], dim=1)
        if not spliced:
            embeds = self.embeddings(input_ids=ids, query_embeds=prefix)
        else:
            words = self.embeddings.word_embeddings(ids)
            total = length + prefix.shape[1]
            positions = self.embeddings.position_embeddings(torch.arange(total, device=ids.device))
            seq = torch.cat([words[:, :1], prefix.to(words.dtype), words[:, 1:]], dim=1)
            embeds = seq + positions.unsqueeze(0)
        return self._qformer(embeds, 0, full_mask)


class QFormerCopy(QFormerPaths, nn.Module):
    """A separately trainable copy of a backbone's Q-Former (query tokens, text embeddings, BERT
    layers). Keys: `query_tokens`, `embeddings.*`, `qformer.*`, as in the backbone."""

    def __init__(self, backbone: Blip2Backbone) -> None:
        super().__init__()
        import copy

        self.num_query_tokens = backbone.num_query_tokens
        self.query_tokens = nn.Parameter(backbone.query_tokens.detach().clone())
        self.embeddings = copy.deepcopy(backbone.embeddings)
        self.qformer = copy.deepcopy(backbone.qformer)



# --------------------------------------------------------------------------------------------
# The backbone


class Blip2Backbone(QFormerPaths, nn.Module):
    """BLIP-2 first stage (spec 0): the paths SPRC and CaLa compose (see the module docstring)."""

    def __init__(self, arch: str, tokenizer, source: str = "random-init") -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if arch not in ARCHS:
            raise CirError(f"backbone.arch '{arch}' is not a BLIP-2 arch; known: {_known()}")
        spec = ARCHS[arch]
        self.arch = arch
        self.source = source
        self.tokenizer = tokenizer
        self.vision_kind = spec["vision"]
        vision_config = _vision_config(self.vision_kind, spec["vision_config"])
        tower = EvaVisionTower if self.vision_kind == "eva" else ClipVisionTower
        self.vision_model = tower(vision_config)
        self.vision_model.requires_grad_(False)
        self.vision_layers = int(spec["vision_config"]["num_hidden_layers"])
        width = int(spec["vision_config"]["hidden_size"])

        qformer_values = dict(spec["qformer"])
        if not qformer_values["vocab_size"]:
            qformer_values["vocab_size"] = len(tokenizer)
        if len(tokenizer) > qformer_values["vocab_size"]:
            raise CirError(
                f"backbone.tokenizer has {len(tokenizer)} tokens but {arch} embeds "
                f"{qformer_values['vocab_size']}"
            )
        qconfig = Blip2QFormerConfig(
            **qformer_values, encoder_hidden_size=width, use_qformer_text_input=True
        )
        hidden = qconfig.hidden_size
        self.num_query_tokens = int(spec["num_query_tokens"])
        # LAVIS's ln_vision: torch's default eps 1e-5 (transformers' post_layernorm uses 1e-6).
        self.ln_vision = nn.LayerNorm(width, eps=1e-5)
        self.query_tokens = nn.Parameter(
            torch.empty(1, self.num_query_tokens, hidden).normal_(0.0, qconfig.initializer_range)
        )
        self.embeddings = Blip2TextEmbeddings(qconfig)
        for emb in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(emb.weight, 0.0, qconfig.initializer_range)
        self.qformer = Blip2QFormerModel(qconfig)
        embed_dim = int(spec["embed_dim"])
        self.vision_projection = nn.Linear(hidden, embed_dim)
        self.text_projection = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Blip2BackboneConfig) -> Blip2Backbone:
        arch = config.arch
        if arch not in ARCHS:
            raise CirError(f"backbone.arch '{arch}' is not a BLIP-2 arch; known: {_known()}")
        tokenizer = load_bert_tokenizer(config.tokenizer or ARCHS[arch]["tokenizer"])
        hf_state = None
        # A mistyped local path must not read as a hub error ("Repo id must be ...").
        missing = config.pretrained and not Path(config.pretrained).expanduser().exists()
        if missing and looks_local(config.pretrained):
            raise CirError(
                f"backbone.pretrained: not found: {Path(config.pretrained).expanduser()}"
            )
        if config.pretrained and not Path(config.pretrained).expanduser().is_file():
            # Read (or fail to find) the transformers weights before building a 1 B-parameter
            # model only to discard it.
            if ARCHS[arch]["vision"] != "eva":
                raise CirError(_NO_HF_VITL.format(config.pretrained))
            hf_state = _read_hf_retrieval(config.pretrained)
        model = cls(arch, tokenizer)
        if config.pretrained:
            model.load_pretrained(config.pretrained, hf_state)
        if config.vision_pretrained:
            model.load_vision(config.vision_pretrained)
        elif config.pretrained and not model._vision_loaded:
            raise CirError(
                f"backbone.pretrained {config.pretrained} holds no ViT weights (LAVIS saves "
                "without the frozen tower); set backbone.vision_pretrained (eva_vit_g.pth / "
                "clip_vit_L.pth)"
            )
        model.eval()
        return model

    _vision_loaded = False

    def load_pretrained(
        self, pretrained: str, hf_state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Weights from a transformers folder / hub id or a LAVIS checkpoint file."""
        path = Path(pretrained).expanduser()
        if path.is_file():
            ckpt = load_torch_checkpoint(path)
            state = ckpt.get("model", ckpt)
            if not isinstance(state, dict):
                raise CirError(f"{path}: expected a state dict or {{'model': state_dict}}")
            converted = self.convert_lavis(state, str(path))
            self.load_converted(converted, str(path), allow_missing_vision=True)
        else:
            if self.vision_kind != "eva":
                raise CirError(_NO_HF_VITL.format(pretrained))
            state = hf_state if hf_state is not None else _read_hf_retrieval(pretrained)
            converted = convert_hf_retrieval_state(state)
            self.load_converted(converted, pretrained, allow_missing_vision=False)
        self.source = str(pretrained)

    def load_vision(self, spec: str) -> None:
        """Frozen ViT weights from a LAVIS / OpenAI / open_clip state dict (or tag `openai`)."""
        if spec == "openai" and self.vision_kind == "clip":
            import open_clip

            model = open_clip.create_model("ViT-L-14", pretrained="openai")
            state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise CirError(f"backbone.vision_pretrained: file not found: {path}")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                ckpt = load_torch_checkpoint(path)
                state = ckpt.get("model", ckpt.get("state_dict", ckpt))
        prefixes = ("visual_encoder.", "visual.")
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
        dropped = {k: "not part of the vision tower" for k in state if not k.startswith(prefix)}
        vision = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        converted = convert_vision_state(vision, self.vision_kind, self.vision_layers, spec)
        converted.dropped.update(dropped)
        _report(spec, converted.dropped)
        load_state_dict_strict(
            self.vision_model,
            {k.removeprefix("vision_model."): v for k, v in converted.state.items()},
            spec,
            ignore=["position_ids"],
        )
        self._vision_loaded = True

    def convert_lavis(
        self, state: dict[str, torch.Tensor], source: str, extra_keys: tuple[str, ...] = ()
    ) -> Converted:
        return convert_lavis_state(state, self.vision_kind, self.vision_layers, source, extra_keys)

    def load_converted(self, converted: Converted, source: str, allow_missing_vision: bool) -> None:
        """Strict load of a converted state dict; the only tolerated gaps are printed.

        Tolerated: the whole ViT absent (`allow_missing_vision`: LAVIS-saved files), `temp`
        absent (transformers files drop it: 0.07 is kept, spec 4.5 point 2).
        """
        state = dict(converted.state)
        notes = summarize_dropped(converted.dropped)
        own = self.state_dict()
        if "temp" not in state:
            state["temp"] = own["temp"]
            notes.append(f"temp not in the file: kept {float(own['temp']):.4f}")
        if not converted.has_vision:
            if not allow_missing_vision:
                raise CirError(f"{source}: no vision tower weights in the file")
            for key, value in own.items():
                if key.startswith("vision_model."):
                    state[key] = value
            notes.append("no vision tower in the file: ViT weights come from vision_pretrained")
        else:
            self._vision_loaded = True
        _report(source, converted.dropped, notes)
        load_state_dict_strict(self, state, source, ignore=["position_ids"])

    # -- precision & modes ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Blip2Backbone:
        super().train(mode)
        # The ViT stays in eval for good (LAVIS replaces its train() by a no-op, spec 0.1).
        self.vision_model.eval()
        return self

    @property
    def image_size(self) -> int:
        return int(ARCHS[self.arch]["vision_config"]["image_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.qformer.config.hidden_size)

    @property
    def feature_dim(self) -> int:
        return int(self.vision_projection.out_features)

    def vision_fingerprint(self) -> str:
        """Content hash of the frozen ViT, memoised while its tensors are unchanged."""
        return memoised_fingerprint(self.vision_model)

    def token_cache_key(self, precision: str, preprocessing: str) -> str:
        """Cache key of `vision_tokens`: every BLIP-2 method (SPRC, CaLa) shares the entries."""
        return f"blip2-vit-{self.arch}-{self.vision_fingerprint()}-{precision}-{preprocessing}"

    # -- the paths -----------------------------------------------------------------------------

    def tokenize(
        self, texts: list[str], max_length: int = 32, padding: str = "max_length"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-truncated (LAVIS: padding to max_length 32)."""
        enc = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        device = self.query_tokens.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @torch.no_grad()
    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen ViT token output before ln_vision, (B, T, Dv). Runs in the caller's autocast."""
        return self.vision_model(pixels.to(self.query_tokens.device))

    def image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_vision in fp32 (LAVIS's fp16-safe LayerNorm), (B, T, Dv) float32."""
        return F.layer_norm(
            tokens.float(),
            self.ln_vision.normalized_shape,
            self.ln_vision.weight.float(),
            self.ln_vision.bias.float(),
            self.ln_vision.eps,
        )

    def project_image(self, query_outputs: torch.Tensor) -> torch.Tensor:
        """norm(vision_proj(.)) per query token, (B, Nq, E)."""
        return F.normalize(self.vision_projection(query_outputs), dim=-1)

    def project_text(self, hidden: torch.Tensor) -> torch.Tensor:
        """norm(text_proj(.)) of a (B, D) (or (B, L, D)) hidden state."""
        return F.normalize(self.text_projection(hidden), dim=-1)

    # -- parameter sets ------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What BLIP-2 fine-tuning trains: all but the frozen ViT and the (unused) ITM head."""
        frozen = {id(p) for p in self.vision_model.parameters()}
        frozen |= {id(p) for p in self.itm_head.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]


def _report(source: str, dropped: dict[str, str], notes: list[str] | None = None) -> None:
    lines = notes if notes is not None else summarize_dropped(dropped)
    if lines:
        _log(f"{source}: loaded; left out on purpose:")
        for line in lines:
            _log(f"  - {line}")


def _read_hf_retrieval(pretrained: str) -> dict[str, torch.Tensor]:
    from transformers import Blip2ForImageTextRetrieval

    try:
        model = Blip2ForImageTextRetrieval.from_pretrained(pretrained)
    except OSError as exc:
        raise CirError(
            f"backbone.pretrained '{pretrained}': not a local file, folder or cached hub model "
            f"({str(exc).splitlines()[0][:120]})"
        ) from None
    return model.state_dict()


def _known() -> str:
    return ", ".join(ARCHS)
