"""The `cir prepare` dataset check.

`check_dataset` loads every split present under a root, counts queries and gallery images,
finds missing or unreadable images and writes a small JSON index. Output formatting is left
to the CLI (no rich here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cir_cli.data import get_dataset
from cir_cli.data.annotations import require_root
from cir_cli.errors import CirError
from cir_cli.io import write_json_atomic

INDEX_NAME = ".cir_index.json"
INDEX_FORMAT = "cir-index/1"
# How many names the index and the printed problems show; the report keeps the full lists.
EXAMPLES = 5

# ---------------------------------------------------------------------------------------------
# Dataset check


@dataclass
class SplitReport:
    """One split (and category) of a dataset: its counts and image problems."""

    split: str
    category: str = ""
    # "ok" when loaded, "absent" when its annotation files are not there (see `reason`).
    status: str = "ok"
    reason: str = ""
    queries: int = 0
    gallery: int = 0
    images: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.split + (f"/{self.category}" if self.category else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split": self.split, "category": self.category}
        out["status"] = self.status
        if self.status != "ok":
            out["reason"] = self.reason
            return out
        out.update(
            queries=self.queries,
            gallery=self.gallery,
            images=self.images,
            missing=len(self.missing),
            unreadable=len(self.unreadable),
            missing_examples=self.missing[:EXAMPLES],
            unreadable_examples=self.unreadable[:EXAMPLES],
        )
        return out


@dataclass
class DatasetReport:
    dataset: str
    root: Path
    created: str
    verify_images: bool
    splits: list[SplitReport]
    # Unique files over all splits (a FashionIQ image can belong to several splits).
    missing_files: list[Path] = field(default_factory=list)
    unreadable_files: dict[Path, str] = field(default_factory=dict)
    index_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.missing_files and not self.unreadable_files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "dataset": self.dataset,
            "root": str(self.root),
            "created": self.created,
            "verify_images": self.verify_images,
            "missing_images": len(self.missing_files),
            "unreadable_images": len(self.unreadable_files),
            "splits": [s.to_json() for s in self.splits],
        }


def image_problem(path: Path, verify: bool) -> tuple[str, str] | None:
    """None when `path` is a usable image, else ("missing" | "unreadable", reason)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ("missing", "no such file")
    except OSError as e:
        return ("unreadable", str(e))
    if size == 0:
        return ("unreadable", "empty file")
    if not verify:
        return None
    from PIL import Image  # deferred: only the verifying check needs Pillow

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable", by design
        return ("unreadable", f"{type(e).__name__}: {e}")
    return None


ProgressFn = Callable[[int, int], None]


def _scan_files(
    paths: Sequence[Path], verify: bool, workers: int, progress: ProgressFn | None
) -> dict[Path, tuple[str, str]]:
    """Problems of every path, in chunks so progress and thread hand-offs stay cheap.

    Threads pay off on network storage, where each open waits on a round trip; chunks keep
    the per-task overhead of the pool negligible next to ~100k tiny checks.
    """
    problems: dict[Path, tuple[str, str]] = {}
    total = len(paths)
    chunk = 512
    chunks = [paths[i : i + chunk] for i in range(0, total, chunk)]

    def run(part: Sequence[Path]) -> list[tuple[Path, tuple[str, str] | None]]:
        return [(p, image_problem(p, verify)) for p in part]

    if progress:
        progress(0, total)
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for results in pool.map(run, chunks):
            for path, problem in results:
                if problem is not None:
                    problems[path] = problem
            done += len(results)
            if progress:
                progress(done, total)
    return problems


