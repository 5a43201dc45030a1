"""Phi: the textual-inversion MLP of SEARLE and LinCIR (spec lincir_searle_circo.md 1.3).

Phi maps a CLIP image (or, during LinCIR training, noisy text) feature of the joint space
(dim d) to one pseudo word embedding of the text tower's input space (width w):

    Linear(d, 4d) -> GELU -> Dropout(p) -> Linear(4d, 4d) -> GELU -> Dropout(p) -> Linear(4d, w)

The layers live in an `nn.Sequential` named `layers`, so the state-dict keys are
`layers.0.*`, `layers.3.*` and `layers.6.*`, exactly those of the published checkpoints
(`{'epoch': int, 'Phi': state_dict}`, e.g. LinCIR's `lincir_large.pt`, SEARLE's
`SEARLE_ViT-L14.pt`): they load strictly with `Phi.from_checkpoint(path)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli.checkpoints import (
    extract_state_dict,
    load_state_dict_strict,
    load_torch_checkpoint,
    save_seed_checkpoint,
)
from cir_cli.errors import CirError

# Checkpoint key of the published files (spec 1.3).
CHECKPOINT_KEY = "Phi"


class Phi(nn.Module):
    """d -> 4d -> 4d -> w MLP with GELU and dropout (spec 1.3)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        dropout: float = 0.5,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        # Not a parameter: the published files do not store it, the recipe does.
        self.l2_normalize = l2_normalize
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) image or text features (un-normalised, as LinCIR) -> (B, w) token embeddings."""
        if self.l2_normalize:
            features = F.normalize(features, dim=-1)
        return self.layers(features.to(self.layers[0].weight.dtype))

    # -- published layout ---------------------------------------------------------------------

    @staticmethod
    def dims_from_state(state: dict[str, torch.Tensor], source: str) -> tuple[int, int, int]:
        """(input, hidden, output) dims read off a `layers.{0,3,6}` state dict."""
        needed = [f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
        missing = [k for k in needed if k not in state]
        if missing:
            raise CirError(
                f"{source}: not a Phi state dict (missing {', '.join(missing)}; expected keys "
                "layers.0/3/6.weight|bias)"
            )
        hidden, input_dim = state["layers.0.weight"].shape
        output_dim = state["layers.6.weight"].shape[0]
        return int(input_dim), int(hidden), int(output_dim)

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        source: str = "state dict",
        dropout: float = 0.5,
        l2_normalize: bool = False,
    ) -> Phi:
        d, h, w = cls.dims_from_state(state, source)
        phi = cls(d, h, w, dropout=dropout, l2_normalize=l2_normalize)
        load_state_dict_strict(phi, state, source)
        return phi.eval()  # inference by default; .train() to fine-tune

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, dropout: float = 0.5, l2_normalize: bool = False
    ) -> Phi:
        """Load a published `{'epoch', 'Phi': state_dict}` .pt file (weights_only) strictly.

        Dims are read from the weights, so any backbone's Phi loads (L/14: 768 -> 3072 -> 768).
        A `module.` prefix (DDP) is stripped.
        """
        path = Path(path).expanduser()
        ckpt = load_torch_checkpoint(path)
        if CHECKPOINT_KEY not in ckpt:
            raise CirError(
                f"{path}: no '{CHECKPOINT_KEY}' entry (found {sorted(ckpt)[:8]}); expected a "
                "LinCIR/SEARLE checkpoint {'epoch': int, 'Phi': state_dict}"
            )
        state = extract_state_dict(ckpt, CHECKPOINT_KEY, path)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        return cls.from_state_dict(state, str(path), dropout=dropout, l2_normalize=l2_normalize)

    def save_checkpoint(self, path: str | Path, epoch: int = 0) -> Path:
        """Write the published layout `{'epoch': epoch, 'Phi': state_dict}` atomically."""
        path = Path(path)
        save_seed_checkpoint(path, CHECKPOINT_KEY, self.state_dict(), epoch=epoch)
        return path
