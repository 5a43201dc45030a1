"""What a training run writes for people: metrics.csv, train_log.csv, curves.png, Comet, console.

Only rank 0 writes. The Comet API key comes from the environment (COMET_API_KEY) and is never
printed or stored; comet_ml is imported only when the recipe enables it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cir_cli.engine.curves import plot_curves as draw_curves
from cir_cli.engine.progress_log import (
    StepLog,
    StepRecord,
    peak_gpu_bytes,
    step_of,
    truncate_csv,
)
from cir_cli.errors import CirError
from cir_cli.io import atomic_path


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        comet: Any = None,
        every_steps: int = 10,
        every_seconds: float = 300.0,
        tensorboard: bool = False,
        plain_lines: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.comet = comet
        self.history: list[dict[str, float]] = []
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.tensorboard = tensorboard
        self.plain_lines = plain_lines
        self.steps: StepLog | None = None
        self._resume_checked = False
        self._created = time.monotonic()
        self._selection: str | None = None

    def info(self, message: str) -> None:
        if self.enabled:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(message, soft_wrap=True)

    def step(self, step: int, values: dict[str, float]) -> None:
        if self.comet is not None:
            self.comet.log_metrics({f"train/{k}": v for k, v in values.items()}, step=step)

    def train_step(
        self,
        stage: str,
        step: int,
        total_steps: int,
        epoch: int,
        epochs: int,
        loss: float,
        terms: dict[str, float],
        lrs: list[float],
        samples_per_second: float,
        samples_per_step: int,
        device: Any = None,
        comet_every: int = 10,
    ) -> None:
        """After every optimizer step (rank 0): train_log.csv, plain line, TensorBoard, Comet."""
        if not self.enabled:
            return
        if self.steps is None:
            self.steps = StepLog(
                self.run_dir,
                stage,
                every_steps=self.every_steps,
                every_seconds=self.every_seconds,
                plain_lines=self.plain_lines,
                tensorboard=self.tensorboard,
                started=self._created,
            )
            if self._selection:
                self.steps.state["selection_metric"] = self._selection
        if not self._resume_checked:
            # A resumed run appends after the rows `rewind` kept (the only place that cuts them).
            self._resume_checked = True
            self.steps.continue_after_last_row()
        rate = max(samples_per_second, 1e-9)
        record = StepRecord(
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            epochs=epochs,
            loss=loss,
            terms=dict(terms),
            lrs=list(lrs),
            samples_per_second=samples_per_second,
            seconds_per_step=samples_per_step / rate,
            peak_gpu_bytes=peak_gpu_bytes(device),
        )
        self.steps.record(record)
        if step % comet_every == 0:
            self.step(step, {"loss": loss, "lr": lrs[0] if lrs else 0.0, **terms})

    def close(self, finished: bool = False) -> None:
        """End of training: progress.json says whether the run finished (`cir runs`)."""
        if self.steps is not None:
            self.steps.close(finished)

    def epoch(self, epoch: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.comet is not None and not math.isnan(loss):
            self.comet.log_metric("train/epoch_loss", loss, epoch=epoch)

    def rewind(self, history_rows: int | None, step: int) -> None:
        """Cut the logs back to a checkpoint: `metrics.csv` to its first `history_rows` rows
        (rows up to `step` for a checkpoint that did not record the count), every other
        per-step CSV log of the run folder to its rows up to `step`."""
        if not self.enabled:
            return
        for path in sorted(self.run_dir.glob("*.csv")):
            if path.name == "metrics.csv" and history_rows is not None:
                truncate_csv(path, lambda i, _row: i < history_rows)
            else:
                truncate_csv(path, lambda _i, row: step_of(row) <= step)

    def load_history(self) -> list[dict[str, float]]:
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return []
        import pandas as pd

        self.history = pd.read_csv(path).to_dict("records")
        return list(self.history)

    def validation(self, row: dict[str, float], selection_metric: str) -> None:
        if not self.enabled:
            return
        import pandas as pd

        self._selection = selection_metric
        self.history.append(row)
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            pd.DataFrame(self.history).to_csv(tmp, index=False)
        if self.steps is not None:
            self.steps.validation(row)
            self.steps.write_state(selection_metric=selection_metric)
        if self.comet is not None:
            self.comet.log_metrics(
                {f"val/{k}": v for k, v in row.items() if k not in ("epoch", "step")},
                epoch=int(row["epoch"]),
            )
        self.plot_curves(selection_metric)
        shown = {k: v for k, v in row.items() if k in ("epoch", "train_loss", selection_metric)}
        recall_keys = [k for k in row if k.startswith("recall_at")][:3]
        shown.update({k: row[k] for k in recall_keys})
        self.info(
            "validation  "
            + "  ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            )
        )

    def plot_curves(self, selection_metric: str) -> None:
        """curves.png from train_log.csv (per step) and metrics.csv (per validation)."""
        draw_curves(self.run_dir, selection_metric)


def start_comet(logging_config: Any, run_dir: Path, recipe_dict: dict, project_default: str):
    """An Experiment when the recipe enables Comet (offline archive or online), else None."""
    if not logging_config.comet:
        return None
    import os

    try:
        import comet_ml
    except ImportError:
        raise CirError(
            "logging.comet = true needs comet-ml: pip install 'cir-cli[comet]'"
        ) from None
    project = logging_config.project or project_default
    if logging_config.comet_offline:
        experiment = comet_ml.OfflineExperiment(
            project_name=project,
            workspace=logging_config.workspace,
            offline_directory=str(run_dir / "comet"),
        )
    else:
        if not os.environ.get("COMET_API_KEY"):
            raise CirError(
                "logging.comet = true needs COMET_API_KEY in the environment "
                "(or set logging.comet_offline = true)"
            )
        experiment = comet_ml.Experiment(project_name=project, workspace=logging_config.workspace)
    if logging_config.experiment_name:
        experiment.set_name(logging_config.experiment_name)
    experiment.log_parameters(flatten(recipe_dict))
    return experiment


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a resolved recipe as dotted keys (Comet, `cir runs`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
