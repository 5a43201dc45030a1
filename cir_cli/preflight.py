"""`--dry-run`: everything a command needs, checked in seconds, before a job waits in a queue.

Resolves the recipe and `latest`, checks the data root with the `cir prepare` checker (layout,
the splits the command reads, every image present), every weight / tokenizer / text file
(weights.py), that the output and cache folders are writable, free disk against the feature
cache's estimated size, optional packages and keys the recipe turns on, and the device. All
problems are collected and printed together; no model is built.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir_cli.data import DATASETS, recipe_categories, submission_names
from cir_cli.errors import CirError

# Bytes one image costs in the feature cache, per backbone architecture (what the methods
# cache: pooled features in fp32 for CLIP / BLIP towers; the frozen ViT's token grid in fp16
# for BLIP-2: 257 x 1408 x 2 B for ViT-g, 257 x 1024 x 2 B for ViT-L).
CACHE_BYTES_PER_IMAGE: dict[str, int] = {
    "RN50x4": 640 * 4,
    "ViT-L-14": 768 * 4,
    "ViT-H-14": 1024 * 4,
    "ViT-bigG-14": 1280 * 4,
    "openai/clip-vit-large-patch14": 768 * 4,
    "blip-base": 256 * 4,
    "blip2-vit-g": 257 * 1408 * 2,
    "blip2-vit-l": 257 * 1024 * 2,
}
# CaLa on CLIP also caches the layer-4 map (2560 x 9 x 9 at 288 px) in fp16.
CALA_CLIP_EXTRA = 2560 * 81 * 2
DEFAULT_BYTES_PER_IMAGE = 4096


@dataclass
class Preflight:
    command: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.lines.append(f"  ok       {what}")

    def bad(self, what: str) -> None:
        self.lines.append(f"  PROBLEM  {what}")
        self.problems.append(what)

    def info(self, what: str) -> None:
        self.lines.append(f"  info     {what}")


def _splits_needed(recipe: Any, command: str, split: str | None, benchmark: str | None) -> list:
    if command in ("finetune", "combiner"):
        zero_shot = recipe.method.name == "lincir"  # Phi trains on text only
        train = [] if zero_shot else [recipe.data.train_split]
        return list(dict.fromkeys([*train, recipe.eval.split]))
    if command == "validate":
        return [split or recipe.eval.split]
    if command == "submit":
        spec = DATASETS.get(benchmark or "")
        if spec is not None and spec.submission is not None:
            return [spec.submission.split_for(recipe.data.test_split)]
        return [recipe.data.test_split]
    return []


def _writable(folder: Path) -> tuple[bool, Path]:
    """Whether `folder` can be created / written (its nearest existing ancestor is writable)."""
    probe = folder.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK), probe


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cache_estimate(recipe: Any, images: int) -> int:
    per_image = CACHE_BYTES_PER_IMAGE.get(recipe.backbone.arch, DEFAULT_BYTES_PER_IMAGE)
    if recipe.method.name == "cala" and recipe.backbone.name == "open_clip":
        per_image += CALA_CLIP_EXTRA
    if recipe.data.cache_pixels:
        size = recipe.data.image_size or 288
        per_image += 3 * size * size * 4
    return per_image * images


def run_preflight(
    recipe: Any,
    command: str,
    checkpoint: str | None = None,
    split: str | None = None,
    benchmark: str | None = None,
    folder: Path | None = None,
    out: Path | None = None,
    resume: str | None = None,
) -> Preflight:
    """Check everything `command` will need; returns the report (lines + problems)."""
    from cir_cli.weights import problems as weight_problems
    from cir_cli.weights import recipe_inputs

    report = Preflight(command)
    report.ok(
        f"recipe {recipe.name}: method {recipe.method.name}, backbone {recipe.backbone.name} "
        f"{recipe.backbone.arch}, data {recipe.data.dataset} at {recipe.data.root}"
    )
    if resume is not None:
        manifest = Path(resume).expanduser() / "manifest.json"
        if manifest.is_file():
            report.ok(f"--resume {resume}: run folder with a manifest")
        else:
            report.bad(f"--resume {resume}: not a run folder (no manifest.json)")

    if command == "submit" and benchmark is not None:
        spec = DATASETS.get(benchmark)
        if spec is None or spec.submission is None:
            report.bad(f"benchmark {benchmark!r}: expected {submission_names()}")
        elif recipe.data.dataset != benchmark:
            report.bad(
                f'`cir submit {benchmark}` needs data.dataset = "{benchmark}"; {recipe.name} '
                f"has {recipe.data.dataset!r}"
            )
    if command == "combiner" and not hasattr_stage(recipe):
        report.bad(f"method {recipe.method.name} has no combiner stage (use `cir finetune`)")

    # -- data --------------------------------------------------------------------------------
    images = 0
    splits = _splits_needed(recipe, command, split, benchmark)
    if command == "index":
        if folder is None or not Path(folder).expanduser().is_dir():
            report.bad(f"image folder {folder}: not a folder")
        else:
            from cir_cli.search.storage import IMAGE_SUFFIXES

            images = sum(
                1
                for p in Path(folder).expanduser().rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
            )
            report.ok(f"image folder {folder}: {images:,} image file(s)")
        if out is not None and Path(out).expanduser().exists():
            report.bad(f"--out {out} exists (use --update to refresh it, or another name)")
    elif splits:
        images = _check_data(report, recipe, splits)

    # -- weights -----------------------------------------------------------------------------
    from cir_cli.workflows import resolve_refs

    stages = ("finetune",) if command in ("finetune", "combiner") else ("combiner", "finetune")
    try:
        recipe, checkpoint, notes = resolve_refs(recipe, checkpoint, stages, fetch=False)
        for note in notes:
            report.ok(note)
    except CirError as exc:
        report.bad(str(exc))
        recipe = recipe.model_copy(deep=True)
        if recipe.finetune.checkpoint == "latest":
            recipe.finetune.checkpoint = None
        checkpoint = None if checkpoint == "latest" else checkpoint
    items = recipe_inputs(recipe, checkpoint)
    bad = weight_problems(items)
    for item in items:
        if not item.required:
            continue
        text = f"{item.key} = {item.value or '(none)'}: {item.detail or item.status}"
        if item in bad:
            hint = ""
            entry = item.entry
            if entry is not None and entry.url and not entry.make and entry.url not in text:
                hint = f" (source: {entry.url})"
            report.bad(text + hint)
        else:
            report.ok(text)

    # -- output, cache, disk -----------------------------------------------------------------
    out_dir = Path(recipe.output.dir).expanduser()
    ok, probe = _writable(out_dir)
    (report.ok if ok else report.bad)(
        f"output.dir {out_dir}: " + ("writable" if ok else f"cannot write under {probe}")
    )
    cache_dir = Path(recipe.output.cache_dir or out_dir / ".cache").expanduser()
    ok, probe = _writable(cache_dir)
    if not ok:
        report.bad(f"feature cache {cache_dir}: cannot write under {probe}")
    elif images:
        need = cache_estimate(recipe, images)
        free = shutil.disk_usage(probe).free
        text = (
            f"feature cache {cache_dir}: ~{_human(need)} for {images:,} images (estimate), "
            f"{_human(free)} free"
        )
        (report.ok if free > need else report.bad)(text)

    # -- optional packages and keys the recipe turns on --------------------------------------
    log = recipe.logging
    if log.comet:
        if importlib.util.find_spec("comet_ml") is None:
            report.bad("logging.comet = true needs comet-ml: pip install 'cir-cli[comet]'")
        elif not log.comet_offline and not os.environ.get("COMET_API_KEY"):
            report.bad("logging.comet = true needs COMET_API_KEY (or logging.comet_offline)")
        else:
            report.ok("Comet logging available")
    if log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        report.bad("logging.tensorboard = true needs: pip install 'cir-cli[tensorboard]'")
    hf_sets = getattr(recipe.method, "hf_datasets", None)
    if command == "finetune" and hf_sets:
        if importlib.util.find_spec("datasets") is None:
            report.bad(f"method.hf_datasets ({', '.join(hf_sets)}) needs: pip install datasets")
        else:
            report.ok(f"method.hf_datasets: {len(hf_sets)} Hugging Face dataset(s)")

    # -- device ------------------------------------------------------------------------------
    _check_device(report, recipe.device)
    return report


def hasattr_stage(recipe: Any) -> bool:
    """Methods with a stage II Combiner (CLIP4Cir, BLIP4CIR)."""
    return recipe.method.name in ("clip4cir", "blip4cir")


def _check_data(report: Preflight, recipe: Any, splits: list[str]) -> int:
    from cir_cli.data.check import check_dataset, report_absent, report_problems

    data = recipe.data
    root = Path(data.root).expanduser()
    categories = recipe_categories(data.dataset, data.categories)
    try:
        dataset_report = check_dataset(
            data.dataset,
            root,
            splits=splits,
            categories=categories,
            verify_images=False,
            write_index=False,
        )
    except CirError as exc:
        report.bad(f"data.root: {exc}")
        return 0
    # Every split asked for here is one the command reads: absent is a problem (unlike in
    # `cir prepare`, where an absent split is only a note).
    problems = report_absent(dataset_report) + report_problems(dataset_report)
    for line in problems:
        report.bad(f"data {line}")
    images = 0
    for s in dataset_report.splits:
        if s.status == "ok":
            images += s.images
            report.ok(
                f"data {data.dataset} {s.label}: {s.queries:,} queries, {s.images:,} images"
                + ("" if not (s.missing or s.unreadable) else " (with problems)")
            )
    return images


def _nvidia_driver() -> bool:
    """Whether an NVIDIA driver is visible, without importing torch (seconds on a CPU node)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidiactl").exists()


def _check_device(report: Preflight, device: str) -> None:
    if device == "cpu":
        report.ok("device cpu")
        return
    if not _nvidia_driver():
        if device == "auto":
            report.ok("device auto -> cpu (no NVIDIA driver visible)")
        elif device.startswith("cuda"):
            report.bad(f"device {device}: no NVIDIA driver visible on this machine")
        else:
            report.ok(f"device {device}")
        return
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        report.ok(f"device auto -> {'cuda' if available else 'cpu'}")
        return
    try:
        resolved = torch.device(device)
    except RuntimeError:
        report.bad(f"device {device!r}: expected cpu, cuda, cuda:N or auto")
        return
    if resolved.type == "cuda":
        if not available:
            report.bad(f"device {device}: CUDA is not available on this machine")
            return
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            report.bad(f"device {device}: only {count} CUDA device(s)")
            return
        name = torch.cuda.get_device_name(resolved.index or 0)
        report.ok(f"device {device}: {name}")
    else:
        report.ok(f"device {device}")
