"""The index folder on disk: its format, reading it back, writing it atomically.

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
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import cir_cli.search.ann as ann
from cir_cli.errors import CirError
from cir_cli.io import atomic_path, read_json, require_field, write_text_atomic
from cir_cli.recipes import validate_recipe

if TYPE_CHECKING:
    import torch

    from cir_cli.config import Recipe

INDEX_FORMAT = "cir-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".cirindex"
MANIFEST = "manifest.json"
# Common still-image types PIL decodes out of the box (matched case-insensitively).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Feature storage: float16 halves the file and the page cache; scores are computed in float32.
FEATURE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class FileEntry:
    """One image file of the indexed folder: path relative to the root (POSIX), size, mtime."""

    path: str
    size: int
    mtime_ns: int

    def stat_key(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


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
        """The stored faiss approximate index (search/ann.py), with its recorded search params."""
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
        or spec.get("kind") not in ann.ANN_KINDS
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


def write_index(
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
