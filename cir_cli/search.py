"""Search your own images: gallery indexes (`cir index`) and composed queries (`cir search`).

Works for every registered method through the CIRMethod contract (methods/base.py): gallery
images go through `image_representation` -> `targets_from_representation` once, at indexing
time; a query image goes through `image_representation` -> `queries_from_representation` with
its text; ranking uses the method's own `score` via ranking.rank_gallery (exact, stable).

An index is a folder (`photos.cirindex/`):

* ``manifest.json`` - the commit marker and everything needed to trust the features: the
  resolved recipe, the checkpoint(s) with their SHA1 (and size/mtime, so an unchanged file is
  not re-hashed on every search), the preprocessing id, the image-tower cache key (provenance),
  the indexed root folder and one ``[relative path, size, mtime_ns]`` row per file (row i of the
  features), plus the files that could not be read, with the reason.
* ``features-<token>.npy`` - the (N, D) or (N, T, D) float32 target features, opened
  memory-mapped, so a 100k-image index costs no RAM until it is scored.

Writes are atomic: a new features file is written under a fresh name first, then manifest.json
is replaced atomically (io.atomic_path) and only then are unreferenced feature files deleted. A
reader therefore always sees a manifest and the features it names, even after a crash.

Unlike benchmark evaluation (where a missing image is an error, data/images.py), a user's folder
may hold broken files: they are skipped, recorded and listed in the summary.

Ranking is exact: torch matmul + top-k with the toolkit's tie rule (ranking.py). An exact faiss
flat index is available (`--backend faiss`, optional dependency) and returns the same list, but
it is not the default: building it per search costs more than the whole torch ranking (see
`rank` and benchmarks/bench_search.py).
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import html
import io
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cir_cli.ann import ANN_KINDS
from cir_cli.errors import CirError
from cir_cli.io import atomic_path, read_json, read_text, require_field, write_text_atomic

if TYPE_CHECKING:
    import torch

    from cir_cli.methods.base import CIRMethod
    from cir_cli.recipes import Recipe

INDEX_FORMAT = "cir-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".cirindex"
MANIFEST = "manifest.json"
# Common still-image types PIL decodes out of the box (matched case-insensitively).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Recipe keys that decide what the features mean; any other key (output dir, batch sizes,
# training hyper-parameters, data.root) may differ between indexing and search.
_MODEL_SECTIONS = ("method", "backbone")
_MODEL_DATA_KEYS = ("transform", "target_ratio", "image_size")
# Extra faiss candidates re-scored with torch, so float differences between the two libraries at
# the top-k boundary do not change which items are returned.
_FAISS_MARGIN = 32
# Feature storage: float16 halves the file and the page cache; scores are computed in float32.
FEATURE_DTYPES = ("float32", "float16")
# Bound on the (queries, candidates, D) float32 gather that re-scores faiss candidates (4 MiB).
_FAISS_BATCH_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Folder scanning


@dataclass(frozen=True)
class FileEntry:
    """One image file of the indexed folder: path relative to the root (POSIX), size, mtime."""

    path: str
    size: int
    mtime_ns: int

    def stat_key(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


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


# ---------------------------------------------------------------------------------------------
# Provenance: checkpoints and recipes


def _checkpoint_files(path: Path) -> list[Path]:
    """The file(s) whose content defines a checkpoint argument (a file, run dir or folder)."""
    if path.is_file():
        return [path]
    from cir_cli.runs import resolve_weights_file

    try:
        return [resolve_weights_file(path)]
    except CirError:
        # Another method's checkpoint folder (e.g. a save_pretrained layout): all of its files.
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise CirError(f"checkpoint {path}: an empty folder") from None
        return files


def checkpoint_record(path: str | os.PathLike[str], known: dict | None = None) -> dict:
    """{path, files: [[file, size, mtime_ns]], sha1} of a checkpoint argument.

    When `known` (a stored record) lists the same files with the same size and mtime, its SHA1
    is reused instead of re-reading gigabytes on every search.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise CirError(f"checkpoint not found: {p}")
    files = _checkpoint_files(p)
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if known is not None and known.get("files") == stats and known.get("sha1"):
        return {"path": str(p), "files": stats, "sha1": known["sha1"]}
    from cir_cli.checkpoints import sha1_file

    if len(files) == 1:
        sha = sha1_file(files[0])
    else:
        digest = hashlib.sha1()
        for f in files:
            digest.update(f.relative_to(p).as_posix().encode() + b"\0")
            digest.update(sha1_file(f).encode())
        sha = digest.hexdigest()
    return {"path": str(p), "files": stats, "sha1": sha}


