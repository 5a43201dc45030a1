"""Combiner: published key layout, hand-checked math, loading the seeds' files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cir_cli.checkpoints import save_weights
from cir_cli.errors import CirError
from cir_cli.modules import Combiner, CombinerParts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D, P, H = 16, 24, 40

# Spec 7, in the order the published files list them.
SPEC_KEYS = [
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
]


def _combiner(seed: int = 0) -> Combiner:
    torch.manual_seed(seed)
    return Combiner(D, P, H).eval()


def _features(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Scaled up so the raw-feature residual is not negligible next to the MLP output.
    return tuple(torch.randn(n, D, generator=g) * 3 for _ in range(3))  # type: ignore[return-value]


def _save_seed_layout(path: Path, sd: dict[str, torch.Tensor], with_optimizer: bool = True) -> None:
    obj: dict[str, object] = {"epoch": 3, "Combiner": sd}
    if with_optimizer:
        obj["optimizer_state_dict"] = {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0]}]}
    torch.save(obj, path)


def test_state_dict_keys_and_shapes_match_spec() -> None:
    sd = _combiner().state_dict()
    assert list(sd) == SPEC_KEYS
    shapes = {k: list(v.shape) for k, v in sd.items()}
    assert shapes == {
        "text_projection_layer.weight": [P, D],
        "text_projection_layer.bias": [P],
        "image_projection_layer.weight": [P, D],
        "image_projection_layer.bias": [P],
        "combiner_layer.weight": [H, 2 * P],
        "combiner_layer.bias": [H],
        "output_layer.weight": [D, H],
        "output_layer.bias": [D],
        "dynamic_scalar.0.weight": [H, 2 * P],
        "dynamic_scalar.0.bias": [H],
        "dynamic_scalar.3.weight": [1, H],
        "dynamic_scalar.3.bias": [1],
    }
    # logit_scale is a plain constant, never saved.
    assert Combiner(D, P, H, logit_scale=50.0).logit_scale == 50.0
    assert all("logit" not in k for k in sd)


def test_parameter_count_at_published_dims() -> None:
    # d=256, P=2560, H=5120 (BLIP4CIR):
    #   text_projection_layer   256*2560 + 2560   =    657,920
    #   image_projection_layer  256*2560 + 2560   =    657,920
    #   combiner_layer         5120*5120 + 5120   = 26,219,520
    #   output_layer            5120*256 + 256    =  1,310,976
    #   dynamic_scalar.0       5120*5120 + 5120   = 26,219,520
    #   dynamic_scalar.3          5120*1 + 1      =      5,121
    #   total                                     = 55,070,977  (spec: "about 55M")
    model = Combiner(256, 2560, 5120)
    assert sum(p.numel() for p in model.parameters()) == 55_070_977


def test_combine_features_matches_hand_formula() -> None:
    # float64: the hand formula and the module sum in different orders (addmm vs matmul + add),
    # and float32 rounding of that differs between CPUs; in float64 it is ~1e-15.
    model = _combiner().double()
    x_i, x_t, _ = (x.double() for x in _features(5))
    sd = model.state_dict()

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    a_t = torch.clamp(lin(x_t, "text_projection_layer"), min=0)
    a_i = torch.clamp(lin(x_i, "image_projection_layer"), min=0)
    c = torch.cat([a_t, a_i], dim=1)  # text first
    h = torch.clamp(lin(c, "combiner_layer"), min=0)
    lam = 1 / (
        1 + torch.exp(-lin(torch.clamp(lin(c, "dynamic_scalar.0"), min=0), "dynamic_scalar.3"))
    )
    out = lin(h, "output_layer") + lam * x_t + (1 - lam) * x_i
    expected = out / out.norm(dim=1, keepdim=True)

    with torch.no_grad():
        got = model.combine_features(x_i, x_t)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # Argument order matters: swapping image and text gives a different query.
    with torch.no_grad():
        assert not torch.allclose(model.combine_features(x_t, x_i), got)


def test_forward_logits_use_scale_100_and_normalised_targets() -> None:
    model = _combiner()
    x_i, x_t, x_tgt = _features(4)
    with torch.no_grad():
        logits = model(x_i, x_t, x_tgt)
        pred = model.combine_features(x_i, x_t)
    tgt = x_tgt / x_tgt.norm(dim=1, keepdim=True)
    torch.testing.assert_close(logits, 100 * pred @ tgt.T)
    assert logits.shape == (4, 4)


def test_factored_pairwise_combination_matches_direct() -> None:
    model = _combiner().double()  # float64: factored and direct sums differ in order
    x_i, x_t, _ = (x.double() for x in _features(6))
    with torch.no_grad():
        img = model.project_image(x_i)
        txt = model.project_text(x_t)
        assert isinstance(img, CombinerParts)
        torch.testing.assert_close(model.combine_parts(img, txt), model.combine_features(x_i, x_t))
        grid = model.combine_parts(img.unsqueeze(0), txt.unsqueeze(1))
        assert grid.shape == (6, 6, D)
        for i in range(6):
            for j in range(6):
                direct = model.combine_features(x_i[j : j + 1], x_t[i : i + 1])[0]
                torch.testing.assert_close(grid[i, j], direct, rtol=1e-10, atol=1e-12)


def test_train_mode_uses_dropout() -> None:
    model = _combiner().train()
    x_i, x_t, _ = _features(8)
    torch.manual_seed(0)
    a = model.combine_features(x_i, x_t)
    b = model.combine_features(x_i, x_t)
    assert not torch.allclose(a, b)


def test_from_checkpoint_seed_layout_roundtrip(tmp_path: Path) -> None:
    model = _combiner(seed=7)
    path = tmp_path / "combiner.pt"
    _save_seed_layout(path, model.state_dict())

    loaded = Combiner.from_checkpoint(path)
    assert (loaded.feature_dim, loaded.projection_dim, loaded.hidden_dim) == (D, P, H)
    assert not loaded.training
    assert list(loaded.state_dict()) == SPEC_KEYS
    x_i, x_t, x_tgt = _features(5)
    with torch.no_grad():
        assert torch.equal(loaded(x_i, x_t, x_tgt), model(x_i, x_t, x_tgt))
        assert torch.equal(loaded.combine_features(x_i, x_t), model.combine_features(x_i, x_t))


def test_from_checkpoint_safetensors(tmp_path: Path) -> None:
    model = _combiner(seed=3)
    path = tmp_path / "combiner.safetensors"
    save_weights(path, model.state_dict(), {"epoch": 2, "recipe": "blip4cir"})
    loaded = Combiner.from_checkpoint(path)
    x_i, x_t, _ = _features(3)
    with torch.no_grad():
        assert torch.equal(loaded.combine_features(x_i, x_t), model.combine_features(x_i, x_t))

    # Detected by magic bytes, not only by suffix.
    other = tmp_path / "combiner.weights"
    save_weights(other, model.state_dict(), {})
    assert Combiner.from_checkpoint(other).hidden_dim == H


def _broken(tmp_path: Path, edit: str) -> Path:
    sd = dict(_combiner().state_dict())
    if edit == "rename":
        sd["text_proj.weight"] = sd.pop("text_projection_layer.weight")
    elif edit == "extra":
        sd["logit_scale"] = torch.tensor(100.0)
    elif edit == "shape":
        sd["output_layer.bias"] = torch.zeros(D + 1)
    path = tmp_path / f"{edit}.pt"
    _save_seed_layout(path, sd)
    return path


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        ("rename", ["text_projection_layer.weight", "text_proj.weight"]),
        ("extra", ["logit_scale"]),
        ("shape", ["output_layer.bias"]),
    ],
)
def test_from_checkpoint_bad_keys(tmp_path: Path, edit: str, names: list[str]) -> None:
    path = _broken(tmp_path, edit)
    with pytest.raises(CirError) as info:
        Combiner.from_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for name in names:
        assert name in msg


def test_from_checkpoint_wrong_class_key(tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    torch.save({"epoch": 1, "CLIP": _combiner().state_dict()}, path)
    with pytest.raises(CirError, match="'Combiner'.*'CLIP'"):
        Combiner.from_checkpoint(path)


def test_from_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CirError, match="not found"):
        Combiner.from_checkpoint(tmp_path / "nope.pt")


class _Payload:
    """A custom class: unpickling it would need code from this module, so it must be refused."""

    def __init__(self) -> None:
        self.value = 1


def test_from_checkpoint_refuses_arbitrary_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "Combiner": _combiner().state_dict(), "extra": _Payload()}, path)
    with pytest.raises(CirError, match="refused for safety") as info:
        Combiner.from_checkpoint(path)
    assert "\n" not in str(info.value)
