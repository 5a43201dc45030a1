"""open_clip backbones: real loading code on tiny models saved in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cir_cli.config import BackboneConfig
from cir_cli.errors import CirError


def _build(arch: str = "cir-tiny", pretrained: str | None = None):
    from cir_cli.backbones import build_backbone

    return build_backbone(BackboneConfig(arch=arch, pretrained=pretrained))


def _features(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        return (
            backbone.encode_image(pixels),
            backbone.encode_text(backbone.tokenize(["make it blue", "a red star"])),
        )


@pytest.mark.parametrize("arch", ["cir-tiny", "cir-tiny-rn"])
def test_local_state_dict_and_clip4cir_layout_load_to_the_same_model(arch: str, tmp_path: Path):
    source = _build(arch)
    state = source.model.state_dict()
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    c4c = tmp_path / "tuned_clip_best.pt"
    torch.save({"epoch": 4, "CLIP": state}, c4c)  # CLIP4Cir stage-I layout (spec 7)
    from safetensors.torch import save_file

    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    expected = _features(source)
    for path in (plain, c4c, st):
        loaded = _build(arch, str(path))
        for got, want in zip(_features(loaded), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert loaded.source == str(path)


def test_wrong_weights_are_refused_with_the_key_names(tmp_path: Path) -> None:
    state = _build().model.state_dict()
    state["visual.extra.weight"] = torch.zeros(1)
    del state["ln_final.weight"]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CirError) as err:
        _build("cir-tiny", str(bad))
    assert "visual.extra.weight" in str(err.value) and "ln_final.weight" in str(err.value)


def test_unknown_arch_tag_and_missing_file() -> None:
    with pytest.raises(CirError, match="not an open_clip architecture"):
        _build("NoSuchNet")
    with pytest.raises(CirError, match="weights file not found"):
        _build("cir-tiny", "/nonexistent/weights.pt")
    with pytest.raises(CirError, match="neither a local file nor a tag"):
        _build("RN50x4", "no-such-tag")


def test_real_architectures_are_registered() -> None:
    import open_clip

    for arch, tag in (("RN50x4", "openai"), ("ViT-L-14", "openai"),
                      ("ViT-bigG-14", "laion2b_s39b_b160k")):
        assert tag in open_clip.list_pretrained_tags_by_model(arch)
