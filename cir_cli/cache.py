"""On-disk cache of frozen-tower features, keyed by weights hash + preprocessing + image name.

Layout: `<cache root>/<key hash>/` holds `key.txt` (the full key, for humans) and shards
`shard-<n>.npy` + `shard-<n>.json` (the names of the shard's rows). The JSON is written after
the array and is the commit marker: a shard without it (a crash mid-write) is ignored, and both
files are written atomically. Arrays are opened memory-mapped, so a large gallery costs no RAM
until rows are read. Missing names are encoded in chunks, one shard per chunk, so an interrupted
encoding of a large gallery resumes where it stopped.

Any change of weights or preprocessing changes the key, so stale features are never served.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from stat import S_ISLNK
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cir_cli.io import atomic_path, read_json, write_text_atomic

if TYPE_CHECKING:
    from cir_cli.config import Recipe

ComputeFn = Callable[[list[str]], torch.Tensor]


def state_fingerprint(*modules: nn.Module) -> str:
    """A content hash of the modules' weights and buffers (the feature-cache key's core)."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(str(tensor.dtype).encode())
            data = tensor.detach().to("cpu").contiguous()
            if data.dtype == torch.bfloat16:
                data = data.view(torch.int16)
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def memoised_fingerprint(module: nn.Module) -> str:
    """`state_fingerprint(module)`, recomputed only when one of its tensors was replaced or
    modified in place (storage pointer, version counter and dtype guard the memo), so cache
    keys of large frozen towers are not re-hashed at every validation."""
    tensors = list(module.state_dict().values())
    guard = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
    memo = module.__dict__.get("_cir_fingerprint")
    if memo is None or memo[0] != guard:
        memo = (guard, state_fingerprint(module))
        module.__dict__["_cir_fingerprint"] = memo
    return memo[1]


def file_identity(name: str, path: Path) -> str:
    """`name|path|size|mtime_ns`: changes whenever the file is replaced or rewritten."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return f"{name}|{path.resolve()}|missing"
    return f"{name}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def file_identities(names: Sequence[str], paths: Mapping[str, Path]) -> list[str]:
    """`file_identity` of many files, the same strings, at a fraction of the cost.

    `Path.resolve()` walks every path component with an lstat each, per file: 40k images cost
    seconds on every warm cache read. Here each distinct folder is resolved once, and each file
    costs one `lstat`; only a file that is itself a symlink (or missing) takes the full
    `file_identity` path, so the strings (and existing caches) stay identical.
    """
    folders: dict[str, str] = {}
    out: list[str] = []
    lstat, realpath, fspath = os.lstat, os.path.realpath, os.fspath
    for name in names:
        path = paths[name]
        text = fspath(path)
        try:
            st = lstat(text)
        except OSError:
            out.append(file_identity(name, path))
            continue
        folder, sep, base = text.rpartition(os.sep)
        if S_ISLNK(st.st_mode) or not sep or not base or base in (".", ".."):
            out.append(file_identity(name, path))
            continue
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = realpath(folder or os.sep)
        joined = real + base if real.endswith(os.sep) else real + os.sep + base
        out.append(f"{name}|{joined}|{st.st_size}|{st.st_mtime_ns}")
    return out


# A cached row's location, packed in one int (shard number << _ROW_BITS | row) so a gather of
# many rows is a few numpy operations instead of a Python loop per row.
_ROW_BITS = 32


class _Index:
    """name -> packed (shard, row) of the committed shards of one key's folder."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.shards: list[Path] = []

    def add(self, array_file: Path, names: Sequence[str]) -> None:
        base = len(self.shards) << _ROW_BITS
        self.shards.append(array_file)
        self.codes.update(zip(names, range(base, base + len(names)), strict=True))

    def __contains__(self, name: str) -> bool:
        return name in self.codes

    def __iter__(self):
        return iter(self.codes)


class FeatureCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _index(self, folder: Path) -> _Index:
        index = _Index()
        for names_file in sorted(folder.glob("shard-*.json")):
            array_file = names_file.with_suffix(".npy")
            if not array_file.is_file():
                continue
            names = read_json(names_file, "feature-cache shard index", list)
            index.add(array_file, names)
        return index

    def cached_names(self, key: str) -> set[str]:
        return set(self._index(self._dir(key)))

    def get_or_compute(
        self,
        key: str,
        names: Sequence[str],
        compute: ComputeFn,
        chunk_size: int = 4096,
        on_hit: Callable[[int], None] | None = None,
        lazy: bool = False,
    ) -> torch.Tensor | CachedRows:
        """Features for `names` in order; rows not yet cached are computed with `compute`.

        `compute(names)` returns a (len(names), ...) tensor; it is called in chunks of at most
        `chunk_size` names and each chunk is committed to disk before the next starts.
        `lazy=True` returns a `CachedRows` that reads rows from the memory-mapped shards on
        demand instead of one in-memory tensor (large per-image tensors, e.g. ViT tokens).
        """
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.txt"
        if not key_file.exists():
            write_text_atomic(key_file, key + "\n")
        index = self._index(folder)
        missing = list(dict.fromkeys(n for n in names if n not in index))
        if on_hit is not None:
            on_hit(len(names) - len(missing))
        next_id = len(list(folder.glob("shard-*.json")))
        for start in range(0, len(missing), chunk_size):
            chunk = missing[start : start + chunk_size]
            features = compute(chunk).detach().to("cpu")
            if features.dtype == torch.bfloat16:  # numpy has no bfloat16
                features = features.float()
            stem, claim = _claim_shard(folder, next_id)
            try:
                with atomic_path(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, features.numpy())
                write_text_atomic(stem.with_suffix(".json"), json.dumps(chunk))
            finally:
                claim.unlink(missing_ok=True)
            index.add(stem.with_suffix(".npy"), chunk)
            next_id = int(stem.name.split("-")[1]) + 1
        if lazy:
            return CachedRows(index, list(names))
        return self._gather(index, names)

    def get_or_compute_images(
        self,
        key: str,
        names: Sequence[str],
        paths: Mapping[str, Path],
        compute: ComputeFn,
        **kwargs,
    ):
        """`get_or_compute` for image files: rows are keyed by the file's identity too.

        The identity is (name, absolute path, size, mtime), so a regenerated or replaced image
        (same name, new content) is re-encoded instead of served stale.
        """
        ids = file_identities(names, paths)
        name_of = dict(zip(ids, names, strict=True))
        return self.get_or_compute(
            key, ids, lambda chunk: compute([name_of[i] for i in chunk]), **kwargs
        )

    @staticmethod
    def _gather(index: _Index, names: Sequence[str]) -> torch.Tensor:
        if not names:
            return torch.empty(0)
        codes = np.fromiter((index.codes[n] for n in names), dtype=np.int64, count=len(names))
        shard_of = codes >> _ROW_BITS
        row_of = codes & ((1 << _ROW_BITS) - 1)
        out = None
        # One read per shard: a slice copy when the shard's rows are wanted whole and in order
        # (the usual warm read), one fancy index otherwise; then rows land at their positions.
        for shard in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == shard)
            rows = row_of[positions]
            array = np.load(index.shards[int(shard)], mmap_mode="r")
            if out is None:
                out = np.empty((len(names), *array.shape[1:]), dtype=array.dtype)
            whole = len(rows) == array.shape[0] and bool((rows == np.arange(len(rows))).all())
            contiguous = positions[-1] - positions[0] == len(positions) - 1
            if whole and contiguous:
                out[positions[0] : positions[-1] + 1] = array
            else:
                out[positions] = array[rows]
        return torch.from_numpy(out)


def _claim_shard(folder: Path, first: int) -> tuple[Path, Path]:
    """(stem, claim file) of a shard number no other process is writing or has written.

    Two processes filling one cache folder (two `cir validate` at once) would otherwise both
    pick the first free number and the second rename would replace the first shard's array
    under the first one's names. The claim is created with O_EXCL (atomic on local and NFSv3+
    file systems) and held until the shard's JSON commit marker exists; a number whose claim
    or JSON exists is skipped. A claim left by a killed process only wastes its number.
    """
    n = first
    while True:
        stem = folder / f"shard-{n:05d}"
        claim = stem.with_suffix(".claim")
        if not stem.with_suffix(".json").exists():
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                # Committed between our check and the claim (its claim already released)?
                if not stem.with_suffix(".json").exists():
                    return stem, claim
                claim.unlink(missing_ok=True)
        n += 1


class CachedRows:
    """Rows of a cached feature set, read from the memory-mapped shards when indexed.

    `rows[[i, j, ...]]` (positions in the `names` given to `get_or_compute`) -> a tensor.
    """

    def __init__(self, index: _Index, names: list[str]) -> None:
        self._index = index
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        positions = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return FeatureCache._gather(self._index, [self.names[int(i)] for i in positions])


def default_cache(recipe: Recipe) -> FeatureCache:
    """The recipe's feature cache: output.cache_dir, or `<output.dir>/.cache`."""
    root = recipe.output.cache_dir or str(Path(recipe.output.dir) / ".cache")
    return FeatureCache(Path(root).expanduser())
