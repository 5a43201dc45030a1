"""CaLa's two training-only heads (spec sprc_cala.md 3.3, 3.4) and ARTEMIS (3.2).

- `TwinAttentionCompositor` (TBIA / TAC): one-head attention applied 4 times with shared
  weights in each direction (reference tokens as queries over the target, and the mirror);
  the visual gap is the average of the two token-0 outputs, g = (O1[:, 0] + O2[:, 0]) / 2.
- `HingeCrossAttention` (CTR / HCA): the text is the hinge between reference and target tokens,
  P = softmax((R Wq)(C Wk)^T (C Wk)(T Wg)^T / d), pseudo-target p = (P (T Wv))[:, 0].
- `Artemis`: EM + IS scores (spec 3.2), with a factored scorer that ranks a whole gallery by
  four matrix products instead of a (Q, N, d) broadcast.

Parameter names are those of CaLa's modules (`reference_as_query_attention`, `query_ref1`,
`Attention_EM.attention.0`, ...), so CaLa's saved `tuned_tac*.pt`, `tuned_hca*.pt` and
`tuned_artemis*.pt` files load strictly; their unused parameters (HCA's second set, ARTEMIS's
`temperature`) are dropped on import with a printed note (methods/cala.py).

For CLIP the heads take the RN50x4 layer-4 map as (B, H*W, C) tokens (`spatial_tokens`) and
reduce C -> d with ReLU(Linear) (`fc` in TAC, `fc1` in HCA), as CaLa does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def spatial_tokens(feature_map: torch.Tensor, compat: bool = False) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens, token h*W + w holding map[:, :, h, w].

    `compat=True` reproduces CaLa's `.view(B, H*W, C)` of the contiguous (B, C, H, W) tensor,
    which reinterprets memory without a permute and mixes channels with positions (spec 3.3).
    """
    b, c, h, w = feature_map.shape
    if compat:
        return feature_map.contiguous().view(b, h * w, c)
    return feature_map.flatten(2).transpose(1, 2)


