"""CaLa's BLIP-2 path against LAVIS as the oracle (`tox -e lavis`).

CaLa builds three LAVIS `Blip2Qformer` models (ViT-L, `pretrain_vitL`) and reads, through
`extract_features`, m = text_embeds[:, 0] of the textual copy, r = multimodal_embeds[:, 0] of
the multimodal copy and t = norm(image_embeds[:, 0]) of the visual copy (spec 3.1). Here three
tiny LAVIS models share their frozen parts and differ in their Q-Formers (as after CaLa's
training), are saved in CaLa's layout (`tuned_blip_{text,multi,visual}_arithmetic.pt`,
{"epoch", "Blip2Qformer": state_dict}), imported with `cir`'s loader, and our queries
norm(r + m) and targets t must equal those computed from LAVIS's outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.lavis

lavis = pytest.importorskip("lavis", reason="salesforce-lavis is not installed (tox -e lavis)")

from tests.backbones.test_lavis_blip2 import TEXTS, TOL, _build_lavis  # noqa: E402


def test_cala_blip2_files_give_lavis_features(monkeypatch, tmp_path) -> None:
    from cir_cli.methods import build_method
    from cir_cli.recipes import load_recipe

    arch = "blip2-tiny-vitl"
    visual = _build_lavis(monkeypatch, tmp_path, arch, "clip_L", vision_factory="tiny")
    roles = {"visual": visual}
    for role, seed in (("text", 11), ("multi", 12)):
        copy = _build_lavis(monkeypatch, tmp_path, arch, "clip_L", vision_factory="tiny")
        copy.load_state_dict(visual.state_dict())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a different Q-Former, the frozen parts unchanged
            for name, p in copy.named_parameters():
                if name.startswith("Qformer.") or name == "query_tokens":
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        roles[role] = copy.eval()
    folder = tmp_path / "saved_models"
    folder.mkdir()
    for role, model in roles.items():
        torch.save(
            {"epoch": 7, "Blip2Qformer": model.state_dict()},
            folder / f"tuned_blip_{role}_arithmetic.pt",
        )

    recipe = load_recipe("toy_cala", [f'backbone.tokenizer="{tmp_path / "bert-base-uncased"}"'])
    ours = build_method(recipe).eval()
    ours.load_checkpoint(str(folder))

    size = recipe.data.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    texts = TEXTS[:2]
    with torch.no_grad():
        m = roles["text"].extract_features({"text_input": texts}, mode="text").text_embeds[:, 0]
        r = (
            roles["multi"]
            .extract_features({"image": pixels, "text_input": texts}, mode="multimodal")
            .multimodal_embeds[:, 0]
        )
        t = roles["visual"].extract_features({"image": pixels}, mode="image").image_embeds[:, 0]
        reps = ours.image_representation(pixels)
        queries = ours.queries_from_representation(reps, texts)
        targets = ours.targets_from_representation(reps)
        features = ours.training_features(reps, reps, texts)
    for name, got, want in (
        ("m", features["m"], m),
        ("r", features["r"], r),
        ("query", queries, F.normalize(r + m, dim=-1)),
        ("target", targets, F.normalize(t, dim=-1)),
    ):
        diff = float((got - want).abs().max())
        assert diff <= TOL * max(1.0, float(want.abs().max())), f"{name}: {diff:.2e}"
        print(f"CaLa {name}: max |ours - LAVIS| {diff:.2e}")
    # The three copies really differ (the test would not notice a role mix-up otherwise).
    assert not torch.allclose(
        features["m"],
        roles["multi"].extract_features({"text_input": texts}, mode="text").text_embeds[:, 0],
        atol=1e-4,
    )
