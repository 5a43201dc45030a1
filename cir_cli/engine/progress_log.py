"""Per-step training progress for people and machines: train_log.csv, plain lines, TensorBoard.

On a terminal the trainer's rich bar shows the running loss; off a terminal (sbatch, nohup,
`| tee`) the bar is invisible, so one plain line goes to stderr every `logging.every_steps`
optimizer steps and at least every `logging.every_seconds`:

    [2026-12-01 01:32:10] finetune epoch 1/2 step 10/20 (50%) loss 2.7431 lr 1.00e-03
        412.3 samples/s eta 0:00:04   (one line in the log)

`train_log.csv` (one row per optimizer step: step, epoch, loss, the method's loss terms, the lr of
every parameter group, samples/s, elapsed seconds) is always written on rank 0, next to
metrics.csv; curves.png is drawn from both. TensorBoard (`logging.tensorboard = true`) gets the
same scalars through `torch.utils.tensorboard` (the `tensorboard` package: the extra of the
same name).

Only the trainer's logging hook calls this module, so the training loop itself stays untouched.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cir_cli.errors import CirError
from cir_cli.io import atomic_path, read_text, write_json_atomic
from cir_cli.progress import bars_visible

TRAIN_LOG = "train_log.csv"
# Where the run stands (step, planned steps, pid / host, finished): what `cir runs` reads.
PROGRESS = "progress.json"
# Columns every row has, in this order; loss terms and per-group lrs follow.
BASE_COLUMNS = ("step", "epoch", "loss")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


@dataclass
class StepRecord:
    """What the trainer knows after one optimizer step."""

    step: int
    total_steps: int
    epoch: int  # 0-based epoch the step belongs to
    epochs: int  # planned epochs (0: a steps-only run)
    loss: float
    terms: dict[str, float]
    lrs: list[float]
    samples_per_second: float
    # Seconds per optimizer step of the current epoch (validation excluded): the ETA's basis.
    seconds_per_step: float
    peak_gpu_bytes: int | None = None

    def row(self, elapsed: float) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch + 1, "loss": self.loss}
        for key, value in self.terms.items():
            if key not in row:
                row[key] = value
        for i, lr in enumerate(self.lrs):
            row[f"lr_{i}"] = lr
        row["samples_per_s"] = self.samples_per_second
        row["elapsed_s"] = elapsed
        return row

    def line(self, stage: str) -> str:
        """The plain progress line (one line, no colour, fixed order: easy to grep)."""
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        epochs = self.epochs or "?"
        pct = f" ({100 * self.step / self.total_steps:.0f}%)" if self.total_steps else ""
        total = self.total_steps or "?"
        parts = [f"[{now}] {stage} epoch {self.epoch + 1}/{epochs} step {self.step}/{total}{pct}"]
        parts.append(f"loss {self.loss:.4f}")
        if self.terms:
            parts.append("(" + " ".join(f"{k} {v:.4f}" for k, v in self.terms.items()) + ")")
        if self.lrs:
            lrs = "/".join(f"{lr:.2e}" for lr in dict.fromkeys(self.lrs))
            parts.append(f"lr {lrs}")
        parts.append(f"{self.samples_per_second:.1f} samples/s")
        if self.total_steps:
            remaining = max(self.total_steps - self.step, 0) * self.seconds_per_step
            parts.append(f"eta {format_duration(remaining)}")
        if self.peak_gpu_bytes is not None:
            parts.append(f"peak gpu {self.peak_gpu_bytes / 2**30:.1f} GiB")
        return " ".join(parts)


class StepLog:
    """train_log.csv + plain lines + TensorBoard for one run (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        every_steps: int = 10,
        every_seconds: float = 300.0,
        plain_lines: bool | None = None,
        tensorboard: bool = False,
        stream: TextIO | None = None,
        started: float | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.every_steps = max(int(every_steps), 1)
        self.every_seconds = every_seconds
        self.stream = stream
        # None: plain lines exactly when no rich bar can be seen.
        self.plain_lines = plain_lines
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None
        self._columns: list[str] | None = None
        # Wall clock of the run (validations included) from `started` (time.monotonic()).
        self._started = started if started is not None else time.monotonic()
        self._elapsed_before = 0.0
        self._last_line = -math.inf
        self._last_state = -math.inf
        self.state: dict[str, Any] = {
            "stage": stage,
            "pid": os.getpid(),
            "host": platform.node(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "finished": False,
        }
        self._tb = self._open_tensorboard() if tensorboard else None

    @property
    def path(self) -> Path:
        return self.run_dir / TRAIN_LOG

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CirError(
                "logging.tensorboard = true needs the tensorboard package: "
                "pip install 'cir-cli[tensorboard]'"
            ) from None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _show_lines(self) -> bool:
        if self.plain_lines is not None:
            return self.plain_lines
        return not bars_visible()

    def resume(self, step: int) -> None:
        """Keep the rows up to `step` (a resumed run repeats what came after its checkpoint)."""
        if self.path.is_file():
            truncate_csv(self.path, lambda _i, row: step_of(row) <= step)
        self.continue_after_last_row()

    def continue_after_last_row(self) -> None:
        """Append to the rows already in train_log.csv: its columns, and the run's elapsed
        time from its last row (the file was cut back to the checkpoint before, by `resume` or
        by RunLog.rewind)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            last = None
            for last in reader:  # noqa: B007 (only the last row is wanted)
                pass
        if last is not None:
            try:
                self._elapsed_before = float(last.get("elapsed_s") or 0.0)
            except ValueError:
                self._elapsed_before = 0.0
        self._columns = columns or None

    def _write_row(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            exists = self.path.is_file() and self.path.stat().st_size > 0
            if self._columns is None or not exists:
                self._columns = list(row)
                exists = False
            self._file = self.path.open("a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(
                self._file, fieldnames=self._columns, extrasaction="ignore"
            )
            if not exists:
                self._writer.writeheader()
        self._writer.writerow(row)
        # One flushed line per step: `tail -f train_log.csv` and a crash lose at most one row.
        self._file.flush()

    def record(self, rec: StepRecord) -> None:
        elapsed = self._elapsed_before + time.monotonic() - self._started
        row = rec.row(elapsed)
        self._write_row(row)
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch", "elapsed_s") and isinstance(value, int | float):
                    self._tb.add_scalar(f"train/{key}", value, rec.step)
        now = time.monotonic()
        due = (
            rec.step % self.every_steps == 0
            or rec.step == 1
            or (rec.total_steps and rec.step >= rec.total_steps)
            or now - self._last_line >= self.every_seconds
        )
        if due or now - self._last_state >= 30:
            self._last_state = now
            self.state.update(
                step=rec.step, total_steps=rec.total_steps, epoch=rec.epoch + 1, epochs=rec.epochs
            )
            self.write_state()
        if due and self._show_lines():
            self._last_line = now
            stream = self.stream if self.stream is not None else sys.stderr
            stream.write(rec.line(self.stage) + "\n")
            stream.flush()

    def write_state(self, **values: Any) -> None:
        self.state.update(values)
        self.state["updated"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        write_json_atomic(self.run_dir / PROGRESS, self.state)

    def validation(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            return
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, int | float):
                self._tb.add_scalar(f"val/{key}", value, step)
        self._tb.flush()

    def close(self, finished: bool = False) -> None:
        if "step" in self.state:
            self.write_state(finished=finished)
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def peak_gpu_bytes(device: Any) -> int | None:
    """Peak allocated CUDA memory of `device` (None off CUDA)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return math.nan


def truncate_csv(path: Path, keep) -> None:
    """Rewrite a CSV log with only the rows `keep(index, row)` accepts (atomic, text kept)."""
    lines = read_text(path, "CSV log").splitlines(keepends=True)
    if not lines:
        return
    header = next(csv.reader(lines[:1]))
    if path.name != "metrics.csv" and "step" not in header:
        return  # not a per-step log
    kept = [lines[0]]
    for i, line in enumerate(lines[1:]):
        fields = next(csv.reader([line]), [])
        if not line.endswith("\n") or len(fields) != len(header):
            continue  # a row a kill cut off mid-append
        if keep(i, dict(zip(header, fields, strict=True))):
            kept.append(line)
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
