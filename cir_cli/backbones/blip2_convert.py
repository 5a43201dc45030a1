"""Key maps from LAVIS / OpenAI / transformers BLIP-2 state dicts to `Blip2Backbone` names.

Spec sprc_cala.md 4.4 (LAVIS -> transformers table) and 2.5 (SPRC checkpoint layout). Our
backbone uses the transformers names wherever a transformers module is reused, so this map is the
spec's table plus three additions: `ln_vision.*` stays `ln_vision.*` (the spec's target
`vision_model.post_layernorm` has the wrong eps, so ln_vision is our own LayerNorm), `temp` is
kept (the transformers conversion drops it; SPRC starts from it) and the ViT-L tower (LAVIS
`clip_vit.py`, OpenAI / open_clip naming) maps onto transformers' CLIP vision modules.

Every source key either gets a slot, or is in an explicit list of keys dropped on purpose
(with the reason), or is an error: `convert_lavis_state` never drops silently (SPRC's own loader
used strict=False and hid missing keys). The functions here only rename and reshape tensors;
loading and the strict check live in blip2.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cir_cli.errors import CirError

# Keys with no slot in our modules, dropped on purpose (pattern -> why). Printed on every load.
DROPPED_LAVIS = {
    r"Qformer\.cls\..*": "BERT LM head (captioning only; SPRC/CaLa never use it)",
    r"Qformer\.bert\.embeddings\.position_ids": "buffer (arange), rebuilt by the model",
}


@dataclass
class Converted:
    """A state dict renamed to `Blip2Backbone` keys, plus what was set aside."""

    state: dict[str, Tensor]
    # source key -> reason, for keys intentionally left out (printed by the loader)
    dropped: dict[str, str] = field(default_factory=dict)
    # keys the caller asked to keep aside unchanged (e.g. SPRC's `prompt_tokens`)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def has_vision(self) -> bool:
        return any(k.startswith("vision_model.") for k in self.state)


def strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a DataParallel/DDP `module.` prefix (spec 2.5: a robust loader accepts both)."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


# --------------------------------------------------------------------------------------------
# Vision towers


def _weight_and_bias(pairs: dict[str, str]) -> dict[str, str]:
    return {f"{src}.{p}": f"{dst}.{p}" for src, dst in pairs.items() for p in ("weight", "bias")}


# LAVIS eva_vit.py keys (no `visual_encoder.` prefix) -> our EVA tower keys.
_EVA_FIXED = {
    "cls_token": "vision_model.embeddings.class_embedding",
    "pos_embed": "vision_model.embeddings.position_embedding",
    "patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
}
_EVA_BLOCK = {
    "attn.qkv.weight": "self_attn.qkv.weight",
    **_weight_and_bias(
        {
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "attn.proj": "self_attn.projection",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
    ),
}
# LAVIS clip_vit.py / OpenAI / open_clip visual keys -> our CLIP tower keys. The fused
# `in_proj_*` tensors are split by `convert_vision_state`, not renamed here.
_CLIP_FIXED = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
}
_CLIP_BLOCK = _weight_and_bias(
    {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
)


def _tower_key(key: str, fixed: dict, blocks: str, per_block: dict) -> str | None:
    """A vision-tower key -> ours via a table of fixed names and one of per-block names."""
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", key)
    sub = per_block.get(m.group(2)) if m else None
    return f"vision_model.encoder.layers.{m.group(1)}.{sub}" if sub else None


def _eva_key(key: str) -> str | None:
    return _tower_key(key, _EVA_FIXED, r"blocks", _EVA_BLOCK)


def _clip_key(key: str) -> str | None:
    return _tower_key(key, _CLIP_FIXED, r"transformer\.resblocks", _CLIP_BLOCK)


def _block_index(key: str) -> int | None:
    m = re.match(r"(?:blocks|transformer\.resblocks)\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def convert_vision_state(
    state: Mapping[str, Tensor], kind: str, num_layers: int, source: str
) -> Converted:
    """A vision-tower state dict (keys without `visual_encoder.`) -> our tower keys.

    `kind` is "eva" (LAVIS eva_vit.py: EVA-CLIP ViT-g) or "clip" (LAVIS clip_vit.py, which uses
    OpenAI CLIP's own names). Blocks at or beyond `num_layers` are dropped on purpose: BLIP-2
    keeps 39 of EVA-CLIP-g's 40 blocks and 21 of OpenAI ViT-L/14's 24 (LAVIS builds the tower
    shorter and loads the full file with strict=False). The CLIP head (`ln_post`, `proj`) is
    dropped likewise: BLIP-2 reads the token output before it.
    """
    out = Converted({})
    unknown = []
    qkv_bias: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        block = _block_index(key)
        if block is not None and block >= num_layers:
            out.dropped[key] = f"vision block {block} (BLIP-2 uses the first {num_layers})"
            continue
        if kind == "eva":
            m = re.fullmatch(r"blocks\.(\d+)\.attn\.([qv])_bias", key)
            if m:
                qkv_bias.setdefault(m.group(1), {})[m.group(2)] = value
                continue
            target = _eva_key(key)
        else:
            if key in ("ln_post.weight", "ln_post.bias", "proj"):
                out.dropped[key] = "CLIP head after the token output (BLIP-2 does not use it)"
                continue
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
            if m:
                i, kind_ = m.groups()
                prefix = f"vision_model.encoder.layers.{i}.self_attn"
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out.state[f"{prefix}.{name}_proj.{kind_}"] = part.clone()
                continue
            target = _clip_key(key)
        if target is None:
            unknown.append(key)
        else:
            out.state[target] = value
    for i, parts in qkv_bias.items():
        if set(parts) != {"q", "v"}:
            raise CirError(f"{source}: block {i} has only {sorted(parts)} of q_bias/v_bias")
        q, v = parts["q"], parts["v"]
        # EVA has no key bias; transformers stores the fused bias as [q, 0, v] (spec 4.4).
        bias = torch.cat([q, torch.zeros_like(q), v])
        out.state[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = bias
    if unknown:
        raise CirError(
            f"{source}: {len(unknown)} vision key(s) have no slot in the {kind} tower: "
            f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}"
        )
    return out


# --------------------------------------------------------------------------------------------
# Q-Former and heads


def _qformer_key(key: str) -> str | None:
    """LAVIS `Qformer.bert.*` / head key -> our key (spec 4.4), or None when it has no rule."""
    fixed = {
        "Qformer.bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "Qformer.bert.embeddings.position_embeddings.weight": (
            "embeddings.position_embeddings.weight"
        ),
        "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
        "Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
        "query_tokens": "query_tokens",
        "temp": "temp",
        "ln_vision.weight": "ln_vision.weight",
        "ln_vision.bias": "ln_vision.bias",
    }
    if key in fixed:
        return fixed[key]
    for src, dst in (("vision_proj.", "vision_projection."), ("text_proj.", "text_projection.")):
        if key.startswith(src):
            return dst + key.removeprefix(src)
    if key.startswith("itm_head."):
        return key
    m = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", key)
    if m is None:
        return None
    i, rest = m.groups()
    # `attention.self` / `crossattention.self` -> `.attention` (the official script replaces
    # "self" in these keys); every other name is the same under qformer.encoder.layer.{i}.
    rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
    return f"qformer.encoder.layer.{i}.{rest}"


def convert_lavis_state(
    state: Mapping[str, Tensor],
    vision_kind: str,
    vision_layers: int,
    source: str,
    extra_keys: tuple[str, ...] = (),
) -> Converted:
    """A LAVIS BLIP-2 state dict (`Blip2Qformer`, SPRC's `Blip2QformerCirAlignPrompt`, the
    `blip2_pretrained*.pth` files) -> `Blip2Backbone` keys.

    `extra_keys` (e.g. SPRC's `prompt_tokens`) are returned aside unchanged. Keys matching
    DROPPED_LAVIS are reported in `.dropped`; any other key without a rule is a CirError.
    Files saved by LAVIS's runner hold no `visual_encoder.*` keys (it deletes frozen params);
    the caller decides whether that is allowed.
    """
    state = strip_module_prefix(state)
    out = Converted({})
    vision = {}
    unknown = []
    for key, value in state.items():
        if key in extra_keys:
            out.extras[key] = value
            continue
        reason = next((why for pat, why in DROPPED_LAVIS.items() if re.fullmatch(pat, key)), None)
        if reason is not None:
            out.dropped[key] = reason
            continue
        if key.startswith("visual_encoder."):
            vision[key.removeprefix("visual_encoder.")] = value
            continue
        target = _qformer_key(key)
        if target is None:
            unknown.append(key)
        else:
            out.state[target] = value
    if unknown:
        raise CirError(
            f"{source}: {len(unknown)} key(s) have no slot in the BLIP-2 model: "
            f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}"
        )
    if vision:
        tower = convert_vision_state(vision, vision_kind, vision_layers, source)
        out.state.update(tower.state)
        out.dropped.update({f"visual_encoder.{k}": why for k, why in tower.dropped.items()})
    return out


def convert_hf_retrieval_state(state: Mapping[str, Tensor]) -> Converted:
    """transformers `Blip2ForImageTextRetrieval` keys -> ours: only ln_vision is renamed.

    transformers' `vision_model.post_layernorm` is ln_vision (with eps 1e-6 instead of LAVIS's
    1e-5; our own LayerNorm keeps 1e-5, spec 4.5 point 3). `temp` is absent in those files.
    """
    out = Converted({})
    for key, value in state.items():
        if key.startswith("vision_model.post_layernorm."):
            out.state["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif key.endswith("position_ids"):
            out.dropped[key] = "buffer (arange), rebuilt by the model"
        else:
            out.state[key] = value
    return out


def summarize_dropped(dropped: Mapping[str, str]) -> list[str]:
    """One line per reason: 'reason: N key(s), e.g. k1, k2' (what the loader prints)."""
    by_reason: dict[str, list[str]] = {}
    for key, why in dropped.items():
        by_reason.setdefault(why, []).append(key)
    lines = []
    for why, keys in by_reason.items():
        sample = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        lines.append(f"{len(keys)} key(s) {why}: {sample}")
    return lines