def model_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """The flattened recipe keys that decide what the gallery features mean."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                flatten(f"{prefix}.{key}", value[key])
        else:
            out[prefix] = value

    for section in _MODEL_SECTIONS:
        flatten(section, recipe.get(section, {}))
    data = recipe.get("data", {})
    for key in _MODEL_DATA_KEYS:
        if key in data:
            out[f"data.{key}"] = data[key]
    return out


def _resolve_recipe_paths(recipe: Recipe) -> Recipe:
    """The recipe with finetune.checkpoint made absolute, so search works from any folder."""
    ckpt = recipe.finetune.checkpoint
    if not ckpt:
        return recipe
    copy = recipe.model_copy(deep=True)
    copy.finetune.checkpoint = str(Path(ckpt).expanduser().resolve())
    return copy


# ---------------------------------------------------------------------------------------------
# The index


@dataclass
class Index:
    """A loaded index: its manifest, files and memory-mapped features (row i = files[i])."""

    location: Path
    manifest: dict[str, Any]
    files: list[FileEntry]
    skipped: list[tuple[FileEntry, str]]
    features: np.ndarray
    _rows: dict[str, int] | None = field(default=None, init=False, repr=False)

    @property
    def root(self) -> Path:
        return Path(self.manifest["root"])

    @property
    def recipe_dict(self) -> dict[str, Any]:
        return self.manifest["recipe"]

    def recipe(self) -> Recipe:
        from cir_cli.recipes import validate_recipe

        return validate_recipe(self.recipe_dict, f"{self.location / MANIFEST} (recipe)")

    @property
    def checkpoint(self) -> dict | None:
        return self.manifest.get("checkpoint")

    def path_of(self, row: int) -> Path:
        return self.root / self.files[row].path

    def row_of(self, image: str | os.PathLike[str]) -> int:
        """Row of an image file in the index, -1 when it is not one of the indexed files."""
        try:
            rel = Path(image).expanduser().resolve().relative_to(self.root).as_posix()
        except ValueError:
            return -1
        if self._rows is None:
            self._rows = {e.path: i for i, e in enumerate(self.files)}
        return self._rows.get(rel, -1)

    def feature_tensor(self) -> torch.Tensor:
        import torch

        # The array is opened copy-on-write ("c"), so torch gets a writable view of the mapped
        # pages without copying them (a read-only map would make torch warn).
        return torch.from_numpy(self.features)

    @property
    def ann_spec(self) -> dict[str, Any] | None:
        """{"kind", "params", "requested", "file"} of the approximate index, None without one."""
        return self.manifest.get("ann")

    def ann_index(self):
        """The stored faiss approximate index (cir_cli.ann), with its recorded search params."""
        from cir_cli import ann

        spec = self.ann_spec
        if spec is None:
            raise CirError(
                f"{self.location}: no approximate index (build one with `cir index ... --ann ivf`)"
            )
        return ann.read(self.location / spec["file"], spec["kind"], spec["params"])


def gallery_dim(index: Index) -> int:
    """Vectors per image: 1 for (N, D) features, T for (N, T, D)."""
    return 1 if index.features.ndim == 2 else int(index.features.shape[1])


def _corrupt(location: Path, what: str) -> CirError:
    return CirError(
        f"{location}: corrupt index ({what}); rebuild it with `cir index <folder> --recipe ... "
        f"--out {location}`"
    )


def load_index(path: str | os.PathLike[str]) -> Index:
    """Open an index folder; one-line CirError when it is missing, foreign or corrupt."""
    location = Path(path).expanduser()
    if not location.exists():
        raise CirError(f"index not found: {location}")
    manifest_file = location / MANIFEST
    if not location.is_dir() or not manifest_file.is_file():
        raise CirError(
            f"{location}: not a cir index (expected a folder with {MANIFEST}, made by `cir index`)"
        )
    try:
        manifest = read_json(manifest_file, "index manifest")
    except CirError as exc:
        raise _corrupt(location, f"{MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise _corrupt(location, f"{MANIFEST} is not a {INDEX_FORMAT} manifest")
    if manifest.get("version") != INDEX_VERSION:
        raise CirError(
            f"{location}: index format version {manifest.get('version')!r} is not supported "
            f"(this cir reads version {INDEX_VERSION}); rebuild it with `cir index`"
        )
    try:
        files = [FileEntry(str(p), int(s), int(m)) for p, s, m in manifest["files"]]
        skipped = [
            (FileEntry(str(p), int(s), int(m)), str(r)) for p, s, m, r in manifest["skipped"]
        ]
        feat = manifest["features"]
        feat_file = location / str(feat["file"])
        shape = tuple(int(n) for n in feat["shape"])
        dtype = str(feat["dtype"])
        missing = [k for k in ("root", "recipe", "preprocessing") if k not in manifest]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(location, f"{MANIFEST} entry missing or malformed: {exc!r}") from None
    # Shapes used later (a wrong type there would be a TypeError far from the file).
    for key, kinds in (("root", str), ("recipe", dict), ("preprocessing", str),
                       ("checkpoint", (dict, type(None))), ("base_checkpoint", (dict, type(None)))):
        if key in manifest:
            try:
                require_field(manifest, key, kinds, manifest_file)
            except CirError as exc:
                raise _corrupt(location, str(exc)) from None
    for key in ("checkpoint", "base_checkpoint"):
        record = manifest.get(key)
        if isinstance(record, dict) and not all(
            isinstance(record.get(k), str) for k in ("path", "sha1")
        ):
            raise _corrupt(location, f"{MANIFEST} '{key}' needs string 'path' and 'sha1' entries")
    if Path(feat["file"]).name != feat["file"] or not feat_file.is_file():
        raise _corrupt(location, f"features file {feat['file']} is missing")
    try:
        features = np.load(feat_file, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _corrupt(location, f"{feat_file.name} is unreadable: {exc}") from None
    if dtype not in FEATURE_DTYPES:
        raise _corrupt(location, f"features dtype {dtype!r} (expected one of {FEATURE_DTYPES})")
    spec = manifest.get("ann")
    if spec is not None and (
        not isinstance(spec, dict)
        or spec.get("kind") not in ANN_KINDS
        or not isinstance(spec.get("params"), dict)
        or Path(str(spec.get("file"))).name != spec.get("file")
        or not (location / str(spec.get("file"))).is_file()
    ):
        raise _corrupt(location, f"approximate index entry {spec!r} malformed or file missing")
    if features.shape != shape or str(features.dtype) != dtype:
        raise _corrupt(
            location,
            f"{feat_file.name} holds {features.dtype}{list(features.shape)}, the manifest says "
            f"{dtype}{list(shape)}",
        )
    if not shape or shape[0] != len(files):
        raise _corrupt(location, f"{len(files)} files but {shape[:1]} feature rows")
    return Index(location, manifest, files, skipped, features)


def _manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one top-level key per line and one file per line (readable, diff-able)."""
    lines = []
    for key, value in manifest.items():
        if key in ("files", "skipped") and value:
            body = ",\n".join("    " + json.dumps(row) for row in value)
            lines.append(f'  "{key}": [\n{body}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def check_out_location(location: Path) -> None:
    """CirError unless `location` is free or an existing index (which is then replaced)."""
    if location.exists() and not location.is_dir():
        raise CirError(f"{location}: exists and is not a folder; choose another --out")
    if location.is_dir() and any(location.iterdir()) and not (location / MANIFEST).is_file():
        raise CirError(
            f"{location}: a non-empty folder that is not a cir index; choose another --out"
        )


def _write_index(
    location: Path, manifest: dict[str, Any], features: np.ndarray, dtype: str = "float32"
) -> None:
    """Write features (and the approximate index, when the manifest asks for one) under new
    names, commit the manifest, then delete stale files."""
    check_out_location(location)
    if dtype not in FEATURE_DTYPES:
        raise CirError(f"--dtype {dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
    location.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    name = f"features-{token}.npy"
    with atomic_path(location / name) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(features, dtype=np.dtype(dtype)))
    manifest["features"] = {
        "file": name,
        "shape": list(features.shape),
        "dtype": dtype,
    }
    keep = {name}
    spec = manifest.get("ann")
    if spec is not None:
        from cir_cli import ann

        # Built from the stored (possibly float16) values, so search re-scores what it indexed.
        stored = np.load(location / name, mmap_mode="r")
        params = ann.resolve_params(spec["kind"], spec.get("requested", {}), stored.shape[0])
        ann_name = f"ann-{token}.faiss"
        index = ann.build(np.asarray(stored, dtype=np.float32), spec["kind"], params)
        with atomic_path(location / ann_name) as tmp:
            ann.write(index, tmp)
        del index, stored
        manifest["ann"] = {**spec, "params": params, "file": ann_name}
        keep.add(ann_name)
    write_text_atomic(location / MANIFEST, _manifest_text(manifest))
    for stale in [*location.glob("features-*.npy"), *location.glob("ann-*.faiss")]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Encoding gallery images (skipping unreadable files)


class _FolderImages:
    """Map-style dataset: index -> (index, pixels or None, error message)."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from cir_cli.data.images import open_image

        try:
            return index, self.transform(open_image(self.paths[index])), ""
        except CirError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any transform failure means "skip this file"
            return index, None, f"cannot read image {self.paths[index]}: {type(exc).__name__}"


def _collate(items):
    import torch

    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, err) for i, x, err in items if x is None]
    idx = [i for i, _ in good]
    pixels = torch.stack([x for _, x in good]) if good else None
    return idx, pixels, failed


def _autocast(model: CIRMethod):
    from cir_cli.evaluation import _autocast as evaluation_autocast

    return evaluation_autocast(model)


def encode_gallery(
    model: CIRMethod,
    paths: Sequence[Path],
    batch_size: int = 32,
    num_workers: int = 0,
    description: str = "indexing",
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Target features of image files: (features of the readable ones, their positions, errors).

    Features come from `targets_from_representation(image_representation(pixels))`, the same
    functions evaluation.evaluate_split applies to a benchmark gallery.
    """
    import torch
    from torch.utils.data import DataLoader

    from cir_cli.progress import progress_bar

    dataset = _FolderImages(paths, model.preprocess)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=_collate,
    )
    chunks: list[np.ndarray] = []
    ok: list[int] = []
    failed: dict[int, str] = {}
    was_training = model.training
    model.eval()
    with progress_bar(description, len(dataset)) as advance, torch.no_grad(), _autocast(model):
        for idx, pixels, errors in loader:
            failed.update(errors)
            if pixels is not None:
                reps = model.image_representation(pixels.to(model.device))
                feats = model.targets_from_representation(reps)
                chunks.append(feats.float().cpu().numpy())
                ok.extend(idx)
            advance(len(idx) + len(errors))
    model.train(was_training)
    if chunks:
        return np.concatenate(chunks), ok, failed
    return np.empty((0,), dtype=np.float32), ok, failed


