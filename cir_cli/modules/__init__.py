"""Trainable heads shared by the methods (Combiner, ...).

Names are resolved lazily (PEP 562) so that importing `cir_cli.modules` does not import torch;
`from cir_cli.modules import Combiner` still works and imports torch at that point.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cir_cli.modules.cala_heads import Artemis, HingeCrossAttention, TwinAttentionCompositor
    from cir_cli.modules.combiner import Combiner, CombinerParts
    from cir_cli.modules.phi import Phi

__all__ = [
    "Artemis",
    "Combiner",
    "CombinerParts",
    "HingeCrossAttention",
    "Phi",
    "TwinAttentionCompositor",
]

# Public name -> submodule that defines it.
_LAZY = {
    "Artemis": "cala_heads",
    "Combiner": "combiner",
    "CombinerParts": "combiner",
    "HingeCrossAttention": "cala_heads",
    "Phi": "phi",
    "TwinAttentionCompositor": "cala_heads",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
