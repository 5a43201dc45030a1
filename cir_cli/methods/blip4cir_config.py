"""`[method]` keys of `blip4cir` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cir_cli.config import MethodSection


class Blip4CirMethodConfig(MethodSection):
    """Bi-BLIP4CIR (spec clip4cir_blip4cir.md 3.3, 4.3): BLIP towers, sum then Combiner, with
    forward + reversed queries (weight 0 = the BLIP4CIR baseline without bi-directional loss)."""

    name: Literal["blip4cir"] = "blip4cir"
    # As CLIP4Cir's: "auto" (the Combiner when a checkpoint brought one, else the sum), "sum",
    # or "combiner" (trained Combiner weights required). Stage I always trains the sum.
    combining: Literal["auto", "sum", "combiner"] = "auto"
    logit_scale: float = 100.0
    # Direction prompts: `compat` = the published " [FORWARD] " string transform (with its
    # split-on-"and" quirk; the published checkpoints need it), `token` = real added special
    # tokens [FORWARD]/[BACKWARD], `none` = no marker.
    prompts: Literal["compat", "token", "none"] = "compat"
    # w of L = L_f + w L_r in stage I (seeds: 0.4 FashionIQ, 0.1 CIRR) and stage II (0.5 / 0.1).
    finetune_reverse_weight: float = Field(0.4, ge=0)
    combiner_reverse_weight: float = Field(0.5, ge=0)
    # Stage I: text_proj's lr is this multiple of finetune.lr (seeds: 100). Its group is the
    # second one: finetune.schedule_groups = "first" keeps it constant, as the seeds.
    text_proj_lr_scale: float = Field(100.0, gt=0)
    # Stage II reversed loss: reference rows per chunk of the B x B pairing (bounds memory).
    reverse_chunk: int = Field(64, ge=1)
