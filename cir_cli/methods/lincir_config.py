"""`[method]` keys of `lincir` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cir_cli.config import MethodSection


class LinCirMethodConfig(MethodSection):
    """LinCIR (spec lincir_searle_circo.md 1): Phi maps a CLIP image feature to a pseudo token.

    Zero-shot: Phi is trained on text only (self-masking projection, `cir finetune`); queries
    are the text feature of `prompt` with `$` replaced by Phi(image feature).
    """

    name: Literal["lincir"] = "lincir"
    # Benchmark prompt (spec 1.5); `$` marks the pseudo token, {caption} the modification text.
    prompt: str = "a photo of $ that {caption}"
    # FashionIQ: average the two caption orders "{c1} and {c2}" / "{c2} and {c1}" (spec 1.5).
    fiq_both_orders: bool = True
    # Text-only baseline: drop `$` from the prompt ("a photo of that {caption}"), ignore the image.
    text_only: bool = False
    phi_dropout: float = Field(0.5, ge=0, lt=1)
    # L2-normalise Phi's input at train and eval (LinCIR's --l2_normalize; off by default).
    l2_normalize: bool = False
    # SMP noise x = t + u * eps * noise_multiplier, u ~ U[0,1) per sample (spec 1.6).
    noise_multiplier: float = Field(1.0, ge=0)
    # EMA of Phi kept beside it during training (None: no EMA); use_ema evaluates with it.
    ema_decay: float | None = Field(0.9999, gt=0, lt=1)
    use_ema: bool = False
    # Training text (spec 1.6): local .txt / .jsonl / .csv / .parquet files (column
    # `text_column`) and Hugging Face dataset ids (needs the `datasets` package), mixed.
    text_files: list[str] = Field(default_factory=list)
    hf_datasets: list[str] = Field(default_factory=list)
    text_column: str = "text"
    max_texts: int | None = Field(None, ge=1)
    # Keyword masking: spaCy when a pipeline is installed ("auto"), or the built-in heuristic.
    keywords: Literal["auto", "spacy", "heuristic"] = "auto"
    spacy_model: str = "en_core_web_sm"
    # Encode each unmasked caption once through the feature cache (the seeds did it per step).
    cache_caption_features: bool = True