class TwinAttentionCompositor(nn.Module):
    """TBIA's twin-attention compositor: (reference tokens, target tokens) -> visual gap g.

    `map_channels` (CLIP): inputs are C-wide spatial tokens, reduced by ReLU(fc) to `dim`, and a
    N(0, 1) token drawn on every forward (CaLa's un-learned "cls"; the same draw for reference
    and target; seeded through torch's RNG) is prepended so that token 0 exists.
    """

    def __init__(self, dim: int, map_channels: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(map_channels, dim) if map_channels else None
        self.reference_as_query_attention = nn.MultiheadAttention(
            dim, num_heads=1, dropout=0.0, batch_first=True
        )
        self.target_as_query_attention = nn.MultiheadAttention(
            dim, num_heads=1, dropout=0.0, batch_first=True
        )

    @staticmethod
    def _four_times(attention: nn.MultiheadAttention, query, first_keys) -> torch.Tensor:
        # need_weights=False: only the outputs are used (and the fused kernel may run).
        out = attention(query, first_keys, first_keys, need_weights=False)[0]
        for _ in range(3):
            out = attention(query, out, out, need_weights=False)[0]
        return out

    def forward(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) or (B, N, C) tokens of both images -> g, (B, dim)."""
        if self.fc is not None:
            reference = F.relu(self.fc(reference))
            target = F.relu(self.fc(target))
            cls = torch.randn(
                reference.shape[0], 1, self.dim, device=reference.device, dtype=reference.dtype
            )
            reference = torch.cat([cls, reference], dim=1)
            target = torch.cat([cls, target], dim=1)
        out1 = self._four_times(self.reference_as_query_attention, reference, target)
        out2 = self._four_times(self.target_as_query_attention, target, reference)
        return (out1[:, 0] + out2[:, 0]) / 2


class HingeCrossAttention(nn.Module):
    """CTR's hinge-based cross attention: (R, C, T) -> pseudo-target p, (B, d).

    A = (R Wq)(C Wk)^T / sqrt(d), H = (C Wk)(T Wg)^T / sqrt(d) (one text key map, shared),
    P = Dropout(softmax(A H)), p = (P (T Wv))[:, 0]. `caption_mask` (B, L) removes padded text
    positions from the hinge sum A H = sum_l A[:, :, l] H[:, l, :] (CaLa applies no mask, so
    its pad tokens take part; pass None for that).
    """

    def __init__(self, dim: int, map_channels: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.query_ref1 = nn.Linear(dim, dim)
        self.key_text1 = nn.Linear(dim, dim)
        self.key_tar1 = nn.Linear(dim, dim)
        self.value1 = nn.Linear(dim, dim)
        self.dropout1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(map_channels, dim) if map_channels else None

    def forward(
        self,
        reference: torch.Tensor,
        caption: torch.Tensor,
        target: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.fc1 is not None:
            reference = F.relu(self.fc1(reference))
            target = F.relu(self.fc1(target))
        scale = 1.0 / math.sqrt(reference.shape[-1])
        keys = self.key_text1(caption)  # (B, L, d)
        ref_text = self.query_ref1(reference) @ keys.transpose(1, 2) * scale  # (B, Nr, L)
        text_tgt = keys @ self.key_tar1(target).transpose(1, 2) * scale  # (B, L, Nt)
        if caption_mask is not None:
            ref_text = ref_text * caption_mask[:, None, :].to(ref_text.dtype)
        weights = self.dropout1(torch.softmax(ref_text @ text_tgt, dim=-1))  # (B, Nr, Nt)
        return (weights @ self.value1(target))[:, 0]


class AttentionMechanism(nn.Module):
    """ARTEMIS's attention: Linear -> ReLU -> Linear -> softmax over the feature axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Softmax(dim=-1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


def _at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


class _L2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class Artemis(nn.Module):
    """ARTEMIS scores (spec 3.2): EM(m, t) + IS(r, m, t), in [-2, 2].

    EM = <Tr(m), norm(A_EM(m) * t)>, IS = <norm(A_IS(m) * r), norm(A_IS(m) * t)>. Both are
    linear in t up to the norm of a * t, and ||a * t||^2 = (a^2) . (t^2), so a query becomes
    four d-vectors (`query_features`) and a (Q, N) score block is four matrix products
    (`score`). CaLa's unused `temperature` parameter is not kept.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.Transform_m = nn.Sequential(nn.Linear(dim, dim), _L2())
        self.Attention_EM = AttentionMechanism(dim)
        self.Attention_IS = AttentionMechanism(dim)

    def query_features(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, d) raw reference and text features -> (B, 4, d) factored query."""
        with torch.autocast(device_type=reference.device.type, enabled=False):
            reference, text = _at_least_fp32(reference, text)
            a_em = self.Attention_EM(text)
            a_is = self.Attention_IS(text)
            tr_m = self.Transform_m(text)
            ref_is = F.normalize(a_is * reference, dim=-1)
            return torch.stack([tr_m * a_em, a_em.square(), ref_is * a_is, a_is.square()], 1)

    @staticmethod
    def score(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(Q, 4, d) factored queries x (N, d) targets -> (Q, N) EM + IS scores (fp32)."""
        with torch.autocast(device_type=queries.device.type, enabled=False):
            queries, targets = _at_least_fp32(queries, targets)
            t2 = targets.square().T
            em = (queries[:, 0] @ targets.T) / (queries[:, 1] @ t2).sqrt().clamp_min(1e-12)
            is_ = (queries[:, 2] @ targets.T) / (queries[:, 3] @ t2).sqrt().clamp_min(1e-12)
            return em + is_

    def forward(
        self, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Scores of every (query, target) pair, (B, N): CaLa's broadcast scorer."""
        return self.score(self.query_features(reference, text), target)
