"""`[method]` keys of `sprc` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cir_cli.config import MethodSection


class SprcMethodConfig(MethodSection):
    """SPRC (spec sprc_cala.md 1): BLIP-2 Q-Former with sentence-level prompts; target = 32
    projected query tokens, score = max over them. Single stage (`cir finetune`)."""

    name: Literal["sprc"] = "sprc"
    # Caption tokens (LAVIS max_txt_len, spec 1.3); the prompt CLS sits at index num_query_tokens.
    max_text_length: int = Field(32, ge=2)
    # loss = itc + w_rtc * rtc + w_align * align (spec 1.4): CIRR 0.4 / 0.4; the FashionIQ
    # script sums them unweighted (1 / 1).
    loss_rtc: float = Field(0.4, ge=0)
    loss_align: float = Field(0.4, ge=0)
    # SPRC leaves temp unclamped; true clamps it to [0.001, 0.5] as upstream BLIP-2 (spec 5).
    clamp_temp: bool = False
    # Weight decay on every parameter as SPRC (true), or none on biases, norms, tokens, temp.
    decay_all: bool = True
