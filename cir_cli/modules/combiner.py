"""The CLIP4Cir / BLIP4CIR Combiner (spec 4.1), state-dict compatible with the published files.

Module names and the Sequential indices of `dynamic_scalar` (0 and 3) are part of the file
format: the seeds' checkpoints store exactly these keys, so they must not be renamed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cir_cli.checkpoints import load_state_dict_strict, read_state_dict
from cir_cli.errors import CirError

# State-dict keys of a Combiner, in the order the seeds' module registers them (spec 7).
COMBINER_KEYS: tuple[str, ...] = (
    "text_projection_layer.weight",
    "text_projection_layer.bias",
    "image_projection_layer.weight",
    "image_projection_layer.bias",
    "combiner_layer.weight",
    "combiner_layer.bias",
    "output_layer.weight",
    "output_layer.bias",
    "dynamic_scalar.0.weight",
    "dynamic_scalar.0.bias",
    "dynamic_scalar.3.weight",
    "dynamic_scalar.3.bias",
)


class CombinerParts(NamedTuple):
    """One side's (image or text) share of the Combiner computation, computed once per row.

    `hidden` and `gate` are that side's contribution to the pre-activations of `combiner_layer`
    and `dynamic_scalar.0` (biases excluded: `Combiner.combine_parts` adds them once). `raw` is
    the unnormalised input feature, needed by the λ-weighted residual.
    """

    hidden: Tensor
    gate: Tensor
    raw: Tensor

    def unsqueeze(self, dim: int) -> CombinerParts:
        """Insert a broadcast axis in every field, to pair two batches (see combine_parts)."""
        return CombinerParts(*(t.unsqueeze(dim) for t in self))


class Combiner(nn.Module):
    """Fuses an image feature and a text feature into one retrieval query (spec 4.1).

    out = output_layer(h) + λ·x_T + (1-λ)·x_I, with h and λ computed from the concatenation of the
    projected text and image features (text first). Inputs are the raw, unnormalised encoder
    outputs; `combine_features` returns the L2-normalised `out`.

    `logit_scale` multiplies the training logits. It is a plain float (the seeds use the int 100),
    not a parameter, and is not part of the state dict.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int,
        hidden_dim: int,
        dropout: float = 0.5,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("feature_dim", feature_dim),
            ("projection_dim", projection_dim),
            ("hidden_dim", hidden_dim),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.feature_dim = feature_dim
        self.projection_dim = projection_dim
        self.hidden_dim = hidden_dim
        self.logit_scale = float(logit_scale)

        # Registration order fixes the state-dict order; it matches the seeds' files.
        self.text_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.dropout_text = nn.Dropout(dropout)
        self.dropout_image = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dropout_hidden = nn.Dropout(dropout)
        # Indices 0 and 3 carry weights; the seeds' files address them as dynamic_scalar.0/.3.
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )

    # ---------------------------------------------------------------------------------------
    # The seeds' computation
    # ---------------------------------------------------------------------------------------

    def _fuse(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Unnormalised combined feature, computed literally as the seeds do (concat path)."""
        text_proj = self.dropout_text(F.relu(self.text_projection_layer(text_features)))
        image_proj = self.dropout_image(F.relu(self.image_projection_layer(image_features)))
        joint = torch.cat((text_proj, image_proj), dim=-1)  # text first: the weights expect it
        hidden = self.dropout_hidden(F.relu(self.combiner_layer(joint)))
        lam = self.dynamic_scalar(joint)
        return self.output_layer(hidden) + lam * text_features + (1 - lam) * image_features

    def combine_features(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """L2-normalised combined query feature; argument order (image, text) as in the seeds."""
        return F.normalize(self._fuse(image_features, text_features), dim=-1)

    def forward(
        self, image_features: Tensor, text_features: Tensor, target_features: Tensor
    ) -> Tensor:
        """Training logits [B, N]: logit_scale · combined(image_i, text_i) · normalize(target_j)."""
        predicted = self.combine_features(image_features, text_features)
        targets = F.normalize(target_features, dim=-1)
        return self.logit_scale * predicted @ targets.transpose(-2, -1)

    # ---------------------------------------------------------------------------------------
    # Factored computation, for combining every image with every text of a batch
    # ---------------------------------------------------------------------------------------
    #
    # combiner_layer and dynamic_scalar.0 act on concat(a_T, a_I), so their pre-activation splits
    # into W[:, :P]·a_T + W[:, P:]·a_I + b. Each half can be computed once per row and the B×B
    # pairs formed by broadcasting an addition, instead of running two 2P→H matmuls on B² rows as
    # BLIP4CIR's reversed loss does (spec 4.3). In eval mode this equals combine_features up to
    # float rounding. In train mode one difference remains: the dropout on a_T / a_I is drawn once
    # per row and shared by all pairs of that row (the seeds draw it per pair); the dropouts after
    # the hidden ReLUs are still drawn per pair.

    def project_text(self, text_features: Tensor) -> CombinerParts:
        """The text side's share of the computation, for `combine_parts`."""
        p = self.projection_dim
        a_t = self.dropout_text(F.relu(self.text_projection_layer(text_features)))
        return CombinerParts(
            hidden=F.linear(a_t, self.combiner_layer.weight[:, :p]),
            gate=F.linear(a_t, self.dynamic_scalar[0].weight[:, :p]),
            raw=text_features,
        )

    def project_image(self, image_features: Tensor) -> CombinerParts:
        """The image side's share of the computation, for `combine_parts`."""
        p = self.projection_dim
        a_i = self.dropout_image(F.relu(self.image_projection_layer(image_features)))
        return CombinerParts(
            hidden=F.linear(a_i, self.combiner_layer.weight[:, p:]),
            gate=F.linear(a_i, self.dynamic_scalar[0].weight[:, p:]),
            raw=image_features,
        )

    def combine_parts(self, image: CombinerParts, text: CombinerParts) -> Tensor:
        """L2-normalised combined feature from precomputed parts; leading axes broadcast.

        Same-row pairing: `combine_parts(project_image(x_I), project_text(x_T))`.
        All pairs: `combine_parts(img.unsqueeze(0), txt.unsqueeze(1))` gives [B_text, B_image, d]
        with element [i, j] = combine_features(x_I[j], x_T[i]).
        """
        hidden = F.relu(image.hidden + text.hidden + self.combiner_layer.bias)
        hidden = self.dropout_hidden(hidden)
        gate_pre = image.gate + text.gate + self.dynamic_scalar[0].bias
        lam = self.dynamic_scalar[1:](gate_pre)  # ReLU, Dropout, Linear(H→1), Sigmoid
        out = self.output_layer(hidden) + lam * text.raw + (1 - lam) * image.raw
        return F.normalize(out, dim=-1)

    # ---------------------------------------------------------------------------------------
    # Loading
    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device = "cpu",
        dropout: float = 0.5,
        logit_scale: float = 100.0,
    ) -> Combiner:
        """Load a seed `.pt` file (`ckpt['Combiner']`) or a safetensors file from `save_weights`.

        Dimensions are inferred from the weight shapes. The module is returned in eval mode, since
        loading published weights is mostly for evaluation; call `.train()` to fine-tune further.
        """
        state_dict, _ = read_state_dict(path, "Combiner")
        feature_dim, projection_dim, hidden_dim = infer_combiner_dims(state_dict, str(path))
        model = cls(
            feature_dim, projection_dim, hidden_dim, dropout=dropout, logit_scale=logit_scale
        )
        load_state_dict_strict(model, state_dict, source=str(path))
        return model.to(map_location).eval()


