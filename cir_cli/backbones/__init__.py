"""Backbone registry: encoder towers keyed by name, built from a recipe's [backbone] section.

Every backbone exposes the same small surface (`encode_image`, `encode_text`, `tokenize`,
`image_parameters`, `text_parameters`, `image_size`, `feature_dim`) so methods never depend on
which library (open_clip, transformers) provides the towers. Entries are import strings, so
listing or validating recipes never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import BackboneConfig

BACKBONES: dict[str, str] = {
    "open_clip": "cir_cli.backbones.open_clip_towers:OpenClipBackbone",
    "hf_clip": "cir_cli.backbones.hf_clip:HfClipBackbone",
    "blip": "cir_cli.backbones.blip:BlipBackbone",
    "blip2": "cir_cli.backbones.blip2:Blip2Backbone",
}


def build_backbone(config: BackboneConfig) -> Any:
    """Instantiate the backbone named by `config.name` with its weights loaded."""
    target = BACKBONES.get(config.name)
    if target is None:
        raise CirError(f"unknown backbone '{config.name}'; known: {', '.join(sorted(BACKBONES))}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if config.init_seed is None:
        return cls.from_config(config)
    import torch

    # A private RNG stream: the towers' random weights depend on init_seed only, and the run's
    # stream (heads built after the towers, data order, dropout) is not advanced.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return cls.from_config(config)
