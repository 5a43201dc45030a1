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


class Versioned:
    """Features that depend on the file's bytes: a stale row shows as the old bytes' value."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.names = files, []

    def __call__(self, names: list[str]) -> torch.Tensor:
        self.names += names
        return torch.tensor([[float(len(self.files[n].read_bytes()))] for n in names])


def _warm(tmp_path: Path, n: int = 3):
    cache = FeatureCache(tmp_path / "cache")
    folder = tmp_path / "images"
    folder.mkdir()
    files = {f"a{i}": folder / f"a{i}.png" for i in range(n)}
    for path in files.values():
        path.write_bytes(b"1234")
    compute = Versioned(files)
    names = list(files)
    first = cache.get_or_compute_images("k", names, files, compute)
    assert compute.names == names
    return cache, files, names, compute, first


def test_a_repeated_image_read_is_served_from_its_read_memo(tmp_path: Path) -> None:
    cache, files, names, compute, first = _warm(tmp_path)
    (memo,) = (tmp_path / "cache").rglob("read-*.npz")
    hits = []
    again = cache.get_or_compute_images("k", names, files, compute, on_hit=hits.append)
    assert compute.names == names and hits == [3]
    lazy = cache.get_or_compute_images("k", names, files, compute, lazy=True)
    torch.testing.assert_close(lazy[[2, 0]], first[[2, 0]])
    memo.unlink()  # the first read of a request, with every option the callers pass
    options = {"lazy": False, "chunk_size": 2, "on_hit": hits.append}
    torch.testing.assert_close(
        cache.get_or_compute_images("k", names, files, compute, **options), first
    )
    assert memo.is_file() and hits == [3, 3]
    torch.testing.assert_close(again, first)
    # the memo, not the index, served it: with every shard's names file gone the index is
    # empty, yet nothing is recomputed
    for names_file in memo.parent.glob("shard-*.json"):
        names_file.rename(names_file.with_suffix(".json.away"))
    torch.testing.assert_close(cache.get_or_compute_images("k", names, files, compute), first)
    assert compute.names == names


def test_an_image_rewritten_in_place_is_re_encoded_through_the_memo(tmp_path: Path) -> None:
    import os

    cache, files, names, compute, _ = _warm(tmp_path)
    cache.get_or_compute_images("k", names, files, compute)  # memo written and used
    st = os.stat(files["a1"])
    # same size, new bytes, new mtime
    files["a1"].write_bytes(b"abcd")
    os.utime(files["a1"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    out = cache.get_or_compute_images("k", names, files, compute)
    assert compute.names == [*names, "a1"]
    # same mtime as before, new size
    files["a2"].write_bytes(b"123456")
    os.utime(files["a2"], ns=(st.st_atime_ns, st.st_mtime_ns))
    out = cache.get_or_compute_images("k", names, files, compute)
    assert compute.names == [*names, "a1", "a2"]
    torch.testing.assert_close(out, torch.tensor([[4.0], [4.0], [6.0]]))
    # and the memo written after the change serves the new rows
    torch.testing.assert_close(cache.get_or_compute_images("k", names, files, compute), out)
    assert compute.names == [*names, "a1", "a2"]


def test_a_folder_link_retargeted_to_an_identical_copy_is_re_encoded(tmp_path: Path) -> None:
    import os
    import shutil

    cache = FeatureCache(tmp_path / "cache")
    for version, data in (("v1", b"same"), ("v2", b"SAME")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "a.png").write_bytes(data)
    st1 = os.stat(tmp_path / "v1" / "a.png")
    os.utime(tmp_path / "v2" / "a.png", ns=(st1.st_atime_ns, st1.st_mtime_ns))
    os.symlink(tmp_path / "v1", tmp_path / "current")
    files = {"a": tmp_path / "current" / "a.png"}
    compute = Versioned(files)
    cache.get_or_compute_images("k", ["a"], files, compute)
    cache.get_or_compute_images("k", ["a"], files, compute)
    assert compute.names == ["a"]
    (tmp_path / "current").unlink()
    os.symlink(tmp_path / "v2", tmp_path / "current")  # same name, size and mtime elsewhere
    cache.get_or_compute_images("k", ["a"], files, compute)
    assert compute.names == ["a", "a"]
    shutil.rmtree(tmp_path / "v1")


def test_a_damaged_or_foreign_read_memo_is_ignored(tmp_path: Path) -> None:
    cache, files, names, compute, first = _warm(tmp_path)
    (memo,) = (tmp_path / "cache").rglob("read-*.npz")
    memo.write_bytes(b"not a zip")
    torch.testing.assert_close(cache.get_or_compute_images("k", names, files, compute), first)
    # a memo of another layout (other field types, codes pointing elsewhere) is not read
    np.savez(
        memo,
        files=np.zeros(3, dtype=[("dev", "<i8"), ("ino", "<i8")]),
        codes=np.array([1, 1, 1]),
        shard_names=np.array(["shard-00000.npy"]),
        shard_stamps=np.zeros(1, dtype=[("dev", "<i8")]),
    )
    torch.testing.assert_close(cache.get_or_compute_images("k", names, files, compute), first)
    assert compute.names == names


def test_a_replaced_shard_invalidates_the_memo(tmp_path: Path) -> None:
    import json

    cache, files, names, compute, _ = _warm(tmp_path)
    (shard,) = (tmp_path / "cache").rglob("shard-*.npy")
    ids = json.loads(shard.with_suffix(".json").read_text())
    # the shard rewritten under the same file names with its rows in the other order (a new
    # array file, as every shard write is): the memo's row numbers no longer hold
    np.save(shard.with_suffix(".new.npy"), np.array([[30.0], [20.0], [10.0]], dtype=np.float32))
    shard.with_suffix(".new.npy").replace(shard)
    shard.with_suffix(".json").write_text(json.dumps(ids[::-1]))
    out = cache.get_or_compute_images("k", names, files, compute)
    assert compute.names == names
    torch.testing.assert_close(out, torch.tensor([[10.0], [20.0], [30.0]]))


def test_read_memos_are_bounded(tmp_path: Path) -> None:
    from cir_cli import cache as cache_module

    cache, files, names, compute, _ = _warm(tmp_path)
    for i in range(cache_module._MEMOS_KEPT + 3):
        cache.get_or_compute_images("k", [names[i % 3]] * (i + 1), files, compute)
    assert len(list((tmp_path / "cache").rglob("read-*.npz"))) == cache_module._MEMOS_KEPT