def _vote(candidates: Iterable[int | None]) -> int | None:
    # The most common value wins, so one renamed or mis-shaped tensor does not mislead the
    # inference; the strict load then names that tensor in its error.
    counts = Counter(c for c in candidates if c is not None and c > 0)
    return counts.most_common(1)[0][0] if counts else None


def infer_combiner_dims(state_dict: Mapping[str, Tensor], source: str) -> tuple[int, int, int]:
    """(feature_dim d, projection_dim P, hidden_dim H) from a Combiner state dict's shapes."""

    def dim(key: str, axis: int, ndim: int, halve: bool = False) -> int | None:
        t = state_dict.get(key)
        if t is None or t.dim() != ndim:
            return None
        n = int(t.shape[axis])
        if halve:
            return n // 2 if n % 2 == 0 else None
        return n

    d = _vote(
        [
            dim("text_projection_layer.weight", 1, 2),
            dim("image_projection_layer.weight", 1, 2),
            dim("output_layer.weight", 0, 2),
            dim("output_layer.bias", 0, 1),
        ]
    )
    p = _vote(
        [
            dim("text_projection_layer.weight", 0, 2),
            dim("text_projection_layer.bias", 0, 1),
            dim("image_projection_layer.weight", 0, 2),
            dim("image_projection_layer.bias", 0, 1),
            dim("combiner_layer.weight", 1, 2, halve=True),
            dim("dynamic_scalar.0.weight", 1, 2, halve=True),
        ]
    )
    h = _vote(
        [
            dim("combiner_layer.weight", 0, 2),
            dim("combiner_layer.bias", 0, 1),
            dim("dynamic_scalar.0.weight", 0, 2),
            dim("dynamic_scalar.0.bias", 0, 1),
            dim("output_layer.weight", 1, 2),
            dim("dynamic_scalar.3.weight", 1, 2),
        ]
    )
    if d is None or p is None or h is None:
        missing = [k for k in COMBINER_KEYS if k not in state_dict]
        found = ", ".join(list(state_dict)[:10]) or "none"
        raise CirError(
            f"{source}: not a Combiner state dict (cannot infer its dimensions); "
            f"missing: {', '.join(missing) or 'none'}; found: {found}"
        )
    return d, p, h
