"""`[method]` keys of `clip4cir` recipes (torch-free, so a recipe validates without the model)."""

from __future__ import annotations

from typing import Literal

from cir_cli.config import MethodSection


class Clip4CirMethodConfig(MethodSection):
    """CLIP4Cir (spec clip4cir_blip4cir.md 3.2, 4): sum in stage I, Combiner in stage II."""

    name: Literal["clip4cir"] = "clip4cir"
    # How image and text features are fused at evaluation: "sum" (the element-wise sum of
    # stage I and the zero-shot baseline), "combiner" (a trained Combiner is required), or
    # "auto" (the Combiner when a checkpoint brought one, otherwise the sum). Stage I always
    # trains and validates the sum.
    combining: Literal["auto", "sum", "combiner"] = "auto"
    logit_scale: float = 100.0
