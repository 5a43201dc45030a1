"""BLIP towers: the model_base.pth converter, published layouts, transformers folders.

Spec clip4cir_blip4cir.md 3.1 and 7. The reference modules are independent implementations of
the original layouts: timm's VisionTransformer has BLIP's ViT key names (BLIP's vit.py is a copy
of timm's), and transformers' BertModel with zeroed token-type embeddings is BLIP's text encoder
(spec 3.1). A tiny BLIP built from them is saved as `{'model': state_dict}` like model_base.pth,
loaded through our converter, and must give the same features.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from cir_cli.backbones import blip
from cir_cli.backbones.blip import ARCHS, BlipBackbone, convert_blip_state, interpolate_pos_embed
from cir_cli.checkpoints import sha1_file
from cir_cli.config import BackboneConfig
from cir_cli.errors import CirError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

WIDTH, DEPTH, HEADS, EMBED = 32, 2, 2, 16


@pytest.fixture(scope="module", autouse=True)
def tiny16_arch():
    """A patch-16 BLIP like blip-base (224 px pretraining grid 14x14), only narrow and shallow."""
    base = ARCHS["cir-tiny-blip"]
    vision = {
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": HEADS,
        "image_size": 384,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
    }
    text = {**base.text, "hidden_size": WIDTH, "encoder_hidden_size": WIDTH}
    text["intermediate_size"] = 4 * WIDTH
    ARCHS["test-blip16"] = dataclasses.replace(base, vision=vision, text=text, embed_dim=EMBED)
    yield
    del ARCHS["test-blip16"]


def _reference_towers(vocab_size: int, seed: int = 0):
    """timm ViT (224 px, BLIP's vit.py names) + BertModel (BLIP's med.py names), random."""
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    for p in vit.parameters():  # timm zero-inits some tensors; every weight must matter here
        nn.init.normal_(p, std=0.2)
    bert_config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=ARCHS["test-blip16"].text["max_position_embeddings"],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    bert = transformers.BertModel(bert_config, add_pooling_layer=False).eval()
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP has no token types
    return vit, bert, nn.Linear(WIDTH, EMBED), nn.Linear(WIDTH, EMBED)


def _model_base_state(vit, bert, vision_proj, text_proj, cross: dict) -> dict:
    state = {f"visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"vision_proj.{k}": v for k, v in vision_proj.state_dict().items()}
    for k, v in bert.state_dict().items():
        if "token_type" not in k:
            state[f"text_encoder.{k}"] = v
    state["text_encoder.embeddings.position_ids"] = torch.arange(
        bert.config.max_position_embeddings
    )[None]
    state |= cross
    state |= {f"text_proj.{k}": v for k, v in text_proj.state_dict().items()}
    # Pretraining-only modules that the towers must ignore (spec 3.1).
    state["visual_encoder_m.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    state["text_decoder.cls.predictions.bias"] = torch.zeros(3)
    state["image_queue"] = torch.zeros(EMBED, 4)
    state["temp"] = torch.tensor(0.07)
    return state


def _cross_attention_keys(vocab_size: int) -> dict:
    # BLIP's text encoder carries (unused) cross-attention weights; take names and shapes from
    # our module so the file has exactly the keys model_base.pth has.
    probe = BlipBackbone.build("test-blip16", image_size=224)
    return {
        f"text_encoder.{k}": torch.randn_like(v)
        for k, v in probe.text_encoder.state_dict().items()
        if ".crossattention." in k
    }


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("blip")
    vocab = len(ARCHS["test-blip16"].builtin_vocab) + 2
    vit, bert, vproj, tproj = _reference_towers(vocab)
    state = _model_base_state(vit, bert, vproj, tproj, _cross_attention_keys(vocab))
    path = tmp / "model_base.pth"
    torch.save({"model": state}, path)
    return path, state, (vit, bert, vproj, tproj)


def test_interpolate_pos_embed_matches_timm_resample() -> None:
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 197, 24)
    ours = interpolate_pos_embed(pos, 24)
    direct = resample_abs_pos_embed(pos, [24, 24], num_prefix_tokens=1, antialias=False)
    assert ours.shape == (1, 577, 24)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, 0], pos[:, 0])  # CLS kept
    assert interpolate_pos_embed(pos, 14) is pos


def _features(backbone: BlipBackbone, pixels: torch.Tensor, texts: list[str]):
    with torch.no_grad():
        return backbone.encode_image(pixels), backbone.encode_text(backbone.tokenize(texts))


def _reference_features(refs, pixels, tokens, image_size: int):
    vit, bert, vproj, tproj = refs
    if image_size != 224:
        from timm.layers import resample_abs_pos_embed

        big = timm.models.vision_transformer.VisionTransformer(
            img_size=image_size,
            patch_size=16,
            embed_dim=WIDTH,
            depth=DEPTH,
            num_heads=HEADS,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ).eval()
        state = dict(vit.state_dict())
        grid = image_size // 16
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], [grid, grid], num_prefix_tokens=1, antialias=False
        )
        big.load_state_dict(state)
        vit = big
    with torch.no_grad():
        image = vproj(vit.forward_features(pixels)[:, 0])
        hidden = bert(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            token_type_ids=torch.zeros_like(tokens["input_ids"]),
        ).last_hidden_state
        text = tproj(hidden[:, 0])
    return image, text


@pytest.mark.parametrize("image_size", [224, 384])
def test_model_base_layout_loads_and_matches_reference(model_base, image_size: int) -> None:
    path, state, refs = model_base
    config = BackboneConfig(
        name="blip",
        arch="test-blip16",
        pretrained=str(path),
        image_size=image_size,
        sha1=sha1_file(path),
    )
    backbone = BlipBackbone.from_config(config)
    grid = image_size // 16
    expected_pos = interpolate_pos_embed(state["visual_encoder.pos_embed"], grid)
    torch.testing.assert_close(
        backbone.vision_model.embeddings.position_embedding.data, expected_pos, rtol=0, atol=0
    )
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, image_size, image_size)
    texts = ["is red and has long sleeves", "a small square", "x"]
    image, text = _features(backbone, pixels, texts)
    ref_image, ref_text = _reference_features(refs, pixels, backbone.tokenize(texts), image_size)
    assert image.shape == (3, EMBED) and text.shape == (3, EMBED)
    torch.testing.assert_close(image, ref_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text, ref_text, rtol=1e-4, atol=1e-5)


def test_model_base_wrong_keys_and_sha1(model_base, tmp_path: Path) -> None:
    path, state, _ = model_base
    broken = dict(state)
    broken["visual_encoder.blocks.0.norm1.wieght"] = broken.pop(
        "visual_encoder.blocks.0.norm1.weight"
    )
    broken["text_encoder.encoder.layer.1.output.dense.bias_x"] = broken.pop(
        "text_encoder.encoder.layer.1.output.dense.bias"
    )
    bad = tmp_path / "bad.pth"
    torch.save({"model": broken}, bad)
    with pytest.raises(CirError) as err:
        BlipBackbone.from_config(
            BackboneConfig(name="blip", arch="test-blip16", pretrained=str(bad))
        )
    assert "visual_encoder.blocks.0.norm1.wieght" in str(err.value)

    broken = dict(state)
    del broken["text_encoder.encoder.layer.1.output.dense.bias"]
    broken["text_proj.extra"] = torch.zeros(1)
    torch.save({"model": broken}, bad)
    with pytest.raises(CirError) as err:
        BlipBackbone.from_config(
            BackboneConfig(name="blip", arch="test-blip16", pretrained=str(bad))
        )
    msg = str(err.value)
    assert "missing 1 key(s): text_encoder.encoder.layer.1.output.dense.bias" in msg
    assert "unexpected 1 key(s): text_proj.extra" in msg and "\n" not in msg

    with pytest.raises(CirError, match="SHA1 mismatch"):
        BlipBackbone.from_config(
            BackboneConfig(name="blip", arch="test-blip16", pretrained=str(path), sha1="0" * 40)
        )
    with pytest.raises(CirError, match="not a BLIP checkpoint"):
        torch.save({"epoch": 1, "Combiner": {}}, bad)
        BlipBackbone.from_config(
            BackboneConfig(name="blip", arch="test-blip16", pretrained=str(bad))
        )


def test_converter_ignores_non_tower_modules(model_base) -> None:
    _, state, _ = model_base
    converted = convert_blip_state(state, 14)
    assert not any(
        k.startswith(("visual_encoder", "text_decoder", "image_queue", "temp")) for k in converted
    )
    assert "vision_model.embeddings.class_embedding" in converted
    assert "vision_model.encoder.layers.1.self_attn.projection.weight" in converted
    with pytest.raises(CirError, match="visual_encoder.head.weight"):
        convert_blip_state({"visual_encoder.head.weight": torch.zeros(1)}, 14)


def test_transformers_folder_loads(tmp_path: Path) -> None:
    """A save_pretrained BlipForImageTextRetrieval folder (what hub ids resolve to) loads."""
    spec = ARCHS["test-blip16"]
    tokenizer = blip.build_tokenizer(None, spec)
    vision_config, text_config = blip._configs(spec, 224, len(tokenizer))
    config = transformers.BlipConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_text_hidden_size=EMBED,
    )
    torch.manual_seed(0)
    full = transformers.BlipForImageTextRetrieval(config).eval()
    full.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    backbone = BlipBackbone.from_config(
        BackboneConfig(name="blip", arch="blip-base", pretrained=str(tmp_path / "hf"))
    )
    pixels = torch.randn(2, 3, 224, 224)
    image, text = _features(backbone, pixels, ["make it red", "a star"])
    with torch.no_grad():
        ref = full.vision_proj(full.vision_model(pixel_values=pixels).last_hidden_state[:, 0])
    torch.testing.assert_close(image, ref)
    assert text.shape == (2, EMBED) and backbone.image_size == 224


def test_unknown_arch_and_missing_file() -> None:
    with pytest.raises(CirError, match="not a BLIP architecture"):
        BlipBackbone.from_config(BackboneConfig(name="blip", arch="RN50x4", pretrained=None))
    with pytest.raises(CirError, match="weights file not found"):
        BlipBackbone.from_config(
            BackboneConfig(name="blip", arch="cir-tiny-blip", pretrained="models/model_base.pth")
        )
