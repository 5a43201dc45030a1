"""Building an index from a folder of images (`cir index`) and updating it incrementally."""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import cir_cli.search.ann as ann
from cir_cli.errors import CirError
from cir_cli.search.backends import faiss_available
from cir_cli.search.encoding import encode_gallery
from cir_cli.search.provenance import (
    check_compatible,
    load_recipe_model,
    provenance_record,
    resolve_recipe_paths,
)
from cir_cli.search.storage import (
    FEATURE_DTYPES,
    IMAGE_SUFFIXES,
    INDEX_FORMAT,
    INDEX_SUFFIX,
    INDEX_VERSION,
    FileEntry,
    check_out_location,
    load_index,
    write_index,
)

if TYPE_CHECKING:
    from cir_cli.config import Recipe
    from cir_cli.methods.base import CIRMethod


def scan_folder(folder: str | os.PathLike[str]) -> list[FileEntry]:
    """Image files under `folder`, recursively, sorted by relative path.

    Hidden files and folders (a leading '.', e.g. macOS `._x.jpg` resource forks) and index
    folders (`*.cirindex`, so an index may live inside the folder it indexes) are left out.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CirError(f"{root}: not a folder (expected a folder of images to index)")
    entries: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not d.endswith(INDEX_SUFFIX)
        )
        base = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = base / name
            try:
                st = path.stat()
            except OSError:
                # A dangling symlink: kept with an impossible size so it is tried and reported.
                st = None
            rel = path.relative_to(root).as_posix()
            entries.append(FileEntry(rel, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    entries.sort(key=lambda e: e.path)
    return entries


@dataclass
class IndexSummary:
    """What `build_index` / `update_index` did."""

    location: Path
    total: int
    encoded: list[str] = field(default_factory=list)
    kept: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # Time spent decoding and encoding images (without model loading and writing).
    encode_seconds: float = 0.0
    # Under torchrun: this process's rank (only rank 0 writes the index and reports).
    rank: int = 0

    @property
    def images_per_second(self) -> float:
        done = len(self.encoded) + len(self.skipped)
        return done / self.encode_seconds if self.encode_seconds > 0 else 0.0


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def build_index(
    folder: str | os.PathLike[str],
    recipe: Recipe,
    out: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    model: CIRMethod | None = None,
    dtype: str = "float32",
    ann_kind: str | None = None,
    ann_params: str | None = None,
) -> IndexSummary:
    """Encode every image under `folder` and write the index folder `out` (atomically).

    `model` may be passed when already loaded from the same recipe and checkpoint (tests,
    notebooks); otherwise it is loaded with `load_model`. `dtype` is the feature storage
    (float32 or float16); `ann_kind` ("ivf", "hnsw" or None) adds an approximate faiss index
    built with `ann_params` ("key=value,...", see search/ann.py), recorded in the manifest.

    Under torchrun (WORLD_SIZE > 1) every rank encodes its contiguous shard of the files and
    rank 0 gathers the shards in rank order and writes the index: the same index as one
    process. Other ranks return a summary with `rank` > 0 and write nothing.
    """
    start = time.perf_counter()
    root = Path(folder).expanduser().resolve()
    location = Path(out).expanduser()
    check_out_location(location)  # before the encoding, which may take hours
    if dtype not in FEATURE_DTYPES:
        raise CirError(f"--dtype {dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
    requested = None
    if ann_kind is not None and ann_kind != "none":
        requested = ann.parse_params(ann_kind, ann_params)
        if not faiss_available():
            raise CirError("--ann needs faiss (pip install faiss-cpu)")
    elif ann_params:
        raise CirError("--ann-params needs --ann ivf or --ann hnsw")
    entries = scan_folder(root)
    recipe = resolve_recipe_paths(recipe)
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    rank, world, started_dist = _distributed(device or recipe.device)
    try:
        if model is None:
            on = _rank_device(device or recipe.device, rank, world)
            model = load_recipe_model(recipe, ckpt, on)
        # Contiguous shards, so rank-order concatenation is the single-process order.
        lo, hi = rank * len(entries) // world, (rank + 1) * len(entries) // world
        tic = time.perf_counter()
        feats, ok, failed = encode_gallery(
            model,
            [root / e.path for e in entries[lo:hi]],
            batch_size or recipe.eval.batch_size,
            recipe.data.num_workers if num_workers is None else num_workers,
        )
        encode_seconds = time.perf_counter() - tic
        ok = [lo + i for i in ok]
        failed = {lo + i: reason for i, reason in failed.items()}
        if world > 1:
            feats, ok, failed = _gather_shards(feats, ok, failed, rank, world)
            if rank != 0:
                _barrier()
                return IndexSummary(location, 0, seconds=time.perf_counter() - start, rank=rank)
        summary = _finish_build(
            root, location, entries, model, recipe, ckpt, feats, ok, failed, dtype, ann_kind,
            requested,
        )
        if world > 1:
            _barrier()
    finally:
        if started_dist:
            from cir_cli.engine.distributed import shutdown_distributed

            shutdown_distributed()
    summary.seconds = time.perf_counter() - start
    summary.encode_seconds = encode_seconds
    return summary


def _distributed(device: str | None) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    import torch
    import torch.distributed as dist

    from cir_cli.engine.distributed import init_distributed

    started = not dist.is_initialized()
    info, _ = init_distributed(torch.device(device or "cpu"))
    return info.rank, info.world_size, started


def _rank_device(device: str | None, rank: int, world: int) -> str | None:
    if world > 1 and device is not None and device.startswith("cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _gather_shards(feats: np.ndarray, ok: list[int], failed: dict[int, str], rank: int, world: int):
    """Rank 0 receives every rank's (features, positions, failures), concatenated in rank order."""
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((feats, ok, failed), parts, dst=0)
    if rank != 0:
        return feats, ok, failed
    assert parts is not None
    arrays = [p[0] for p in parts if len(p[1])]
    merged = np.concatenate(arrays) if arrays else np.empty((0,), dtype=np.float32)
    all_ok = [i for p in parts for i in p[1]]
    all_failed = {i: r for p in parts for i, r in p[2].items()}
    return merged, all_ok, all_failed


