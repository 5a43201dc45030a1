"""The dual multi-modal encoder of candidate re-ranking (stage II), in plain torch.

Spec reranking.md section 5 (from CR's `nlvr_encoder.py` / `blip_stage2.py`). A BERT with two
text branches per layer, both cross-attending to the *candidate* image's ViT tokens V:

    branch 0 input x_0 = z_t (stage I's last hidden states for caption + reference)
    branch 1 input x_1 = LN(word + position embeddings)          (dropout after)
    per layer l, branch b:
        a_b = LN^sa_b(x_b + drop(dense^sa_b(SelfAttn_b(x_b))))
        c_b = dense^ca_b(CrossAttn_b(a_b, V))
        m   = (c_0 + c_1) / 2                    l <  merge_from_layer (6)
        m   = merge_layer([c_0; c_1])            l >= merge_from_layer (Linear 2D -> D)
        y_b = LN^ca_b(a_b + drop(m))
        x_b = LN^ffn(y_b + drop(FFN(y_b)))        FFN and its LN shared by the branches
    score = cls_head([x_0[0]; x_1[0]])[0]         Linear(2D, D), ReLU, Linear(D, 2): logit 0

The attribute names are CR's, so a published `BLIP_NLVR` state dict (`text_encoder.*`,
`cls_head.*`) loads strictly: `attention.self0/self1`, `attention.output.dense0/dense1`,
`attention.output.LayerNormA/B`, the same under `crossattention`, plus
`crossattention.output.merge_layer` in the merge layers and the shared
`intermediate.dense` / `output.dense` / `output.LayerNorm`. The text self-attention mask adds
-10000 at padded keys, as BLIP's BERT does; the cross-attention is unmasked (all 577 tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cir_cli.checkpoints import load_state_dict_strict

# BLIP's BERT masks padded keys by adding this (not -inf) to the attention logits.
MASK_VALUE = -10000.0


@dataclass(frozen=True)
class DualEncoderConfig:
    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 768
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Layers >= this merge the two cross-attention outputs with a learned Linear (CR: 6).
    merge_from_layer: int = 6
    pad_token_id: int = 0

    @classmethod
    def from_text_config(cls, config, merge_from_layer: int = 6) -> DualEncoderConfig:
        """From the stage-I (BLIP BERT) text config, as CR builds both from med_config."""
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            encoder_width=getattr(config, "encoder_hidden_size", config.hidden_size),
            max_position_embeddings=config.max_position_embeddings,
            layer_norm_eps=config.layer_norm_eps,
            hidden_dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            merge_from_layer=merge_from_layer,
            pad_token_id=config.pad_token_id or 0,
        )


class _Attention(nn.Module):
    """Multi-head attention projections (`query`, `key`, `value`), BERT layout."""

    def __init__(self, cfg: DualEncoderConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)


class _TwinOutput(nn.Module):
    """Per-branch output projections and LayerNorms, with CR's optional merge of the two."""

    def __init__(self, cfg: DualEncoderConfig, merge: str) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.LayerNormA = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.LayerNormB = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.dense0 = nn.Linear(d, d)
        self.dense1 = nn.Linear(d, d)
        self.merge = merge  # "none" (self-attention), "avg" or "linear" (cross-attention)
        if merge == "linear":
            self.merge_layer = nn.Linear(2 * d, d)

    def forward(
        self, h0: torch.Tensor, h1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = self.dense0(h0), self.dense1(h1)
        if self.merge == "none":
            return (
                self.LayerNormA(x0 + self.dropout(h0)),
                self.LayerNormB(x1 + self.dropout(h1)),
            )
        # "linear": no activation between the concatenation and the Linear (CR nlvr_encoder:286)
        m = (h0 + h1) / 2 if self.merge == "avg" else self.merge_layer(torch.cat([h0, h1], -1))
        m = self.dropout(m)
        return self.LayerNormA(x0 + m), self.LayerNormB(x1 + m)


class _TwinAttention(nn.Module):
    def __init__(self, cfg: DualEncoderConfig, cross: bool, layer: int) -> None:
        super().__init__()
        width = cfg.encoder_width if cross else cfg.hidden_size
        self.self0 = _Attention(cfg, width)
        self.self1 = _Attention(cfg, width)
        merge = "none" if not cross else ("linear" if layer >= cfg.merge_from_layer else "avg")
        self.output = _TwinOutput(cfg, merge)


class _Intermediate(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BLIP's med_config: exact (erf) GELU


class _Output(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class _Layer(nn.Module):
    def __init__(self, cfg: DualEncoderConfig, index: int) -> None:
        super().__init__()
        self.attention = _TwinAttention(cfg, cross=False, layer=index)
        self.crossattention = _TwinAttention(cfg, cross=True, layer=index)
        self.intermediate = _Intermediate(cfg)
        self.output = _Output(cfg)

    def forward(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sa, ca = self.attention, self.crossattention
        a0, a1 = sa.output(sa.self0(x0, x0, text_mask), sa.self1(x1, x1, text_mask), x0, x1)
        y0, y1 = ca.output(ca.self0(a0, image, None), ca.self1(a1, image, None), a0, a1)
        # One FFN (and LayerNorm) for both branches.
        return (
            self.output(self.intermediate(y0), y0),
            self.output(self.intermediate(y1), y1),
        )


class _Embeddings(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(cfg, i) for i in range(cfg.num_layers)])


class DualTextEncoder(nn.Module):
    """CR's `text_encoder` of BLIP_NLVR: embeddings (branch 1 only) + twin-branch layers."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        z_t: torch.Tensor,
        image: torch.Tensor,
    ) -> torch.Tensor:
        """(R, L) ids + mask, (R, L, D) stage-I states, (R, T, W) candidate tokens -> (R, 2D)
        the two branches' first-token states, concatenated."""
        if z_t.shape[:2] != input_ids.shape:
            raise ValueError(
                f"z_t {tuple(z_t.shape)} does not match the token ids {tuple(input_ids.shape)}"
            )
        x1 = self.embeddings(input_ids)
        x0 = z_t.to(x1.dtype)
        # (R, 1, 1, L) additive mask, broadcast over heads and query positions.
        mask = (1.0 - attention_mask[:, None, None, :].to(x1.dtype)) * MASK_VALUE
        image = image.to(x1.dtype)
        for layer in self.encoder.layer:
            x0, x1 = layer(x0, x1, mask, image)
        return torch.cat([x0[:, 0], x1[:, 0]], dim=-1)


class DualEncoderScorer(nn.Module):
    """The dual encoder + CR's 2-way `cls_head`; `forward` returns logit 0 (the score)."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.text_encoder = DualTextEncoder(cfg)
        d = cfg.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, 2))
        self._init_merge_layers()

    def _init_merge_layers(self) -> None:
        # BLIP's _init_weights for the layers model_base.pth has no weights for.
        for layer in self.text_encoder.encoder.layer:
            out = layer.crossattention.output
            if out.merge == "linear":
                nn.init.normal_(out.merge_layer.weight, mean=0.0, std=0.02)
                nn.init.zeros_(out.merge_layer.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        z_t: torch.Tensor,
        image: torch.Tensor,
    ) -> torch.Tensor:
        return self.cls_head(self.text_encoder(input_ids, attention_mask, z_t, image))[:, 0]


# --------------------------------------------------------------------------------------------
# Initialisation from a single-branch BLIP BERT (model_base.pth's text_encoder.*)

_TWIN_RULES = (
    # (single-branch infix, the two branch infixes); "attention." also matches the
    # "crossattention." keys, as CR's converter's substring tests do.
    ("attention.self.", ("attention.self0.", "attention.self1.")),
    ("attention.output.dense.", ("attention.output.dense0.", "attention.output.dense1.")),
    (
        "attention.output.LayerNorm.",
        ("attention.output.LayerNormA.", "attention.output.LayerNormB."),
    ),
)


def twin_state_from_bert(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP BERT `text_encoder` keys (no prefix) -> this encoder's keys (spec 5, CR
    blip_stage2.py:148-191): every self- and cross-attention q/k/v, output dense and output
    LayerNorm is copied to both branches; embeddings, intermediate and output are shared and
    copied once. Keys of neither kind (position_ids, pooler) are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids") or key.startswith("pooler."):
            continue
        for single, (b0, b1) in _TWIN_RULES:
            if single in key:
                out[key.replace(single, b0)] = value
                out[key.replace(single, b1)] = value
                break
        else:
            out[key] = value
    return out


def init_from_bert(scorer: DualEncoderScorer, state: Mapping[str, torch.Tensor], source: str):
    """Copy a single-branch BERT state into both branches; strict except merge layers and head.

    Every key of this encoder but `merge_layer` must come from `state` and every tensor in
    `state` must be used, otherwise one CirError names the first differences.
    """
    twin = twin_state_from_bert(state)
    keep = {k: v for k, v in scorer.text_encoder.state_dict().items() if ".merge_layer." in k}
    load_state_dict_strict(scorer.text_encoder, {**twin, **keep}, source)


def attention_flops(cfg: DualEncoderConfig, text_len: int, image_tokens: int) -> float:
    """Multiply-adds x 2 of one (query, candidate) pass: projections, attention, FFN, head."""
    d, w, f, n, t = (
        cfg.hidden_size,
        cfg.encoder_width,
        cfg.intermediate_size,
        text_len,
        image_tokens,
    )
    per_branch = (
        4 * n * d * d  # self-attention q, k, v, out
        + 2 * n * n * d  # self-attention scores and values
        + 2 * n * d * d  # cross q, out
        + 2 * t * w * d  # cross k, v of the candidate's tokens
        + 2 * n * t * d  # cross scores and values
        + 2 * n * d * f  # FFN
    )
    merge = 2 * n * d * d
    layers = (
        cfg.num_layers * (2 * per_branch) + max(cfg.num_layers - cfg.merge_from_layer, 0) * merge
    )
    return 2.0 * (layers + 2 * d * d + 2 * d)


__all__ = [
    "DualEncoderConfig",
    "DualEncoderScorer",
    "DualTextEncoder",
    "attention_flops",
    "init_from_bert",
    "twin_state_from_bert",
    "MASK_VALUE",
]
