"""`[method]` keys of `rerank` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cir_cli.config import MethodSection


class RerankMethodConfig(MethodSection):
    """Candidate re-ranking (Liu et al., TMLR 2024; spec reranking.md): stage I = BLIP's
    image-grounded text encoder cross-attending to the reference's ViT tokens ([ENC] pooling,
    learnable temperature; `cir finetune`), stage II = the dual multi-modal encoder scoring
    (query, candidate) pairs (`cir train-combiner`). Re-ranking at evaluation: [rerank]."""

    name: Literal["rerank"] = "rerank"
    # Layers >= this merge the two branches' cross-attention outputs with a learned Linear;
    # earlier layers average them (CR: 6 of 12).
    merge_from_layer: int = Field(6, ge=0)
    # Stage-II training inputs: z_t from the stage-I encoder in train mode (dropout active) as
    # CR does (true), or in eval mode (false). CR's stage-II ViT also ran with drop-path 0.1;
    # here ViT tokens are cached (frozen, eval), which drops that noise (README deviations).
    noisy_z_t: bool = True
    # Precision of the cached 577 x 768 ViT tokens (CR kept fp32 on the GPU): "fp16" halves
    # the cache (886 KB per image) at ~1e-3 relative rounding of the tokens.
    token_precision: Literal["fp16", "fp32"] = "fp16"
