"""BLIP-2 backbone on transformers: key maps (LAVIS, SPRC, transformers), strict loading, paths.

The LAVIS-layout state dicts here are written from the spec's key listing (sprc_cala.md 2.5),
independently of the converter; tests/backbones/test_lavis_blip2.py checks that listing
against LAVIS's own `Blip2Qformer.state_dict()`.
"""

from __future__ import annotations

import pytest
import torch

from cir_cli.backbones.blip2 import ARCHS, Blip2Backbone, load_bert_tokenizer
from cir_cli.backbones.blip2_convert import convert_lavis_state
from cir_cli.errors import CirError


def lavis_layout(
    arch: str,
    vocab_size: int,
    device: str = "cpu",
    prompt_tokens: bool = True,
    vision: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of LAVIS `Blip2Qformer` / SPRC's
    `Blip2QformerCirAlignPrompt` (spec 2.5) for `arch`'s dimensions, random values."""
    spec = ARCHS[arch]
    v, q = spec["vision_config"], spec["qformer"]
    w, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    tokens = (v["image_size"] // p) ** 2 + 1
    d, f, pos = q["hidden_size"], q["intermediate_size"], q["max_position_embeddings"]
    nq, e = spec["num_query_tokens"], spec["embed_dim"]
    shapes: dict[str, tuple[int, ...]] = {}
    if vision and spec["vision"] == "eva":
        shapes |= {
            "visual_encoder.cls_token": (1, 1, w),
            "visual_encoder.pos_embed": (1, tokens, w),
            "visual_encoder.patch_embed.proj.weight": (w, 3, p, p),
            "visual_encoder.patch_embed.proj.bias": (w,),
        }
        for i in range(v["num_hidden_layers"]):
            b = f"visual_encoder.blocks.{i}."
            shapes |= {
                b + "norm1.weight": (w,),
                b + "norm1.bias": (w,),
                b + "attn.q_bias": (w,),
                b + "attn.v_bias": (w,),
                b + "attn.qkv.weight": (3 * w, w),
                b + "attn.proj.weight": (w, w),
                b + "attn.proj.bias": (w,),
                b + "norm2.weight": (w,),
                b + "norm2.bias": (w,),
                b + "mlp.fc1.weight": (inter, w),
                b + "mlp.fc1.bias": (inter,),
                b + "mlp.fc2.weight": (w, inter),
                b + "mlp.fc2.bias": (w,),
            }
    elif vision:
        shapes |= {
            "visual_encoder.class_embedding": (w,),
            "visual_encoder.positional_embedding": (tokens, w),
            "visual_encoder.conv1.weight": (w, 3, p, p),
            "visual_encoder.ln_pre.weight": (w,),
            "visual_encoder.ln_pre.bias": (w,),
        }
        for i in range(v["num_hidden_layers"]):
            b = f"visual_encoder.transformer.resblocks.{i}."
            shapes |= {
                b + "attn.in_proj_weight": (3 * w, w),
                b + "attn.in_proj_bias": (3 * w,),
                b + "attn.out_proj.weight": (w, w),
                b + "attn.out_proj.bias": (w,),
                b + "ln_1.weight": (w,),
                b + "ln_1.bias": (w,),
                b + "mlp.c_fc.weight": (inter, w),
                b + "mlp.c_fc.bias": (inter,),
                b + "mlp.c_proj.weight": (w, inter),
                b + "mlp.c_proj.bias": (w,),
                b + "ln_2.weight": (w,),
                b + "ln_2.bias": (w,),
            }
    shapes |= {
        "ln_vision.weight": (w,),
        "ln_vision.bias": (w,),
        "query_tokens": (1, nq, d),
        "Qformer.bert.embeddings.word_embeddings.weight": (vocab_size, d),
        "Qformer.bert.embeddings.position_embeddings.weight": (pos, d),
        "Qformer.bert.embeddings.LayerNorm.weight": (d,),
        "Qformer.bert.embeddings.LayerNorm.bias": (d,),
    }
    for i in range(q["num_hidden_layers"]):
        b = f"Qformer.bert.encoder.layer.{i}."
        parts = ["attention"] + (
            ["crossattention"] if i % q["cross_attention_frequency"] == 0 else []
        )
        for part in parts:
            kv = w if part == "crossattention" else d
            for name, width in (("query", d), ("key", kv), ("value", kv)):
                shapes[f"{b}{part}.self.{name}.weight"] = (d, width)
                shapes[f"{b}{part}.self.{name}.bias"] = (d,)
            shapes |= {
                f"{b}{part}.output.dense.weight": (d, d),
                f"{b}{part}.output.dense.bias": (d,),
                f"{b}{part}.output.LayerNorm.weight": (d,),
                f"{b}{part}.output.LayerNorm.bias": (d,),
            }
        for ffn in ("", "_query"):
            shapes |= {
                f"{b}intermediate{ffn}.dense.weight": (f, d),
                f"{b}intermediate{ffn}.dense.bias": (f,),
                f"{b}output{ffn}.dense.weight": (d, f),
                f"{b}output{ffn}.dense.bias": (d,),
                f"{b}output{ffn}.LayerNorm.weight": (d,),
                f"{b}output{ffn}.LayerNorm.bias": (d,),
            }
    shapes |= {
        # LAVIS's resize_token_embeddings leaves the LM head's bias at BERT's 30522 rows.
        "Qformer.cls.predictions.bias": (vocab_size - 1,),
        "Qformer.cls.predictions.transform.dense.weight": (d, d),
        "Qformer.cls.predictions.transform.dense.bias": (d,),
        "Qformer.cls.predictions.transform.LayerNorm.weight": (d,),
        "Qformer.cls.predictions.transform.LayerNorm.bias": (d,),
        "Qformer.cls.predictions.decoder.weight": (vocab_size, d),
        "Qformer.cls.predictions.decoder.bias": (vocab_size,),
        "vision_proj.weight": (e, d),
        "vision_proj.bias": (e,),
        "text_proj.weight": (e, d),
        "text_proj.bias": (e,),
        "itm_head.weight": (2, d),
        "itm_head.bias": (2,),
        "temp": (),
    }
    if prompt_tokens:
        shapes["prompt_tokens"] = (1, nq, d)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if device == "meta":
            state[key] = torch.empty(shape, device="meta")
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(pos, device=device)[None]
    if device != "meta":
        state["temp"] = torch.tensor(0.0531)
    return state


class _FakeTokenizer:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_bert_tokenizer("cir-tiny")


@pytest.mark.parametrize("arch", ["blip2-vit-g", "blip2-vit-l"])
def test_full_size_lavis_layout_maps_onto_every_parameter(arch: str) -> None:
    """Real dimensions (ViT-g 39 x 1408, ViT-L 21 x 1024, BERT-base Q-Former) on the meta
    device: every mapped key has a slot of the same shape and every slot is filled."""
    with torch.device("meta"):
        model = Blip2Backbone(arch, _FakeTokenizer(30523))
    layout = lavis_layout(arch, 30523, device="meta", prompt_tokens=True)
    spec = ARCHS[arch]
    converted = convert_lavis_state(
        layout,
        spec["vision"],
        spec["vision_config"]["num_hidden_layers"],
        "layout",
        ("prompt_tokens",),
    )
    own = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")
    }
    got = {k: tuple(v.shape) for k, v in converted.state.items()}
    assert set(got) == set(own)
    assert got == own
    assert set(converted.extras) == {"prompt_tokens"}
    assert set(converted.dropped) == {
        k for k in layout if k.startswith("Qformer.cls.") or k.endswith("position_ids")
    }
    params = sum(v.numel() for v in model.state_dict().values())
    # ViT-g BLIP-2 first stage: ~1.17 B parameters (environment notes), ViT-L ~0.4 B.
    assert (params > 1.1e9) if arch == "blip2-vit-g" else (3e8 < params < 5e8)


def test_eva_qkv_bias_is_q_zero_v() -> None:
    layout = lavis_layout("blip2-tiny", 200, prompt_tokens=False)
    converted = convert_lavis_state(layout, "eva", 2, "x")
    bias = converted.state["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    w = layout["visual_encoder.blocks.1.attn.q_bias"].shape[0]
    assert torch.equal(bias[:w], layout["visual_encoder.blocks.1.attn.q_bias"])
    assert torch.count_nonzero(bias[w : 2 * w]) == 0
    assert torch.equal(bias[2 * w :], layout["visual_encoder.blocks.1.attn.v_bias"])


def test_unknown_and_missing_keys_are_errors(tiny_tokenizer) -> None:
    model = Blip2Backbone("blip2-tiny", tiny_tokenizer)
    layout = lavis_layout("blip2-tiny", len(tiny_tokenizer), prompt_tokens=False)
    with pytest.raises(CirError, match="no slot.*Qformer.bert.pooler.dense.weight"):
        model.convert_lavis({**layout, "Qformer.bert.pooler.dense.weight": torch.zeros(1)}, "f")
    del layout["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    converted = model.convert_lavis(layout, "f")
    with pytest.raises(CirError, match="missing 1 key.*layer.1.output_query.dense.bias"):
        model.load_converted(converted, "f", allow_missing_vision=True)


def test_lavis_pretrain_file_without_vit_needs_vision_weights(tmp_path, tiny_tokenizer) -> None:
    """blip2_pretrained.pth holds no ViT (LAVIS drops frozen params): Q-Former from it, ViT from
    vision_pretrained (an eva_vit_g.pth-style file with one block more than BLIP-2 keeps)."""
    from cir_cli.config import BackboneConfig

    full = lavis_layout("blip2-tiny", len(tiny_tokenizer), prompt_tokens=False, seed=3)
    pretrain = {k: v for k, v in full.items() if not k.startswith("visual_encoder.")}
    torch.save({"model": pretrain}, tmp_path / "blip2_pretrained.pth")
    vit = {k.removeprefix("visual_encoder."): v for k, v in full.items() if "visual_encoder" in k}
    extra = {k.replace("blocks.1.", "blocks.2."): v for k, v in vit.items() if "blocks.1." in k}
    torch.save({**vit, **extra}, tmp_path / "eva_vit_g.pth")

    config = BackboneConfig(
        name="blip2", arch="blip2-tiny", pretrained=str(tmp_path / "blip2_pretrained.pth")
    )
    with pytest.raises(CirError, match="vision_pretrained"):
        Blip2Backbone.from_config(config)
    config.vision_pretrained = str(tmp_path / "eva_vit_g.pth")
    model = Blip2Backbone.from_config(config)
    sd = model.state_dict()
    assert torch.equal(
        sd["qformer.layernorm.weight"], full["Qformer.bert.embeddings.LayerNorm.weight"]
    )
    assert torch.equal(
        sd["vision_model.embeddings.position_embedding"], full["visual_encoder.pos_embed"]
    )
    assert float(sd["temp"]) == pytest.approx(0.0531)


def test_transformers_retrieval_checkpoint_loads_and_matches(tmp_path, tiny_tokenizer) -> None:
    """A `Blip2ForImageTextRetrieval` saved with save_pretrained (the layout of
    Salesforce/blip2-itm-vit-g) loads strictly; our paths reproduce its ITC / ITM outputs."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    spec = ARCHS["blip2-tiny"]
    q = dict(spec["qformer"], vocab_size=len(tiny_tokenizer))
    vision = dict(spec["vision_config"], layer_norm_eps=1e-5)  # so post_layernorm == ln_vision
    config = Blip2Config(
        vision_config=vision,
        qformer_config=dict(
            q, use_qformer_text_input=True, encoder_hidden_size=vision["hidden_size"]
        ),
        num_query_tokens=spec["num_query_tokens"],
        image_text_hidden_size=spec["embed_dim"],
    )
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "itm")

    ours = Blip2Backbone("blip2-tiny", tiny_tokenizer)
    # The tiny arch's tower LayerNorms use eps 1e-6; align them with the saved config.
    for module in ours.vision_model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    ours.load_pretrained(str(tmp_path / "itm"))
    ours.eval()
    pixels = torch.randn(2, 3, 64, 64)
    ids, mask = ours.tokenize(["make it red", "a small blue star in the top left corner"], 16)
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = hf(
            pixel_values=pixels,
            input_ids=ids,
            attention_mask=mask,
            use_image_text_matching_head=True,
        )
        image = ours.image_embeds(ours.vision_tokens(pixels))
        img_feats = ours.project_image(ours.query_outputs(image))
        txt_feats = ours.project_text(ours.text_outputs(ids, mask)[:, 0])
        mm = ours.multimodal_outputs(image, ids, mask)[:, : ours.num_query_tokens]
        itm_ours = ours.itm_head(mm).mean(1)
    torch.testing.assert_close(img_feats, itc.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt_feats, itc.text_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(itm_ours, itm.logits_per_image, atol=1e-5, rtol=1e-4)
    assert float(ours.temp.detach()) == pytest.approx(0.07)  # not in transformers files: kept


def test_spliced_prefix_path_adds_positions_to_every_token(tiny_tokenizer) -> None:
    """SPRC's `no_img` embeddings (spec 1.2): [CLS, prefix, text[1:]] + positions 0..P+L-1."""
    model = Blip2Backbone("blip2-tiny", tiny_tokenizer).eval()
    ids, mask = model.tokenize(["make it red", "move it one step left"], 12)
    prefix = torch.randn(1, model.num_query_tokens, model.hidden_size)
    emb = model.embeddings
    words = emb.word_embeddings(ids)
    seq = torch.cat([words[:, :1], prefix.expand(2, -1, -1), words[:, 1:]], dim=1)
    seq = seq + emb.position_embeddings.weight[: seq.shape[1]]
    full_mask = torch.cat([torch.ones(2, model.num_query_tokens, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        expected = model.qformer(query_embeds=seq, query_length=0, attention_mask=full_mask)[0]
        got = model.prefix_text_outputs(prefix, ids, mask, spliced=True)
        # Unspliced (pass 2): the prefix gets no position embedding and leads the sequence.
        plain = model.prefix_text_outputs(prefix, ids, mask)
        text_pos = words + emb.position_embeddings.weight[: ids.shape[1]]
        seq2 = torch.cat([prefix.expand(2, -1, -1), text_pos], 1)
        expected2 = model.qformer(query_embeds=seq2, query_length=0, attention_mask=full_mask)[0]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(plain, expected2)


def test_vision_fingerprint_is_memoised_and_follows_weight_changes(tiny_tokenizer) -> None:
    model = Blip2Backbone("blip2-tiny", tiny_tokenizer)
    first = model.vision_fingerprint()
    assert model.vision_fingerprint() == first
    model.train()
    assert not model.vision_model.training  # the ViT stays in eval for good
    with torch.no_grad():
        model.ln_vision.weight.add_(1.0)  # trainable parts do not change the cache key
    assert model.vision_fingerprint() == first
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.add_(1.0)
    assert model.vision_fingerprint() != first
