"""CLIP towers from transformers, as LinCIR loads them (spec lincir_searle_circo.md 1.1).

Two separate classes, `CLIPTextModelWithProjection` (`.text_embeds`) and
`CLIPVisionModelWithProjection` (`.image_embeds`): projected, un-normalised features (B, d).

`arch` names the model: a Hugging Face id (`openai/clip-vit-large-patch14`), one of LinCIR's
keys (`large`, `huge`, `giga`, mapped to the ids LinCIR uses) or the built-in random tiny
config `cir-tiny-hf` (tests, toy recipe). `pretrained` is a `save_pretrained` folder, a hub id
(resolved from the local hub cache when offline) or None (random initialisation from the
config). Every weight of both towers must be found in the files (a missing key is an error).

Tokenisation uses open_clip's CLIP BPE tokenizer (same ids as OpenAI `clip.tokenize` and the HF
CLIP tokenizers for ordinary text; pads with 0; spec 1.1: one tokenizer suffices). The text
tower is always called without an attention mask: causal attention only, as original CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import HfClipBackboneConfig

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN = {"cir-tiny-hf": CONFIG_DIR / "cir-tiny-hf.json"}
# LinCIR's --clip_model_name keys, the ids its models.py build_text_encoder loads (spec 1.1).
ALIASES = {
    "large": "openai/clip-vit-large-patch14",
    "huge": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "giga": "Geonmo/CLIP-Giga-config-fixed",
}


def _quiet_transformers():
    """Context that silences transformers' 'unused weights' notices (expected: one tower each)."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def quiet():
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)

    return quiet()


def _load_tower(cls, source: str, what: str):
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(source, output_loading_info=True)
        except OSError as exc:
            raise CirError(
                f"backbone.pretrained '{source}': cannot load the CLIP {what} tower "
                f"({str(exc).splitlines()[0][:160]}); offline, download the model once and set "
                "backbone.pretrained to its folder"
            ) from None
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        bad = (missing + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched])[:5]
        raise CirError(
            f"backbone.pretrained '{source}': the {what} tower's weights are incomplete "
            f"(missing or mismatched: {', '.join(bad)})"
        )
    return model


class HfClipBackbone(nn.Module):
    """Text and vision CLIP towers from transformers with the backbone surface methods use."""

    def __init__(self, text: nn.Module, vision: nn.Module, arch: str, source: str) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.text = text
        self.vision = vision
        self.arch = arch
        self.source = source
        self.tokenizer = SimpleTokenizer(
            context_length=int(text.config.max_position_embeddings)
        )

    @classmethod
    def from_config(cls, config: HfClipBackboneConfig) -> HfClipBackbone:
        from transformers import (
            CLIPConfig,
            CLIPTextModelWithProjection,
            CLIPVisionModelWithProjection,
        )

        arch = ALIASES.get(config.arch, config.arch)
        pretrained = config.pretrained
        if pretrained:
            local = Path(pretrained).expanduser()
            source = str(local) if local.exists() else ALIASES.get(pretrained, pretrained)
            if local.exists() and not (local / "config.json").is_file():
                raise CirError(
                    f"backbone.pretrained: {local} has no config.json; expected a folder written "
                    "by save_pretrained (config.json + model.safetensors)"
                )
            text = _load_tower(CLIPTextModelWithProjection, source, "text")
            vision = _load_tower(CLIPVisionModelWithProjection, source, "vision")
        else:
            if arch in BUILTIN:
                clip_config = CLIPConfig(**json.loads(BUILTIN[arch].read_text(encoding="utf-8")))
            else:
                try:
                    clip_config = CLIPConfig.from_pretrained(arch)
                except OSError:
                    raise CirError(
                        f"backbone.arch '{config.arch}': no config found (built-in: "
                        f"{', '.join(BUILTIN)}; or a Hugging Face id in the local cache)"
                    ) from None
            text = CLIPTextModelWithProjection(clip_config.text_config)
            vision = CLIPVisionModelWithProjection(clip_config.vision_config)
            source = f"{arch}/random-init"
        text.eval()
        vision.eval()
        return cls(text, vision, arch, source)

    # -- backbone surface ------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    @property
    def feature_dim(self) -> int:
        return int(self.text.config.projection_dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) projected image features `.image_embeds`, (B, d)."""
        return self.vision(pixel_values=pixels).image_embeds

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) projected text features `.text_embeds`, (B, d)."""
        return self.text(input_ids=tokens.to(self.text.device)).text_embeds

    def token_embedding_module(self) -> nn.Embedding:
        return self.text.get_input_embeddings()

    def image_module(self) -> nn.Module:
        return self.vision

    def text_module(self) -> nn.Module:
        return self.text

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.vision.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.text, self.vision):
            if enable:
                tower.gradient_checkpointing_enable()
            else:
                tower.gradient_checkpointing_disable()
