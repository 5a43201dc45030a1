"""On-disk cache of frozen-tower features, keyed by weights hash + preprocessing + image name.

Layout: `<cache root>/<key hash>/` holds `key.txt` (the full key, for humans) and shards
`shard-<n>.npy` + `shard-<n>.json` (the names of the shard's rows). The JSON is written after
the array and is the commit marker: a shard without it (a crash mid-write) is ignored, and both
files are written atomically. Arrays are opened memory-mapped, so a large gallery costs no RAM
until rows are read. Missing names are encoded in chunks, one shard per chunk, so an interrupted
encoding of a large gallery resumes where it stopped.

Image rows are keyed by the file's identity (name, real path, size, mtime), so a warm read
`lstat`s every image. `read-<hash>.npz` files are read memos: what one exact request (the same
names at the same paths) resolved to, with each file's (device, inode, size, mtime) stamp and
each used shard array's stamp. A repeated request whose stamps all match gathers the memoised
rows without building or looking up identity strings; any difference (or a damaged memo)
falls back to the identity path. Memos are derived data: deleting them is always safe.

Any change of weights or preprocessing changes the key, so stale features are never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from pathlib import Path
from stat import S_ISLNK
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cir_cli.errors import CirError
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
    texts = [os.fspath(paths[n]) for n in names]
    return _identities(names, paths, texts, _lstat_all(texts))[0]


def _lstat_all(texts: Sequence[str]) -> list[os.stat_result | None]:
    """`os.lstat` of each path (None where it fails): the one syscall per image of a read."""
    lstat = os.lstat
    try:
        return list(map(lstat, texts))  # the usual case: every file is there
    except OSError:
        pass
    out: list[os.stat_result | None] = []
    append = out.append
    for text in texts:
        try:
            append(lstat(text))
        except OSError:
            append(None)
    return out


def _identities(
    names: Sequence[str],
    paths: Mapping[str, Path],
    texts: Sequence[str],
    stats: Sequence[os.stat_result | None],
) -> tuple[list[str], bool]:
    """(`file_identity` of each name from its lstat, whether every file took the fast path)."""
    prefixes: dict[str, str] = {}  # folder as written -> its real path + os.sep
    out: list[str] = []
    plain = True
    # Locals: this loop runs once per image on every warm read, and its own overhead (not the
    # lstat) was a third of the read.
    append, sep, islink = out.append, os.sep, S_ISLNK
    for name, text, st in zip(names, texts, stats, strict=True):
        folder, has_sep, base = text.rpartition(sep)
        if (
            st is None
            or islink(st.st_mode)
            or not has_sep
            or not base
            or base == "."
            or base == ".."
        ):
            append(file_identity(name, paths[name]))
            plain = False
            continue
        prefix = prefixes.get(folder)
        if prefix is None:
            real = os.path.realpath(folder or sep)
            prefix = prefixes[folder] = real if real.endswith(sep) else real + sep
        append(f"{name}|{prefix}{base}|{st.st_size}|{st.st_mtime_ns}")
    return out, plain


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

    def codes_of(self, names: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self.codes.__getitem__, names), dtype=np.int64, count=len(names))

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
        index = self._fill(self._dir(key), key, names, compute, chunk_size, on_hit)
        if lazy:
            return CachedRows(index, list(names))
        return self._gather(index, names)

    def _fill(
        self,
        folder: Path,
        key: str,
        names: Sequence[str],
        compute: ComputeFn,
        chunk_size: int = 4096,
        on_hit: Callable[[int], None] | None = None,
    ) -> _Index:
        """The index of `folder` once every name in `names` has a committed row."""
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.txt"
        if not key_file.exists():
            write_text_atomic(key_file, key + "\n")
        index = self._index(folder)
        codes = index.codes
        missing = [n for n in names if n not in codes]
        if missing:  # a warm read skips the de-duplication
            missing = list(dict.fromkeys(missing))
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
        return index

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
        texts = [os.fspath(paths[n]) for n in names]
        stats = _lstat_all(texts)
        memo = None
        if not kwargs.get("lazy") and names:
            memo = _ReadMemo(self._dir(key), names, texts, stats)
            rows = memo.load()
            if rows is not None:
                if kwargs.get("on_hit") is not None:
                    kwargs["on_hit"](len(names))
                return rows
        ids, plain = _identities(names, paths, texts, stats)
        name_of: dict[str, str] = {}

        def compute_ids(chunk: list[str]) -> torch.Tensor:
            if not name_of:  # built only when something is missing, not on a warm read
                name_of.update(zip(ids, names, strict=True))
            return compute([name_of[i] for i in chunk])

        if memo is None:
            return self.get_or_compute(key, ids, compute_ids, **kwargs)
        kwargs.pop("lazy", None)  # False here: a lazy read has no memo
        index = self._fill(memo.folder, key, ids, compute_ids, **kwargs)
        codes = index.codes_of(ids)
        if plain:  # a symlinked or missing file keeps the request on the full path
            memo.save(codes, index.shards)
        return _gather_codes(index.shards, codes)

    @staticmethod
    def _gather(index: _Index, names: Sequence[str]) -> torch.Tensor:
        if not names:
            return torch.empty(0)
        return _gather_codes(index.shards, index.codes_of(names))


def _gather_codes(shards: Sequence[Path], codes: np.ndarray) -> torch.Tensor:
    """Rows at packed `codes` (shard position in `shards` << _ROW_BITS | row), in order."""
    shard_of = codes >> _ROW_BITS
    row_of = codes & ((1 << _ROW_BITS) - 1)
    out = None
    # One read per shard: a slice copy when the shard's rows are wanted whole and in order
    # (the usual warm read), one fancy index otherwise; then rows land at their positions.
    for shard in np.unique(shard_of):
        positions = np.flatnonzero(shard_of == shard)
        rows = row_of[positions]
        array = np.load(shards[int(shard)], mmap_mode="r")
        if out is None:
            out = np.empty((len(codes), *array.shape[1:]), dtype=array.dtype)
        whole = len(rows) == array.shape[0] and bool((rows == np.arange(len(rows))).all())
        contiguous = positions[-1] - positions[0] == len(positions) - 1
        if whole and contiguous:
            out[positions[0] : positions[-1] + 1] = array
        else:
            out[positions] = array[rows]
    return torch.from_numpy(out)


# A read memo: what one exact request (the same names at the same path texts) resolved to, so
# that repeating it (every warm `validate` of a split) costs one lstat per image and a few array
# comparisons, instead of formatting, parsing and looking up an identity string per image.
# Stamps are compared where identity strings compared (name, path, size, mtime): the file must
# be the same inode (device, inode number) with the same size and mtime_ns, which also covers a
# folder symlink now pointing elsewhere (other inodes). A shard array is stamped the same way
# (a rewritten array is a new inode: arrays are written to a temporary file and renamed).
_STAMP = np.dtype([("dev", "<u8"), ("ino", "<u8"), ("size", "<i8"), ("mtime_ns", "<i8")])
_MEMO_VERSION = 1
_MEMOS_KEPT = 16  # distinct requests memoised per cache folder (splits x datasets, in practice)


def _stamps(stats: Sequence[os.stat_result]) -> np.ndarray:
    out = np.empty(len(stats), dtype=_STAMP)
    for field in _STAMP.names:  # one C-level pass per field: half the time of one over tuples
        getter = attrgetter("st_" + field)
        out[field] = np.fromiter(map(getter, stats), dtype=_STAMP[field], count=len(stats))
    return out


class _ReadMemo:
    def __init__(
        self,
        folder: Path,
        names: Sequence[str],
        texts: Sequence[str],
        stats: Sequence[os.stat_result | None],
    ) -> None:
        self.folder = folder
        digest = hashlib.sha256(json.dumps([_MEMO_VERSION, list(names)]).encode())
        digest.update("\0".join(texts).encode("utf-8", "surrogateescape"))  # no NUL in a path
        self.file = folder / f"read-{digest.hexdigest()[:32]}.npz"
        # A missing file can have no stamp: such a request is never memoised nor served here.
        self.stamps = None if any(s is None for s in stats) else _stamps(stats)

    def load(self) -> torch.Tensor | None:
        """The rows, or None whenever anything differs from when the memo was written."""
        if self.stamps is None:
            return None
        try:
            with np.load(self.file, allow_pickle=False) as memo:
                files, codes = memo["files"], memo["codes"]
                shard_names, shard_stamps = memo["shard_names"], memo["shard_stamps"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # absent, or not a memo this version wrote: the full path decides
        if (
            files.dtype != _STAMP
            or shard_stamps.dtype != _STAMP
            or files.shape != self.stamps.shape
            or codes.shape != files.shape
            or not bool((files == self.stamps).all())
        ):
            return None
        shards = [self.folder / str(n) for n in shard_names]
        try:
            now = _stamps([os.stat(p) for p in shards])
        except OSError:
            return None
        if now.shape != shard_stamps.shape or not bool((now == shard_stamps).all()):
            return None
        return _gather_codes(shards, codes)

    def save(self, codes: np.ndarray, shards: Sequence[Path]) -> None:
        """Memoise `codes` (into `shards`) for this request; best effort, never fails a read."""
        if self.stamps is None or not len(codes):
            return
        used, inverse = np.unique(codes >> _ROW_BITS, return_inverse=True)
        local = (inverse.astype(np.int64) << _ROW_BITS) | (codes & ((1 << _ROW_BITS) - 1))
        files = [shards[int(i)] for i in used]
        with contextlib.suppress(OSError, CirError):
            shard_stamps = _stamps([os.stat(p) for p in files])
            with atomic_path(self.file) as tmp, open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    files=self.stamps,
                    codes=local,
                    shard_names=np.array([p.name for p in files]),
                    shard_stamps=shard_stamps,
                )
            memos = sorted(self.folder.glob("read-*.npz"), key=lambda p: p.stat().st_mtime_ns)
            for old in memos[:-_MEMOS_KEPT]:
                old.unlink(missing_ok=True)


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