# ---------------------------------------------------------------------------------------------
# Building and updating


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


def _provenance(model: CIRMethod, recipe: Recipe, checkpoint: str | None) -> dict[str, Any]:
    from cir_cli import __version__

    base = recipe.finetune.checkpoint
    return {
        "recipe_name": recipe.name,
        "recipe": recipe.to_dict(),
        "method": model.describe(),
        "checkpoint": checkpoint_record(checkpoint) if checkpoint else None,
        "base_checkpoint": checkpoint_record(base) if base else None,
        "preprocessing": model.preprocessing_id(),
        # The image tower's content key (None while it trains): provenance for humans and tools.
        "image_cache_key": model.image_cache_key(),
        "cir_version": __version__,
    }


def _load_model(recipe: Recipe, checkpoint: str | None, device: str | None) -> CIRMethod:
    from cir_cli.methods.loading import load_model

    return load_model(recipe, checkpoint=checkpoint, device=device or recipe.device)


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
    notebooks); otherwise it is loaded with api.load_model. `dtype` is the feature storage
    (float32 or float16); `ann_kind` ("ivf", "hnsw" or None) adds an approximate faiss index
    built with `ann_params` ("key=value,...", see cir_cli.ann), recorded in the manifest.

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
        from cir_cli import ann

        requested = ann.parse_params(ann_kind, ann_params)
        if not faiss_available():
            raise CirError("--ann needs faiss (pip install faiss-cpu)")
    elif ann_params:
        raise CirError("--ann-params needs --ann ivf or --ann hnsw")
    entries = scan_folder(root)
    recipe = _resolve_recipe_paths(recipe)
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    rank, world, started_dist = _distributed(device or recipe.device)
    try:
        if model is None:
            model = _load_model(recipe, ckpt, _rank_device(device or recipe.device, rank, world))
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
        **_provenance(model, recipe, ckpt),
        "files": [[entries[i].path, entries[i].size, entries[i].mtime_ns] for i in ok],
        "skipped": [
            [entries[i].path, entries[i].size, entries[i].mtime_ns, failed[i]]
            for i in sorted(failed)
        ],
    }
    if requested is not None:
        manifest["ann"] = {"kind": ann_kind, "requested": requested}
    _write_index(location, manifest, feats, dtype)
    return IndexSummary(
        location=location,
        total=len(ok),
        encoded=[entries[i].path for i in ok],
        skipped=[(entries[i].path, failed[i]) for i in sorted(failed)],
    )


