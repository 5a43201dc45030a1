"""curves.png of a training run: per-step loss and lr (train_log.csv), every validation metric
(metrics.csv), the selection metric on its own panel with the `best` validation marked.

Redrawn at every validation, so a long job's folder always holds a current picture.
"""

from __future__ import annotations

import math
from pathlib import Path

from cir_cli.io import atomic_path

_NOT_METRICS = ("epoch", "step", "train_loss")
_NOT_TERMS = ("step", "epoch", "loss", "samples_per_s", "elapsed_s")


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average with a bias correction (TensorBoard-style smoothing)."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(float("nan"))
            continue
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _read(path: Path) -> list[dict]:
    if not path.is_file() or path.stat().st_size == 0:
        return []
    import pandas as pd

    try:
        return pd.read_csv(path).to_dict("records")
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return []


def best_row(history: list[dict], selection_metric: str) -> dict | None:
    """The first validation with the highest selection metric (what picked `best`)."""
    best, best_value = None, -math.inf
    for row in history:
        value = row.get(selection_metric)
        if value is not None and math.isfinite(value) and value > best_value:
            best, best_value = row, value
    return best


def plot_curves(run_dir: Path, selection_metric: str) -> Path:
    """Write <run_dir>/curves.png (atomically)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir, selection_metric)
    path = Path(run_dir) / "curves.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def curves_figure(run_dir: Path, selection_metric: str):
    """The figure: loss, lr, selection metric (best starred), other validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps = _read(run_dir / "train_log.csv")
    history = _read(run_dir / "metrics.csv")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_lr, ax_sel, ax_val = axes.flat

    if steps:
        xs = [r["step"] for r in steps]
        span = max(3, len(steps) // 25)
        losses = [r["loss"] for r in steps]
        ax_loss.plot(xs, losses, color="tab:blue", alpha=0.25, lw=0.8, label="loss (per step)")
        ax_loss.plot(xs, smooth(losses, span), color="tab:blue", lw=1.8, label=f"loss (EMA {span})")
        terms = [k for k in steps[0] if k not in _NOT_TERMS and not k.startswith("lr_")]
        for key in terms:
            ax_loss.plot(xs, smooth([r.get(key) for r in steps], span), lw=1, ls="--", label=key)
        lr_keys = [k for k in steps[0] if k.startswith("lr_")]
        for key in lr_keys:
            ax_lr.plot(xs, [r[key] for r in steps], label=f"group {key[3:]}")
        if lr_keys and all(r[k] > 0 for r in steps for k in lr_keys):
            ax_lr.set_yscale("log")
        if len(lr_keys) > 1:
            ax_lr.legend(fontsize=7)
    elif history and any("train_loss" in r for r in history):
        rows = [r for r in history if r.get("train_loss") == r.get("train_loss")]
        ax_loss.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(title="training loss", xlabel="optimizer step")
    if steps:
        ax_loss.legend(fontsize=7)
    ax_lr.set(title="learning rate", xlabel="optimizer step")

    best = best_row(history, selection_metric)
    if history:
        rows = [r for r in history if r.get(selection_metric) is not None]
        xs = [r["step"] for r in rows]
        ax_sel.plot(xs, [r[selection_metric] for r in rows], marker="o", color="tab:green")
        if best is not None:
            ax_sel.plot(
                [best["step"]],
                [best[selection_metric]],
                marker="*",
                markersize=18,
                color="tab:red",
                ls="none",
                label=f"best {best[selection_metric]:.2f} (epoch {int(best['epoch'])}, "
                f"step {int(best['step'])})",
            )
            ax_sel.legend(fontsize=8, loc="lower right")
        keys = [k for k in history[-1] if k not in _NOT_METRICS and k != selection_metric]
        for key in keys:
            rows = [r for r in history if r.get(key) == r.get(key)]
            ax_val.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=key)
        if best is not None:
            ax_val.axvline(best["step"], color="tab:red", ls=":", lw=1)
        if keys:
            ax_val.legend(fontsize=6, ncol=2)
    ax_sel.set(title=f"selection metric: {selection_metric}", xlabel="optimizer step")
    ax_val.set(title="validation metrics", xlabel="optimizer step", ylabel="%")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    return fig
