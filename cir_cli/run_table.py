"""`cir runs`: what is in a folder of run folders, from the files each run writes.

manifest.json (recipe, command, created), progress.json (training: step, planned steps, pid /
host, finished), metrics.csv / metrics.json (validations), checkpoints/best's sidecar. Standard
library only: listing hundreds of runs stays instant.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cir_cli.data import DATASETS
from cir_cli.engine.run_log import flatten
from cir_cli.errors import CirError

# A run whose progress.json has not moved for this long, on another host, counts as interrupted.
STALE_SECONDS = 30 * 60


@dataclass
class RunInfo:
    path: Path
    recipe: str
    stage: str
    started: str
    step: int | None
    total_steps: int | None
    status: str
    selection_metric: str | None
    best: float | None
    best_epoch: int | None
    base_checkpoint: str | None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return []
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value) if value not in ("", None) else None
            except ValueError:
                parsed[key] = value
        out.append(parsed)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(progress: dict[str, Any] | None, run_dir: Path) -> str:
    if progress is None:
        return "finished" if (run_dir / "checkpoints" / "best").exists() else "interrupted"
    if progress.get("finished"):
        return "finished"
    if progress.get("host") == platform.node() and isinstance(progress.get("pid"), int):
        return "running" if _alive(progress["pid"]) else "interrupted"
    try:
        updated = _dt.datetime.fromisoformat(progress["updated"])
        age = (_dt.datetime.now(_dt.UTC) - updated).total_seconds()
    except (KeyError, TypeError, ValueError):
        return "interrupted"
    return "running" if age < STALE_SECONDS else "interrupted"


def _last_step(history: list[dict[str, Any]]) -> int | None:
    steps = [r["step"] for r in history if isinstance(r.get("step"), float)]
    return int(max(steps)) if steps else None


def run_info(run_dir: Path) -> RunInfo | None:
    """What one run folder holds (None: not a run folder)."""
    manifest = _read_json(run_dir / "manifest.json")
    if manifest is None:
        return None
    recipe = manifest.get("recipe") or {}
    command = str(manifest.get("command", "?"))
    progress = _read_json(run_dir / "progress.json")
    history = _read_csv(run_dir / "metrics.csv")
    training = command in ("finetune", "combiner")
    metric = (progress or {}).get("selection_metric") or (recipe.get("eval") or {}).get(
        "selection_metric"
    )
    if metric is None and training and history:
        # A run from before progress.json: the dataset's default.
        spec = DATASETS.get((recipe.get("data") or {}).get("dataset"))
        metric = spec.selection_metric if spec else None
    best = best_epoch = None
    if metric and history:
        rows = [r for r in history if isinstance(r.get(metric), float)]
        rows = [r for r in rows if math.isfinite(r[metric])]
        if rows:
            top = max(rows, key=lambda r: r[metric])  # max() keeps the first of equal values
            best = top[metric]
            best_epoch = int(top["epoch"]) if isinstance(top.get("epoch"), float) else None
    elif not training:
        metrics = _read_json(run_dir / "metrics.json") or {}
        metric = metric or next(
            (k for k in ("mean_r5_rs1", "average_recall", "map_at10") if k in metrics), None
        )
        best = metrics.get(metric) if metric else None
    if training:
        base = (recipe.get("finetune") or {}).get("checkpoint")
        status = _status(progress, run_dir)
    else:
        ckpt = manifest.get("checkpoint") or {}
        base = ckpt.get("checkpoint") or ckpt.get("finetune") if isinstance(ckpt, dict) else ckpt
        done = (run_dir / "metrics.json").is_file() or any(run_dir.glob("*submission*.json"))
        status = "finished" if done else "interrupted"
    return RunInfo(
        path=run_dir,
        recipe=recipe.get("name") or "?",
        stage=command,
        started=str(manifest.get("created", "?")),
        step=(progress or {}).get("step", _last_step(history) if training else None),
        total_steps=(progress or {}).get("total_steps"),
        status=status,
        selection_metric=metric,
        best=best,
        best_epoch=best_epoch,
        base_checkpoint=str(base) if base else None,
    )


def list_runs(output_dir: str | os.PathLike[str], recipe: str | None = None) -> list[RunInfo]:
    root = Path(output_dir).expanduser()
    if not root.is_dir():
        raise CirError(f"--output-dir {root}: no such folder")
    infos = [info for p in sorted(root.iterdir()) if p.is_dir() and (info := run_info(p))]
    if recipe:
        infos = [i for i in infos if i.recipe == recipe]
    return sorted(infos, key=lambda i: (i.started, i.path.name))


def _short(text: str | None, width: int) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def format_table(infos: list[RunInfo]) -> list[str]:
    header = ("run", "recipe", "stage", "started", "steps", "status", "best", "base checkpoint")
    rows = []
    for i in infos:
        steps = "-" if i.step is None else f"{i.step}/{i.total_steps or '?'}"
        best = "-"
        if i.best is not None:
            at = f" @ epoch {i.best_epoch}" if i.best_epoch is not None else ""
            best = f"{i.selection_metric} {i.best:.2f}{at}"
        rows.append(
            (
                i.path.name,
                i.recipe,
                i.stage,
                i.started.replace("+00:00", "Z"),
                steps,
                i.status,
                best,
                _short(i.base_checkpoint, 48),
            )
        )
    widths = [max(len(str(r[c])) for r in (header, *rows)) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def find_run(output_dir: str | os.PathLike[str], ref: str) -> Path:
    path = Path(ref).expanduser()
    for candidate in (path, Path(output_dir).expanduser() / ref):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise CirError(
        f"--compare {ref}: not a run folder (no manifest.json here or under {output_dir})"
    )


def _metrics(run_dir: Path, info: RunInfo) -> dict[str, Any]:
    """The best validation of a training run, or a validate run's metrics."""
    history = _read_csv(run_dir / "metrics.csv")
    metric = info.selection_metric
    if history and metric:
        rows = [r for r in history if isinstance(r.get(metric), float)]
        if rows:
            return max(rows, key=lambda r: r[metric])
    return _read_json(run_dir / "metrics.json") or (history[-1] if history else {})


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    infos = [run_info(a), run_info(b)]
    if None in infos:
        raise CirError(f"--compare: {a if infos[0] is None else b} has no readable manifest.json")
    recipes = [
        flatten((_read_json(p / "manifest.json") or {}).get("recipe") or {}) for p in (a, b)
    ]
    keys = sorted(set(recipes[0]) | set(recipes[1]))
    differences = {
        k: [recipes[0].get(k), recipes[1].get(k)]
        for k in keys
        if recipes[0].get(k) != recipes[1].get(k)
    }
    metrics = [_metrics(p, i) for p, i in zip((a, b), infos, strict=True)]
    names = list(dict.fromkeys([*metrics[0], *metrics[1]]))
    return {
        "runs": [str(a), str(b)],
        "info": [i.to_dict() for i in infos],
        "recipe_differences": differences,
        "metrics": {k: [metrics[0].get(k), metrics[1].get(k)] for k in names},
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


def _value(value: Any) -> str:
    """A recipe value as written (1e-05 stays 1e-05, not a rounded 0.00)."""
    return "-" if value is None else str(value)


def format_compare(result: dict[str, Any]) -> list[str]:
    lines = [f"A = {result['runs'][0]}", f"B = {result['runs'][1]}", ""]
    rows = [
        ("status", *(i["status"] for i in result["info"])),
        (
            "steps",
            *(
                f"{i['step']}/{i['total_steps'] or '?'}" if i["step"] is not None else "-"
                for i in result["info"]
            ),
        ),
    ]
    diff = result["recipe_differences"]
    lines_rows = [("recipe key (differences only)", "A", "B")]
    lines_rows += [(k, _value(v[0]), _value(v[1])) for k, v in diff.items()] or [
        ("(none: same resolved recipe)", "", "")
    ]
    metric_rows = [("metric (best validation)", "A", "B")] + rows
    metric_rows += [(k, _cell(v[0]), _cell(v[1])) for k, v in result["metrics"].items()]
    for table in (lines_rows, metric_rows):
        widths = [max(len(str(r[c])) for r in table) for c in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += [fmt.format(*r).rstrip() for r in table] + [""]
    return lines[:-1]