def check_dataset(
    dataset: str,
    root: Path,
    splits: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    verify_images: bool = True,
    progress: ProgressFn | None = None,
    out: Path | None = None,
    write_index: bool = True,
    workers: int = 4,
) -> DatasetReport:
    """Load every split present under `root`, count it and check its images.

    A split (or FashionIQ category) whose annotation files are absent is reported as absent,
    not an error (CIRR's train captions are often not downloaded); malformed annotations and
    an unknown dataset/split raise CirError, as does a root with no annotations at all.
    `verify_images` adds PIL's `verify()` to the existence / empty-file check; `workers`
    threads check files (4: helps on network storage, costs little on a local disk, where
    PIL's Python-level parsing holds the GIL). The index is
    written atomically to `out` or ROOT/.cir_index.json unless `write_index` is False.
    """
    spec = get_dataset(dataset)
    root = Path(root)
    require_root(root, dataset)
    wanted = list(splits) if splits else list(spec.splits)
    for s in wanted:
        if s not in spec.splits:
            raise CirError(
                f"unknown {dataset} split '{s}'; expected one of {', '.join(spec.splits)}"
            )

    reports: list[SplitReport] = []
    loaded = []  # (SplitReport, CIRSplit) pairs whose images still need checking
    for split in wanted:
        # Rows in the categories' order, absent ones included, filled in as they load.
        rows: dict[str, SplitReport | None] = {}
        for category, files in spec.files(root, split, categories):
            absent = [f for f in files if not f.is_file()]
            if absent:
                reason = "not found: " + ", ".join(str(f) for f in absent)
                rows[category] = SplitReport(split, category, status="absent", reason=reason)
            else:
                rows[category] = None
        present = [c for c, row in rows.items() if row is None]
        if present:
            for cir_split in spec.load(root, split, [c for c in present if c] or None):
                rep = SplitReport(
                    split,
                    cir_split.subset,
                    queries=len(cir_split.triplets),
                    gallery=len(cir_split.gallery),
                    images=len(cir_split.image_names()),
                )
                rows[cir_split.subset] = rep
                loaded.append((rep, cir_split))
        reports.extend(r for r in rows.values() if r is not None)
    if not loaded:
        raise CirError(f"no {dataset} annotations found under {root}; expected {spec.layout}")

    unique: dict[Path, None] = {}
    for _, cir_split in loaded:
        for name in cir_split.image_names():
            unique.setdefault(cir_split.image_paths[name])
    problems = _scan_files(list(unique), verify_images, workers, progress)
    for rep, cir_split in loaded:
        for name in cir_split.image_names():
            problem = problems.get(cir_split.image_paths[name])
            if problem is not None:
                (rep.missing if problem[0] == "missing" else rep.unreadable).append(name)

    report = DatasetReport(
        dataset=dataset,
        root=root,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        verify_images=verify_images,
        splits=reports,
        missing_files=[p for p, (kind, _) in problems.items() if kind == "missing"],
        unreadable_files={p: why for p, (kind, why) in problems.items() if kind == "unreadable"},
    )
    if write_index:
        index = Path(out) if out is not None else root / INDEX_NAME
        write_json_atomic(index, report.to_json())  # a refused write: one CirError line
        report.index_path = index
    return report


REPORT_COLUMNS = (
    "split",
    "category",
    "status",
    "queries",
    "gallery",
    "images",
    "missing",
    "unreadable",
)


def format_report(report: DatasetReport) -> list[tuple[str, ...]]:
    """Table rows (strings, in REPORT_COLUMNS order) for the CLI to print."""
    rows: list[tuple[str, ...]] = []
    for s in report.splits:
        if s.status != "ok":
            rows.append((s.split, s.category, s.status, "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                s.split,
                s.category,
                "ok" if not (s.missing or s.unreadable) else "problems",
                f"{s.queries:,}",
                f"{s.gallery:,}",
                f"{s.images:,}",
                f"{len(s.missing):,}",
                f"{len(s.unreadable):,}",
            )
        )
    return rows


def report_absent(report: DatasetReport) -> list[str]:
    """One line per split (or category) whose annotation files are not there: a note, not a
    problem (a zero-shot user downloads only val and test; see `cir prepare --require`)."""
    return [f"{s.label}: absent ({s.reason})" for s in report.splits if s.status != "ok"]


def missing_required(report: DatasetReport, required: Sequence[str]) -> list[str]:
    """The `required` splits that are absent (any of their categories)."""
    absent = {s.split for s in report.splits if s.status != "ok"}
    return [s for s in dict.fromkeys(required) if s in absent]


def report_problems(report: DatasetReport) -> list[str]:
    """One line per present split with missing or unreadable images (examples)."""
    lines: list[str] = []
    for s in report.splits:
        if s.status != "ok":
            continue
        for kind, names in (("missing", s.missing), ("unreadable", s.unreadable)):
            if names:
                more = f" (+{len(names) - EXAMPLES} more)" if len(names) > EXAMPLES else ""
                lines.append(
                    f"{s.label}: {len(names)} {kind} image(s): "
                    + ", ".join(names[:EXAMPLES])
                    + more
                )
    return lines
