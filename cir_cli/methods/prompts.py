"""Direction prompts of Bi-BLIP4CIR: forward / backward markers on the modification text.

Spec clip4cir_blip4cir.md 3.3 (direction "token") and bug 12. Three modes:

- `compat`: the published transform, byte for byte. The raw caption is split on the substring
  "and" (case-sensitive, also inside words such as "hand|bag" or "br|and"), every chunk gets
  the prefix " [FORWARD] " (or " [BACKWARD] ") and the chunks are joined with "and" again.
  `[FORWARD]` is not a tokenizer token: BERT splits it into "[", "forward", "]". FashionIQ's two
  captions are transformed separately and then joined (strip, capitalise, " and ", spec 1.4),
  exactly as the seeds' datasets and `generate_randomized_fiq_caption` do. The published
  checkpoints were trained (and must be evaluated) on these strings.
- `token`: one real added special token, "[FORWARD]" / "[BACKWARD]", in front of the joined
  text (the clean design of bug 12; incompatible with the published weights).
- `none`: no marker (plain BLIP text).

No torch here: the transforms are pure string functions, tested table-driven.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from cir_cli.data.base import Triplet, query_text

Direction = Literal["forward", "backward"]
PromptMode = Literal["compat", "token", "none"]

DIRECTION_TOKENS: dict[str, str] = {"forward": "[FORWARD]", "backward": "[BACKWARD]"}
PROMPT_MODES: tuple[str, ...] = ("compat", "token", "none")


def compat_prepend(text: str, direction: Direction) -> str:
    """The seeds' `__prepend_text__` (spec 3.3): marker before every "and"-separated chunk.

    "is red and has long sleeves" -> " [FORWARD] is red and [FORWARD]  has long sleeves";
    "is a handbag" -> " [FORWARD] is a hand [FORWARD] bag" (the split matches inside words).
    """
    marker = f" {DIRECTION_TOKENS[direction]} "
    return "and".join(marker + chunk for chunk in text.split("and"))


def directed_text(
    triplet: Triplet,
    policy: str,
    direction: Direction,
    mode: PromptMode,
    variant: int | None = None,
) -> str:
    """The text the BLIP text encoder sees for `triplet` in `direction`.

    `policy` is the caption policy (`verbatim`, `fiq_eval`, `fiq_random`); for `fiq_random`
    the FashionIQ join `variant` (0-3) must be given (the caller owns the seeded draw).
    """
    if policy == "fiq_random" and variant is None and len(triplet.captions) == 2:
        raise ValueError("fiq_random needs an explicit caption variant")
    if mode == "compat":
        # The marker goes into each raw caption before the join, as in the seeds' datasets;
        # the join then strips and capitalises the marked captions (Cap lower-cases the first
        # caption's inner markers: harmless, BERT is uncased).
        marked = tuple(compat_prepend(c, direction) for c in triplet.captions)
        return query_text(replace(triplet, captions=marked), policy, variant=variant)
    text = query_text(triplet, policy, variant=variant)
    if mode == "token":
        return f"{DIRECTION_TOKENS[direction]} {text}"
    if mode == "none":
        return text
    raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
