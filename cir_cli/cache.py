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

import numpy as np
import torch

from cir_cli.io import atomic_path, read_json, write_text_atomic

ComputeFn = Callable[[list[str]], torch.Tensor]


def file_identity(name: str, path: Path) -> str:
    """`name|path|size|mtime_ns`: changes whenever the file is replaced or rewritten."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return f"{name}|{path.resolve()}|missing"
    return f"{name}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class FeatureCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _index(self, folder: Path) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        for names_file in sorted(folder.glob("shard-*.json")):
            array_file = names_file.with_suffix(".npy")
            if not array_file.is_file():
                continue
            names = read_json(names_file, "feature-cache shard index", list)
            for row, name in enumerate(names):
                index[name] = (array_file, row)
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
            for row, name in enumerate(chunk):
                index[name] = (stem.with_suffix(".npy"), row)
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
        ids = [file_identity(n, paths[n]) for n in names]
        name_of = dict(zip(ids, names, strict=True))
        return self.get_or_compute(
            key, ids, lambda chunk: compute([name_of[i] for i in chunk]), **kwargs
        )

    @staticmethod
    def _gather(index: dict[str, tuple[Path, int]], names: Sequence[str]) -> torch.Tensor:
        arrays: dict[Path, np.ndarray] = {}
        rows = []
        for name in names:
            path, row = index[name]
            if path not in arrays:
                arrays[path] = np.load(path, mmap_mode="r")
            rows.append((path, row))
        if not rows:
            return torch.empty(0)
        # Gather per shard with one fancy-index each (fast), then restore the requested order.
        order: dict[Path, list[int]] = {}
        positions: dict[Path, list[int]] = {}
        for pos, (path, row) in enumerate(rows):
            order.setdefault(path, []).append(row)
            positions.setdefault(path, []).append(pos)
        first = arrays[rows[0][0]]
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for path, shard_rows in order.items():
            out[positions[path]] = arrays[path][shard_rows]
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

    def __init__(self, index: dict[str, tuple[Path, int]], names: list[str]) -> None:
        self._index = index
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        positions = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return FeatureCache._gather(self._index, [self.names[int(i)] for i in positions])
