"""Phi (spec lincir_searle_circo.md 1.3): published {'epoch', 'Phi'} layout, strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cir_cli.errors import CirError
from cir_cli.modules import Phi


def _published(path: Path, d: int = 16, w: int = 12, seed: int = 0) -> Phi:
    """A Phi saved exactly as LinCIR/SEARLE do: torch.save({'epoch', 'Phi': state_dict})."""
    torch.manual_seed(seed)
    phi = Phi(d, 4 * d, w, dropout=0.5)
    torch.save({"epoch": 7, "Phi": phi.state_dict()}, path)
    return phi


def test_state_dict_keys_are_the_published_ones() -> None:
    phi = Phi(768, 3072, 768)
    assert sorted(phi.state_dict()) == [
        f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("bias", "weight")
    ]
    # spec 1.3: ViT-L Phi has 14,162,688 parameters
    assert sum(p.numel() for p in phi.parameters()) == 14_162_688


def test_published_file_loads_strictly_and_reproduces_outputs(tmp_path: Path) -> None:
    original = _published(tmp_path / "lincir_tiny.pt")
    loaded = Phi.from_checkpoint(tmp_path / "lincir_tiny.pt")
    assert (loaded.input_dim, loaded.hidden_dim, loaded.output_dim) == (16, 64, 12)
    original.eval()
    loaded.eval()
    x = torch.randn(5, 16)
    assert torch.equal(original(x), loaded(x))


def test_ddp_prefix_is_stripped_and_wrong_files_are_one_line_errors(tmp_path: Path) -> None:
    phi = Phi(8, 32, 8)
    state = {f"module.{k}": v for k, v in phi.state_dict().items()}
    torch.save({"epoch": 0, "Phi": state}, tmp_path / "ddp.pt")
    assert Phi.from_checkpoint(tmp_path / "ddp.pt").output_dim == 8
    torch.save({"epoch": 0, "Combiner": phi.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CirError, match="no 'Phi' entry"):
        Phi.from_checkpoint(tmp_path / "other.pt")
    bad = dict(phi.state_dict())
    bad.pop("layers.6.bias")
    torch.save({"epoch": 0, "Phi": bad}, tmp_path / "bad.pt")
    with pytest.raises(CirError, match="layers.6.bias"):
        Phi.from_checkpoint(tmp_path / "bad.pt")
    extra = dict(phi.state_dict(), **{"layers.9.weight": torch.zeros(1)})
    torch.save({"epoch": 0, "Phi": extra}, tmp_path / "extra.pt")
    with pytest.raises(CirError):
        Phi.from_checkpoint(tmp_path / "extra.pt")


def test_save_checkpoint_writes_the_published_layout(tmp_path: Path) -> None:
    phi = Phi(8, 32, 6)
    phi.save_checkpoint(tmp_path / "out.pt", epoch=3)
    raw = torch.load(tmp_path / "out.pt", weights_only=True)
    assert raw["epoch"] == 3 and sorted(raw["Phi"]) == sorted(phi.state_dict())
    assert torch.equal(Phi.from_checkpoint(tmp_path / "out.pt")(torch.ones(1, 8)),
                       phi.eval()(torch.ones(1, 8)))


def test_l2_normalize_option_normalises_the_input() -> None:
    phi = Phi(4, 8, 4, dropout=0.0, l2_normalize=True).eval()
    x = torch.randn(3, 4)
    assert torch.allclose(phi(x), phi(5 * x), atol=1e-6)
