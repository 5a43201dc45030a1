"""checkpoints.py: safe seed-layout loading, strict loading, safetensors round trip, SHA1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cir_cli.checkpoints import (
    check_sha1,
    extract_state_dict,
    is_safetensors,
    load_state_dict_strict,
    load_torch_checkpoint,
    load_weights,
    read_state_dict,
    save_seed_checkpoint,
    save_weights,
    sha1_file,
    sidecar_path,
)
from cir_cli.errors import CirError


class _Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 2)
        self.register_buffer("position_ids", torch.arange(5))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.out = nn.Linear(3, 7, bias=False)
        self.out.weight = self.emb.weight  # tied: one storage, two state-dict names


class _Payload:
    pass


# --- seed .pt layout -------------------------------------------------------------------------


def test_seed_checkpoint_roundtrip(tmp_path: Path) -> None:
    net = _Net()
    path = tmp_path / "sub" / "tuned.pt"
    save_seed_checkpoint(path, "_Net", net.state_dict(), epoch=4, optimizer_state_dict={"x": 1})
    ckpt = load_torch_checkpoint(path)
    assert ckpt["epoch"] == 4 and ckpt["optimizer_state_dict"] == {"x": 1}
    sd = extract_state_dict(ckpt, "_Net", path)
    fresh = _Net()
    load_state_dict_strict(fresh, sd, source=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    sd2, meta = read_state_dict(path, "_Net")
    assert meta == {"epoch": 4} and set(sd2) == set(sd)
    assert [p.name for p in path.parent.iterdir()] == ["tuned.pt"]  # no temp files left


def test_load_torch_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CirError, match="not found"):
        load_torch_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CirError, match="not a regular file"):
        load_torch_checkpoint(tmp_path)

    as_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], as_list)
    with pytest.raises(CirError, match="expected a dict"):
        load_torch_checkpoint(as_list)

    evil = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "payload": _Payload()}, evil)
    with pytest.raises(CirError, match="refused for safety") as info:
        load_torch_checkpoint(evil)
    assert "_Payload" in str(info.value) and "\n" not in str(info.value)

    for name, data in [("garbage.pt", b"not a checkpoint at all"), ("empty.pt", b"")]:
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(CirError, match="cannot read torch checkpoint") as info:
            load_torch_checkpoint(bad)
        assert "\n" not in str(info.value)

    truncated = tmp_path / "truncated.pt"
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(100)}, whole)
    truncated.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(CirError, match="cannot read"):
        load_torch_checkpoint(truncated)


def test_extract_state_dict_missing_key_lists_present_keys(tmp_path: Path) -> None:
    ckpt = {"epoch": 1, "CLIP": {}, "optimizer_state_dict": {}}
    with pytest.raises(CirError) as info:
        extract_state_dict(ckpt, "BLIPTextEncoder", tmp_path / "x.pt")
    msg = str(info.value)
    assert "'BLIPTextEncoder'" in msg and "'CLIP'" in msg and "'optimizer_state_dict'" in msg
    with pytest.raises(CirError, match="non-tensor"):
        extract_state_dict({"M": {"w": 1}}, "M", "x.pt")


# --- strict loading --------------------------------------------------------------------------


def test_strict_load_reports_all_problems() -> None:
    sd = dict(_Net().state_dict())
    sd["renamed.weight"] = sd.pop("a.weight")
    sd["b.bias"] = torch.zeros(9)
    sd["extra"] = torch.zeros(1)
    with pytest.raises(CirError) as info:
        load_state_dict_strict(_Net(), sd, source="file.pt")
    msg = str(info.value)
    assert msg.startswith("file.pt: ") and "\n" not in msg
    assert "missing 1 key(s): a.weight" in msg
    assert "renamed.weight" in msg and "extra" in msg
    assert "b.bias (file [9], model [2])" in msg


def test_strict_load_ignore_patterns() -> None:
    src = _Net()
    sd = {k: v for k, v in src.state_dict().items() if k != "position_ids"}
    sd["optimizer_state_dict.foo"] = torch.zeros(1)
    with pytest.raises(CirError, match="position_ids"):
        load_state_dict_strict(_Net(), sd, source="s")
    dst = _Net()
    load_state_dict_strict(dst, sd, source="s", ignore=("position_ids", "optimizer_state_dict*"))
    assert torch.equal(dst.a.weight, src.a.weight)
    # A suffix pattern also matches nested keys.
    nested = nn.Sequential(_Net())
    sd_nested = {f"0.{k}": v for k, v in sd.items() if not k.startswith("optimizer")}
    load_state_dict_strict(nested, sd_nested, source="s", ignore=("position_ids",))


def test_strict_load_lists_at_most_ten_names() -> None:
    sd = {f"junk{i}": torch.zeros(1) for i in range(25)}
    sd.update(_Net().state_dict())
    with pytest.raises(CirError, match=r"unexpected 25 key\(s\): .*\(\+15 more\)") as info:
        load_state_dict_strict(_Net(), sd, source="s")
    assert "junk9" in str(info.value) and "junk10" not in str(info.value)


# --- safetensors -----------------------------------------------------------------------------


def test_safetensors_roundtrip_with_sidecar(tmp_path: Path) -> None:
    net = _Net()
    path = tmp_path / "out" / "model.safetensors"
    meta = {"recipe": "clip4cir", "epoch": 3, "step": 120, "metrics": {"r@10": 41.5}}
    save_weights(path, net.state_dict(), meta)

    side = sidecar_path(path)
    assert side.name == "model.safetensors.json"
    assert json.loads(side.read_text()) == meta
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "model.safetensors",
        "model.safetensors.json",
    ]  # no temp files remain
    assert is_safetensors(path)

    sd, got_meta = load_weights(path)
    assert got_meta == meta
    assert set(sd) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v)

    # Overwriting is atomic too and replaces both files.
    save_weights(path, net.state_dict(), {"epoch": 4})
    assert load_weights(path)[1] == {"epoch": 4}
    assert json.loads(side.read_text()) == {"epoch": 4}
    assert len(list(path.parent.iterdir())) == 2


def test_safetensors_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    tied = _Tied()
    sd = dict(tied.state_dict())
    sd["transposed"] = torch.arange(6.0).reshape(2, 3).T  # non-contiguous view
    path = tmp_path / "tied.safetensors"
    save_weights(path, sd, {})
    loaded, meta = load_weights(path)
    assert meta == {}
    assert torch.equal(loaded["emb.weight"], tied.emb.weight)
    assert torch.equal(loaded["out.weight"], tied.emb.weight)
    assert torch.equal(loaded["transposed"], sd["transposed"])
    fresh = _Tied()
    load_state_dict_strict(fresh, {k: v for k, v in loaded.items() if k != "transposed"}, "t")
    assert torch.equal(fresh.out.weight, tied.emb.weight)


def test_save_weights_rejects_non_json_metadata_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError):
        save_weights(path, _Net().state_dict(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_weights_errors_and_foreign_sidecar(tmp_path: Path) -> None:
    with pytest.raises(CirError, match="not found"):
        load_weights(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 32)
    with pytest.raises(CirError, match="cannot read safetensors"):
        load_weights(bad)

    # A safetensors file written by another tool: metadata comes from the sidecar if present.
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    assert load_weights(foreign)[1] == {}
    sidecar_path(foreign).write_text('{"epoch": 9}')
    assert load_weights(foreign)[1] == {"epoch": 9}
    sidecar_path(foreign).write_text("[1, 2]")
    with pytest.raises(CirError, match="JSON object"):
        load_weights(foreign)


def test_torch_loader_points_safetensors_users_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    save_weights(path, _Net().state_dict(), {})
    assert is_safetensors(path)
    with pytest.raises(CirError, match="safetensors"):
        load_torch_checkpoint(path)
    sd, _ = read_state_dict(path, "ignored")
    assert "a.weight" in sd


# --- SHA1 ------------------------------------------------------------------------------------


def test_sha1(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    expected = hashlib.sha1(data).hexdigest()
    assert sha1_file(path, chunk_size=1000) == expected
    check_sha1(path, expected.upper() + " ")
    with pytest.raises(CirError, match="SHA1 mismatch") as info:
        check_sha1(path, "0" * 40)
    assert expected in str(info.value)
    with pytest.raises(CirError, match="not found"):
        sha1_file(tmp_path / "missing.bin")
