"""Feature cache: computed once, reused, invalidated by the key, crash-safe, memory-mapped."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from cir_cli.cache import FeatureCache


class Counter:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, names: list[str]) -> torch.Tensor:
        self.names += names
        return torch.tensor([[float(n[1:]), -float(n[1:])] for n in names])


def test_compute_once_then_reuse_in_any_order(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counter()
    first = cache.get_or_compute("k", ["a1", "a2", "a3"], compute)
    assert compute.names == ["a1", "a2", "a3"]
    again = cache.get_or_compute("k", ["a3", "a1"], compute)
    assert compute.names == ["a1", "a2", "a3"]  # nothing recomputed
    torch.testing.assert_close(again, first[[2, 0]])
    # new names: only those are computed, old rows come from disk
    mixed = cache.get_or_compute("k", ["a4", "a2"], compute)
    assert compute.names[-1:] == ["a4"]
    torch.testing.assert_close(mixed, torch.tensor([[4.0, -4.0], [2.0, -2.0]]))


def test_a_new_key_recomputes(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counter()
    cache.get_or_compute("weights-A", ["a1"], compute)
    cache.get_or_compute("weights-B", ["a1"], compute)
    assert compute.names == ["a1", "a1"]


def test_chunks_are_committed_one_by_one_and_a_crash_loses_only_the_current(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    calls = []

    def failing(names: list[str]) -> torch.Tensor:
        calls.append(list(names))
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C during the second chunk
        return torch.ones(len(names), 2)

    with contextlib.suppress(KeyboardInterrupt):
        cache.get_or_compute("k", [f"x{i}" for i in range(5)], failing, chunk_size=2)
    assert cache.cached_names("k") == {"x0", "x1"}
    assert not list(tmp_path.rglob("*.tmp"))  # no half files
    compute = Counter()
    cache.get_or_compute("k", [f"x{i}" for i in range(5)], compute, chunk_size=2)
    assert compute.names == ["x2", "x3", "x4"]  # resumes where it stopped


def test_an_array_without_its_names_file_is_ignored(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.get_or_compute("k", ["a1"], Counter())
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    np.save(folder / "shard-00099.npy", np.zeros((1, 2), dtype=np.float32))
    assert cache.cached_names("k") == {"a1"}


def test_rows_are_memory_mapped(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.get_or_compute("k", ["a1", "a2"], Counter())
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (shard,) = folder.glob("shard-*.npy")
    assert isinstance(np.load(shard, mmap_mode="r"), np.memmap)


def test_a_rewritten_image_file_is_re_encoded(tmp_path: Path) -> None:
    import os

    cache, compute = FeatureCache(tmp_path / "cache"), Counter()
    files = {n: tmp_path / f"{n}.png" for n in ("a1", "a2")}
    for path in files.values():
        path.write_bytes(b"v1")
    cache.get_or_compute_images("k", ["a1", "a2"], files, compute)
    cache.get_or_compute_images("k", ["a2", "a1"], files, compute)
    assert compute.names == ["a1", "a2"]
    files["a2"].write_bytes(b"version 2")  # same name, new content (size and mtime change)
    os.utime(files["a2"], ns=(1, 1))
    cache.get_or_compute_images("k", ["a1", "a2"], files, compute)
    assert compute.names == ["a1", "a2", "a2"]


def test_file_identities_equal_file_identity(tmp_path: Path, monkeypatch) -> None:
    import os

    from cir_cli.cache import file_identities, file_identity

    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(b"a")
    (real / "b.png").write_bytes(b"bb")
    os.symlink(real, tmp_path / "linked_dir")
    os.symlink(real / "b.png", real / "link.png")
    monkeypatch.chdir(real)
    paths = {
        "plain": real / "a.png",
        "via_dir_link": tmp_path / "linked_dir" / "a.png",
        "file_link": real / "link.png",
        "missing": real / "gone.png",
        "relative": Path("b.png"),
        "relative_str": "b.png",
        "dotted": tmp_path / "linked_dir" / ".." / "real" / "a.png",
    }
    names = list(paths)
    assert file_identities(names, paths) == [file_identity(n, paths[n]) for n in names]