def check_compatible(
    index: Index,
    recipe: Recipe | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[Recipe, str | None]:
    """The (recipe, checkpoint) to load for `index`; CirError when the given ones do not match.

    Without arguments the index's own recipe and checkpoint are used (and the checkpoint file is
    checked against its recorded SHA1). A given recipe must agree on the keys that decide what
    features mean (model_keys); a given checkpoint must have the recorded content.
    """
    where = index.location
    if recipe is not None:
        want = model_keys(index.recipe_dict)
        got = model_keys(recipe.to_dict())
        # Keys the index's recipe lacks come from a newer schema (defaults added since it was
        # built): they cannot be compared, and the index's own recipe still loads without them.
        for key in sorted(want):
            if want[key] != got.get(key):
                raise CirError(
                    f"{where}: recipe mismatch: the index was built with {key} = "
                    f"{want[key]!r}, the recipe gives {got.get(key)!r} (omit --recipe to "
                    "use the index's, or rebuild the index)"
                )
        recipe = _resolve_recipe_paths(recipe)
    else:
        recipe = index.recipe()
    stored = index.checkpoint
    if checkpoint is None and stored is not None:
        checkpoint = stored["path"]
    if (checkpoint is None) != (stored is None):
        given = "none" if checkpoint is None else str(checkpoint)
        built = "none" if stored is None else stored["path"]
        raise CirError(
            f"{where}: checkpoint mismatch: the index was built with checkpoint {built}, "
            f"got {given}"
        )
    for label, rec, path in (
        ("checkpoint", stored, checkpoint),
        ("finetune.checkpoint", index.manifest.get("base_checkpoint"), recipe.finetune.checkpoint),
    ):
        if rec is None or path is None:
            if (rec is None) != (path is None):
                raise CirError(
                    f"{where}: {label} mismatch: index {rec['path'] if rec else 'none'}, "
                    f"given {path or 'none'}"
                )
            continue
        if not Path(path).expanduser().exists():
            raise CirError(f"{where}: {label} {path} (used to build the index) not found")
        known = rec if Path(path).expanduser().resolve() == Path(rec["path"]) else None
        now = checkpoint_record(path, known)
        if now["sha1"] != rec["sha1"]:
            raise CirError(
                f"{where}: {label} mismatch: {path} has SHA1 {now['sha1'][:12]}, the index was "
                f"built with SHA1 {rec['sha1'][:12]} ({rec['path']}); rebuild the index"
            )
    return recipe, str(checkpoint) if checkpoint is not None else None


def load_index_model(
    index: Index,
    recipe: Recipe | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> CIRMethod:
    """The model an index was built with (checked by check_compatible), in eval mode."""
    recipe, ckpt = check_compatible(index, recipe, checkpoint)
    model = _load_model(recipe, ckpt, device)
    if model.preprocessing_id() != index.manifest["preprocessing"]:
        raise CirError(
            f"{index.location}: preprocessing mismatch: index {index.manifest['preprocessing']}, "
            f"model {model.preprocessing_id()}"
        )
    return model


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
            model = _load_model(resolved, ckpt, device)
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
    _write_index(Path(index_path).expanduser(), manifest, out, dtype)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# Queries and ranking


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image and a modification text (+ an optional target)."""

    image: Path
    text: str
    target: Path | None = None


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    path: Path


@dataclass
class QueryResult:
    query: Query
    hits: list[Hit]
    # 1-based rank of the query's target within the returned hits (None: not found in top-k or
    # no target given).
    target_rank: int | None = None
    # 1-based rank of the target in the whole gallery (also beyond k); None without a target
    # or when the target is not in the index.
    gallery_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": str(self.query.image),
            "text": self.query.text,
            "results": [{"rank": h.rank, "score": h.score, "path": str(h.path)} for h in self.hits],
        }
        if self.query.target is not None:
            out["target"] = str(self.query.target)
            out["target_rank"] = self.target_rank
            out["target_rank_in_gallery"] = self.gallery_rank
        return out


def read_queries(path: str | os.PathLike[str]) -> list[Query]:
    """Queries from a CSV (columns image,text[,target]; header optional) or JSONL file
    (one {"image", "text"[, "target"]} object per line; a .json array of them works too).

    Relative image paths are resolved against the queries file's folder, so a file travels with
    the images it names.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CirError(f"queries file not found: {file}")
    base = file.resolve().parent
    rows: list[tuple[int, dict[str, Any]]] = []
    text = read_text(file, "queries file", encoding="utf-8-sig")
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        # A JSON array of {"image", "text"} objects (what json.dump of a list writes).
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CirError(f"{file}: not valid JSON: {exc}") from None
        for number, record in enumerate(records, 1):
            if not isinstance(record, dict):
                raise CirError(f"{file}: entry {number}: expected an object with image and text")
            rows.append((number, record))
    elif file.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CirError(f"{file}:{lineno}: not a JSON object per line: {exc}") from None
            if not isinstance(record, dict):
                raise CirError(f"{file}:{lineno}: expected a JSON object with image and text")
            rows.append((lineno, record))
    elif file.suffix.lower() in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
        reader = list(csv.reader(io.StringIO(text), delimiter=delimiter))
        header = ["image", "text", "target"]
        start = 0
        if reader and [c.strip().lower() for c in reader[0][:2]] == ["image", "text"]:
            header = [c.strip().lower() for c in reader[0]]
            start = 1
        for lineno, cells in enumerate(reader[start:], start + 1):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) < 2:
                raise CirError(f"{file}:{lineno}: expected image,text[,target], got {cells!r}")
            rows.append((lineno, dict(zip(header, cells, strict=False))))
    else:
        raise CirError(f"{file}: unknown queries format {file.suffix!r}; expected .csv or .jsonl")
    queries = []
    for lineno, record in rows:
        image, qtext = record.get("image"), record.get("text")
        if not isinstance(image, str) or not image.strip() or not isinstance(qtext, str):
            raise CirError(f"{file}:{lineno}: needs an 'image' path and a 'text' string")
        target = record.get("target")
        queries.append(
            Query(
                base / Path(image.strip()).expanduser(),
                qtext,
                base / Path(target.strip()).expanduser() if target and target.strip() else None,
            )
        )
    if not queries:
        raise CirError(f"{file}: no queries (expected image,text per line)")
    return queries


def check_query_images(queries: Sequence[Query]) -> None:
    """CirError naming the first missing query image (checked before any model work)."""
    for n, query in enumerate(queries, 1):
        if not query.image.is_file():
            where = f" (query {n})" if len(queries) > 1 else ""
            raise CirError(f"query image {query.image} not found{where}")


def encode_queries(
    model: CIRMethod, queries: Sequence[Query], batch_size: int = 32
) -> torch.Tensor:
    """Query features: `queries_from_representation(image_representation(pixels), texts)`."""
    import torch

    from cir_cli.data.images import open_image
    from cir_cli.progress import progress_bar

    check_query_images(queries)
    out = []
    was_training = model.training
    model.eval()
    with (
        progress_bar("queries", len(queries)) as advance,
        torch.no_grad(),
        _autocast(model),
    ):
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            pixels = torch.stack([model.preprocess(open_image(q.image)) for q in batch])
            reps = model.image_representation(pixels.to(model.device))
            out.append(model.queries_from_representation(reps, [q.text for q in batch]))
            advance(len(batch))
    model.train(was_training)
    return torch.cat(out)


def _uses_inner_product(model: CIRMethod) -> bool:
    from cir_cli.methods.base import CIRMethod

    return type(model).score is CIRMethod.score


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def rank_faiss(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    index: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product with faiss, in the toolkit's order (higher score, lower index).

    Without `index` an exact flat index is built, and the result equals ranking.rank_gallery
    unless more than the margin of items tie with the k-th score to the last float bit. With a
    prebuilt `index` (an approximate one, cir_cli.ann) the candidates are whatever it finds.
    faiss proposes k + margin candidates per query; they are re-scored with torch and ordered
    by the tie rule. Queries go through in batches so the (batch, m, D) re-scoring gather stays
    bounded (_FAISS_BATCH_ELEMENTS), whatever the number of queries. Approximate indexes may
    find fewer than m candidates: the missing ones are -1 with score -inf, sorted last.
    """
    import torch

    g = gallery.detach().cpu()
    if g.dtype != torch.float32:
        g = g.float()
    n, d = g.shape
    has_exclusion = exclude is not None and bool((exclude >= 0).any())
    length = min(k, n - int(has_exclusion))
    m = min(n, k + 1 + _FAISS_MARGIN)
    if index is None:
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(g.numpy()))
    q_all = queries.detach().cpu().float()
    batch = max(1, _FAISS_BATCH_ELEMENTS // (m * d))
    out_idx: list[torch.Tensor] = []
    out_scores: list[torch.Tensor] = []
    for start in range(0, q_all.shape[0], batch):
        q = q_all[start : start + batch]
        _, found = index.search(np.ascontiguousarray(q.numpy()), m)
        # Candidates in index order (-1 last), then a stable sort by score: (higher, lower index).
        cand = torch.from_numpy(found).long()
        missing = cand < 0
        cand = torch.where(missing, torch.full_like(cand, n), cand).sort(dim=1).values
        missing = cand >= n
        rows = g[cand.clamp(max=n - 1)]
        scores = torch.einsum("qd,qmd->qm", q, rows)
        del rows
        scores[missing] = float("-inf")
        cand[missing] = -1
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        cand = cand.gather(1, order)
        if has_exclusion:
            assert exclude is not None
            keep = cand != exclude[start : start + q.shape[0]].view(-1, 1)
            # Rows whose excluded item is not among the candidates drop their last one instead.
            keep[keep.all(dim=1), -1] = False
            cand = cand[keep].view(q.shape[0], m - 1)
            scores = scores[keep].view(q.shape[0], m - 1)
        out_idx.append(cand[:, :length])
        out_scores.append(scores[:, :length])
    if not out_idx:
        return torch.empty((0, length), dtype=torch.long), torch.empty((0, length))
    return torch.cat(out_idx), torch.cat(out_scores)


def rank(
    model: CIRMethod,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
    ann_index: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, scores) of the top-k gallery rows per query, best first.

    backend "ann": the prebuilt approximate faiss index `ann_index` (cir_cli.ann) proposes
    candidates, re-scored exactly; results are approximate (see benchmarks/bench_rank.py).

    backend "torch": ranking.rank_gallery with the method's score (exact, stable). "faiss":
    rank_faiss (exact flat index; inner-product methods only; faiss must be installed). "auto"
    is torch: a `cir search` process would have to build the faiss index on every call, and
    that alone costs more than torch's matmul + top-k over the memory-mapped features
    (benchmarks/bench_search.py: 100k x 256-d, one query, 1 thread: torch 31 ms, faiss 231 ms
    per search, 14 ms with a prebuilt index; at 100 queries torch is faster even prebuilt).
    """
    from cir_cli.ranking import rank_gallery

    if backend not in ("auto", "torch", "faiss", "ann"):
        raise CirError(f"--backend {backend!r}: expected auto, torch, faiss or ann")
    if backend == "ann":
        if ann_index is None:
            raise CirError("--backend ann: the index has no approximate index (cir index --ann)")
        return rank_faiss(queries, gallery, k, exclude, index=ann_index)
    if backend == "faiss":
        if not faiss_available():
            raise CirError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
        if gallery.dim() != 2 or not _uses_inner_product(model):
            raise CirError(f"--backend faiss: method {model.name} does not score by inner product")
        return rank_faiss(queries, gallery, k, exclude)
    result = rank_gallery(queries, gallery, k, exclude=exclude, score_fn=model.score)
    return result.indices, result.scores


def search(
    index: Index,
    model: CIRMethod,
    queries: Sequence[Query],
    k: int = 12,
    exclude_query: bool = False,
    backend: str = "auto",
    batch_size: int = 32,
) -> list[QueryResult]:
    """Rank the index's gallery for each query; the query image itself is dropped on request."""
    import torch

    if k < 1:
        raise CirError(f"-k {k}: expected a positive number of results")
    if backend == "auto" and index.ann_spec is not None:
        backend = "ann"  # built on purpose for a gallery too large for exact search
    ann_index = None
    if backend == "ann":
        if gallery_dim(index) != 1:
            raise CirError(f"--backend ann: {index.location} holds multi-vector features")
        ann_index = index.ann_index()
    features = encode_queries(model, queries, batch_size)
    # float16 storage is scored in float32 (CPU matmul has no fast float16 path).
    gallery = index.feature_tensor().to(model.device, torch.float32)
    exclude = None
    if exclude_query:
        exclude = torch.tensor([index.row_of(q.image) for q in queries], dtype=torch.long)
    indices, scores = rank(model, features, gallery, k, exclude, backend, ann_index)
    results = []
    for qi, query in enumerate(queries):
        rows = indices[qi].tolist()
        # An approximate index may find fewer than k items: its -1 padding is not a hit.
        hits = [
            Hit(r + 1, float(s), index.path_of(i))
            for r, (i, s) in enumerate(zip(rows, scores[qi].tolist(), strict=True))
            if i >= 0
        ]
        target_rank = None
        if query.target is not None:
            trow = index.row_of(query.target)
            if trow >= 0 and trow in rows:
                target_rank = rows.index(trow) + 1
        results.append(QueryResult(query, hits, target_rank, target_rank))
    _ranks_beyond_k(index, model, queries, features, gallery, exclude, results)
    return results


def _ranks_beyond_k(index, model, queries, features, gallery, exclude, results) -> None:
    """The gallery rank of targets outside the top k (one exact count per query, no sort)."""
    import torch

    from cir_cli.ranking import target_ranks

    todo = []
    for qi, (query, result) in enumerate(zip(queries, results, strict=True)):
        if query.target is None or result.target_rank is not None:
            continue
        trow = index.row_of(query.target)
        if trow < 0 or (exclude is not None and int(exclude[qi]) == trow):
            continue
        todo.append((qi, trow))
    if not todo:
        return
    rows = torch.tensor([qi for qi, _ in todo], dtype=torch.long)
    ranks = target_ranks(
        features[rows],
        gallery,
        torch.tensor([t for _, t in todo], dtype=torch.long),
        exclude=None if exclude is None else exclude[rows],
        score_fn=model.score,
    )
    for (qi, _), rank0 in zip(todo, ranks.tolist(), strict=True):
        results[qi].gallery_rank = int(rank0) + 1


def recall_at(results: Sequence[QueryResult], ks: Sequence[int]) -> dict[int, float]:
    """Recall@k in percent over the queries with a target (k <= the number of hits asked)."""
    labelled = [r for r in results if r.query.target is not None]
    if not labelled:
        return {}
    return {
        k: 100.0
        * sum(r.target_rank is not None and r.target_rank <= k for r in labelled)
        / len(labelled)
        for k in ks
    }


# ---------------------------------------------------------------------------------------------
# Output


def write_results(results: Sequence[QueryResult], path: str | os.PathLike[str]) -> Path:
    """One row per query: .jsonl (objects as in --json) or .csv (image, text, [target,
    target_rank,] then path_1, score_1, ... path_k, score_k)."""
    out = Path(path).expanduser()
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        body = "".join(json.dumps(r.to_dict()) + "\n" for r in results)
        write_text_atomic(out, body)
        return out
    if suffix != ".csv":
        raise CirError(f"--output {out}: expected a .csv or .jsonl file name")
    k = max((len(r.hits) for r in results), default=0)
    labelled = any(r.query.target is not None for r in results)
    header = ["image", "text"] + (["target", "target_rank"] if labelled else [])
    for i in range(1, k + 1):
        header += [f"path_{i}", f"score_{i}"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        row: list[Any] = [str(r.query.image), r.query.text]
        if labelled:
            row += [str(r.query.target or ""), r.target_rank or ""]
        for h in r.hits:
            row += [str(h.path), f"{h.score:.6f}"]
        writer.writerow(row)
    write_text_atomic(out, buf.getvalue())
    return out


def thumbnail_jpeg(path: Path, size: int) -> bytes | None:
    """A JPEG of `path` fitted into size x size (None when the file cannot be read any more)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a deleted/broken file becomes a placeholder tile
        return None
    return buf.getvalue()


def thumbnail_uri(path: Path, size: int) -> str | None:
    """thumbnail_jpeg as a data: URI, for pages that must open without the original files."""
    jpeg = thumbnail_jpeg(path, size)
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(
        "ascii"
    )


def html_page_head(title: str, subtitle: str, css: str) -> list[str]:
    """The opening of a self-contained page (inline CSS), title and subtitle escaped."""
    esc = html.escape
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{css}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="meta">{esc(subtitle)}</div>' if subtitle else "",
    ]


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;
background:#f6f7f9;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin-bottom:16px}
section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;margin-bottom:18px}
.query{display:flex;gap:16px;align-items:center;margin-bottom:12px}
.query img{width:160px;height:160px;object-fit:contain;background:#eee;border:3px solid #3a6ee8;
border-radius:6px}
.text{font-size:18px} .text b{color:#3a6ee8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
figure{margin:0;background:#fafafa;border:1px solid #e2e2e2;border-radius:6px;padding:6px}
figure.target{border:3px solid #1a9c46}
figure img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.missing{width:100%;aspect-ratio:1;background:#eee;display:flex;align-items:center;
justify-content:center;color:#999}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}
.rank{font-weight:bold} .score{color:#666}
"""


def render_html(
    results: Sequence[QueryResult],
    out: str | os.PathLike[str],
    title: str = "cir search",
    thumb_size: int = 256,
    subtitle: str = "",
) -> Path:
    """A self-contained HTML contact sheet: per query, the image, the text and the top-k hits.

    Every image is inlined as a base64 JPEG thumbnail, and the CSS is inline, so the page opens
    anywhere (mail it, open it from another machine) without the original files.
    """
    esc = html.escape
    parts = html_page_head(title, subtitle, _CSS)
    for qi, result in enumerate(results, 1):
        q = result.query
        uri = thumbnail_uri(q.image, thumb_size)
        img = f'<img src="{uri}" alt="query image">' if uri else '<div class="missing">?</div>'
        parts.append(f'<section><div class="query">{img}<div>')
        parts.append(f'<div class="meta">query {qi}: {esc(str(q.image))}</div>')
        parts.append(f'<div class="text"><b>+</b> &ldquo;{esc(q.text)}&rdquo;</div>')
        if q.target is not None:
            found = f"rank {result.target_rank}" if result.target_rank else "not in the top-k"
            parts.append(f'<div class="meta">target {esc(q.target.name)}: {found}</div>')
        parts.append('</div></div><div class="grid">')
        target_row = str(q.target.resolve()) if q.target is not None else None
        for hit in result.hits:
            uri = thumbnail_uri(hit.path, thumb_size)
            tile = (
                f'<img src="{uri}" alt="{esc(hit.path.name)}" loading="eager">'
                if uri
                else '<div class="missing">missing</div>'
            )
            cls = ' class="target"' if target_row and str(hit.path.resolve()) == target_row else ""
            parts.append(
                f'<figure{cls}>{tile}<figcaption><span class="rank">#{hit.rank}</span> '
                f'<span class="score">{hit.score:.3f}</span><br>{esc(hit.path.name)}'
                "</figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    out_path = Path(out).expanduser()
    write_text_atomic(out_path, "\n".join(p for p in parts if p))
    return out_path