def _finish_build(
    root: Path,
    location: Path,
    entries: list[FileEntry],
    model: CIRMethod,
    recipe: Recipe,
    ckpt: str | None,
    feats: np.ndarray,
    ok: list[int],
    failed: dict[int, str],
    dtype: str,
    ann_kind: str | None,
    requested: dict[str, int] | None,
) -> IndexSummary:
    if not ok:
        raise CirError(
            f"{root}: no readable images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
            f"; {len(failed)} file(s) could not be read)"
        )
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": _now(),
        "updated": _now(),
        "root": str(root),
        **provenance_record(model, recipe, ckpt),
        "files": [[entries[i].path, entries[i].size, entries[i].mtime_ns] for i in ok],
        "skipped": [
            [entries[i].path, entries[i].size, entries[i].mtime_ns, failed[i]]
            for i in sorted(failed)
        ],
    }
    if requested is not None:
        manifest["ann"] = {"kind": ann_kind, "requested": requested}
    write_index(location, manifest, feats, dtype)
    return IndexSummary(
        location=location,
        total=len(ok),
        encoded=[entries[i].path for i in ok],
        skipped=[(entries[i].path, failed[i]) for i in sorted(failed)],
    )


def update_index(
    folder: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    recipe: Recipe | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    model: CIRMethod | None = None,
) -> IndexSummary:
    """Re-encode only new or changed files (size or mtime differ), drop deleted ones.

    Files recorded as unreadable stay skipped until they change. The model is loaded only when
    something needs encoding.
    """
    start = time.perf_counter()
    index = load_index(index_path)
    resolved, ckpt = check_compatible(index, recipe, checkpoint)
    root = Path(folder).expanduser().resolve()
    entries = scan_folder(root)
    old_rows = {e.path: (e, i) for i, e in enumerate(index.files)}
    old_skipped = {e.path: (e, reason) for e, reason in index.skipped}

    to_encode: list[FileEntry] = []
    still_skipped: list[tuple[FileEntry, str]] = []
    for entry in entries:
        if entry.path in old_rows and old_rows[entry.path][0].stat_key() == entry.stat_key():
            continue
        prev = old_skipped.get(entry.path)
        if prev is not None and prev[0].stat_key() == entry.stat_key():
            still_skipped.append(prev)
            continue
        to_encode.append(entry)
    present = {e.path for e in entries}
    removed = [e.path for e in index.files if e.path not in present]

    feats = np.empty((0,), dtype=np.float32)
    ok: list[int] = []
    failed: dict[int, str] = {}
    encode_seconds = 0.0
    if to_encode:
        if model is None:
            model = load_recipe_model(resolved, ckpt, device)
        tic = time.perf_counter()
        feats, ok, failed = encode_gallery(
            model,
            [root / e.path for e in to_encode],
            batch_size or resolved.eval.batch_size,
            resolved.data.num_workers if num_workers is None else num_workers,
            description="updating index",
        )
        encode_seconds = time.perf_counter() - tic
    new_rows = {to_encode[i].path: (to_encode[i], r) for r, i in enumerate(ok)}
    # Unchanged files keep their stored rows (they were never put in `to_encode`).
    kept = [
        old_rows[e.path]
        for e in entries
        if e.path in old_rows and old_rows[e.path][0].stat_key() == e.stat_key()
    ]
    final = sorted(
        [(e.path, e, "old", row) for e, row in kept]
        + [(p, e, "new", row) for p, (e, row) in new_rows.items()]
    )
    # A changed file that is now unreadable leaves the index and is listed as skipped.
    skipped = sorted(
        still_skipped + [(to_encode[i], failed[i]) for i in failed], key=lambda x: x[0].path
    )
    summary = IndexSummary(
        location=index.location,
        total=len(final),
        encoded=[to_encode[i].path for i in ok],
        kept=len(kept),
        removed=removed,
        skipped=[(to_encode[i].path, failed[i]) for i in sorted(failed)],
        encode_seconds=encode_seconds,
    )
    unchanged = not to_encode and not removed and str(root) == index.manifest["root"]
    if unchanged and skipped == index.skipped:
        summary.seconds = time.perf_counter() - start
        return summary
    if not final:
        raise CirError(f"{root}: no readable images left; the index was not changed")
    shape = index.features.shape[1:] if index.features.shape[0] else feats.shape[1:]
    if feats.shape[0] and index.features.shape[0] and feats.shape[1:] != shape:
        raise CirError(
            f"{index.location}: new features have shape {feats.shape[1:]}, the index "
            f"{shape}; rebuild the index"
        )
    out = np.empty((len(final), *shape), dtype=np.float32)
    dtype = str(index.manifest["features"]["dtype"])
    old_take = [(pos, row) for pos, (_, _, src, row) in enumerate(final) if src == "old"]
    new_take = [(pos, row) for pos, (_, _, src, row) in enumerate(final) if src == "new"]
    if old_take:
        pos, rows = zip(*old_take, strict=True)
        out[list(pos)] = index.features[list(rows)]
    if new_take:
        pos, rows = zip(*new_take, strict=True)
        out[list(pos)] = feats[list(rows)]
    manifest = dict(index.manifest)
    manifest.update(
        {
            "updated": _now(),
            "root": str(root),
            "files": [[e.path, e.size, e.mtime_ns] for _, e, _, _ in final],
            "skipped": [[e.path, e.size, e.mtime_ns, reason] for e, reason in skipped],
        }
    )
    # Release the old map before its file is deleted (Windows cannot delete a mapped file).
    del index
    write_index(Path(index_path).expanduser(), manifest, out, dtype)
    summary.seconds = time.perf_counter() - start
    return summary
