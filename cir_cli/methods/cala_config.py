"""`[method]` keys of `cala` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cir_cli.config import MethodSection


class CalaMethodConfig(MethodSection):
    """CaLa (spec sprc_cala.md 3): the sum or ARTEMIS query frame, trained together with two
    training-only heads, TBIA's twin-attention compositor (TAC) and CTR's hinge-based cross
    attention (HCA). Backbones: BLIP-2 (`blip2`, three Q-Former roles on one frozen ViT) or an
    open_clip ResNet (`open_clip`, RN50x4). Single stage (`cir finetune`)."""

    name: Literal["cala"] = "cala"
    # Query frame (spec 3.2): "sum" = norm(r + m) scored by cosine (logits x logit_scale),
    # "artemis" = EM + IS scores used directly as logits.
    frame: Literal["sum", "artemis"] = "sum"
    # Which encoders train (spec 3.6). BLIP-2: "multi" = the multimodal and textual Q-Formers,
    # "both" = also the visual one. CLIP: "text" (the text tower; CaLa never steps the visual
    # tower, which here stays frozen and cached).
    encoder: Literal["multi", "both", "text"] = "both"
    # tau and h of L = h CE(hca) + (1 - h) CE(tau tac + (1 - tau) main) (spec 3.5); README
    # values 0.45 / 0.1. 0 switches the head off (it is then not trained or saved).
    tac_weight: float = Field(0.45, ge=0, le=1)
    hca_weight: float = Field(0.1, ge=0, le=1)
    # Fixed logit scales of the published code: 100 for the sum frame, 10 for TAC and HCA.
    logit_scale: float = Field(100.0, gt=0)
    head_logit_scale: float = Field(10.0, gt=0)
    # Learning rates relative to finetune.lr (spec 3.6): TAC and HCA 2x, ARTEMIS 10x.
    tac_lr_scale: float = Field(2.0, gt=0)
    hca_lr_scale: float = Field(2.0, gt=0)
    artemis_lr_scale: float = Field(10.0, gt=0)
    # Mask padded caption tokens out of HCA's text hinge: an improvement (README deviations);
    # CaLa has no mask, so false (the default) reproduces it.
    text_padding_mask: bool = False
    # CLIP: CaLa's `.view(B, H*W, C)` of the (B, C, H, W) layer-4 map, which mixes channels and
    # positions; false (default) takes proper spatial tokens (flatten + transpose).
    compat_reshape: bool = False
