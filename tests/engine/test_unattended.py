"""Unattended runs (issue 14): plain progress lines off a terminal, per-step train_log.csv,
curves.png with the selection metric, progress.json / `cir runs`, `latest` in `cir index`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli.cli import app
from tests.conftest import REPO, toy_overrides

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 20-step toy finetune with stdout and stderr redirected to one file (as under sbatch)."""
    out = tmp_path_factory.mktemp("unattended")
    log = out / "job.log"
    overrides = toy_overrides(
        toy_root, out / "runs", finetune__epochs=1, finetune__batch_size=30, finetune__max_steps=20
    )
    args = [sys.executable, "-m", "cir_cli", "finetune", "--recipe", "toy_clip4cir"]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CIR_PROGRESS": "1"}
    with log.open("w") as handle:
        proc = subprocess.run(
            args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=out, timeout=600
        )
    text = log.read_text()
    assert proc.returncode == 0, text
    (run_dir,) = (out / "runs").glob("toy_clip4cir-finetune-*")
    return {"log": text, "run_dir": run_dir, "out": out, "overrides": overrides}


@pytest.mark.slow
def test_plain_loss_lines_in_a_redirected_log(toy_run: dict) -> None:
    lines = [line for line in toy_run["log"].splitlines() if " loss " in line and " step " in line]
    # every_steps = log_every = 10: steps 1, 10 and 20 (the first and the last always).
    assert len(lines) >= 2, toy_run["log"]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/20", "10/20", "20/20"]
    last = lines[-1]
    for field in ("epoch 1/1", "loss ", "lr ", "samples/s", "eta 0:00:00"):
        assert field in last
    # No rich bar debris: no carriage returns or ANSI escapes in a file.
    assert "\r" not in toy_run["log"] and "\x1b[" not in toy_run["log"]


@pytest.mark.slow
def test_train_log_has_one_row_per_step(toy_run: dict) -> None:
    with (toy_run["run_dir"] / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert set(rows[0]) >= {"step", "epoch", "loss", "lr_0", "samples_per_s", "elapsed_s"}
    # Linear warm-up (recipe lr and warmup_steps): step s has lr = lr * s / warmup_steps.
    from cir_cli.recipes import load_recipe

    ft = load_recipe("toy_clip4cir").finetune
    assert ft.warmup_steps >= 20
    assert float(rows[9]["lr_0"]) == pytest.approx(ft.lr * 10 / ft.warmup_steps)
    assert all(float(r["loss"]) > 0 for r in rows)


@pytest.mark.slow
def test_curves_show_selection_metric_and_best(toy_run: dict) -> None:
    from cir_cli.engine.curves import best_row, curves_figure

    run_dir = toy_run["run_dir"]
    assert (run_dir / "curves.png").stat().st_size > 10_000
    fig = curves_figure(run_dir, "mean_r5_rs1")
    titles = [ax.get_title() for ax in fig.axes]
    assert "selection metric: mean_r5_rs1" in titles
    sel = fig.axes[titles.index("selection metric: mean_r5_rs1")]
    with (run_dir / "metrics.csv").open() as handle:
        history = [
            {k: float(v) if v else None for k, v in r.items()} for r in csv.DictReader(handle)
        ]
    best = best_row(history, "mean_r5_rs1")
    ys = list(sel.lines[0].get_ydata())
    assert ys == pytest.approx([r["mean_r5_rs1"] for r in history])
    marker = sel.lines[1]
    assert marker.get_marker() == "*"
    assert list(marker.get_ydata()) == pytest.approx([best["mean_r5_rs1"]])
    assert f"epoch {int(best['epoch'])}" in marker.get_label()
    loss_ax = fig.axes[titles.index("training loss")]
    assert len(loss_ax.lines[0].get_xdata()) == 20  # one point per step, not per validation


@pytest.mark.slow
def test_runs_table_and_progress(toy_run: dict) -> None:
    run_dir = toy_run["run_dir"]
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["finished"] is True and progress["step"] == 20 and progress["total_steps"] == 20
    result = runner.invoke(app, ["runs", "toy_clip4cir", "-o", str(run_dir.parent), "--json"])
    assert result.exit_code == 0, result.output
    (info,) = json.loads(result.output)
    assert info["status"] == "finished" and info["step"] == 20 and info["total_steps"] == 20
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    top = max(rows, key=lambda r: float(r["mean_r5_rs1"]))
    assert info["best"] == pytest.approx(float(top["mean_r5_rs1"]))
    assert info["best_epoch"] == int(top["epoch"])
    table = runner.invoke(app, ["runs", "-o", str(run_dir.parent)])
    assert run_dir.name in table.output and "finished" in table.output and "20/20" in table.output


@pytest.mark.slow
def test_index_accepts_latest_and_says_what_it_resolved(toy_run: dict, toy_root: Path) -> None:
    out = toy_run["out"]
    folder = out / "photos"
    folder.mkdir()
    for src in sorted((toy_root / "dev").glob("*.png"))[:6]:
        (folder / src.name).write_bytes(src.read_bytes())
    args = ["index", str(folder), "--recipe", "toy_clip4cir", "--checkpoint", "latest"]
    args += ["--out", str(out / "p.cirindex")]
    for item in toy_run["overrides"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"--checkpoint latest -> {toy_run['run_dir']}" in result.output
    manifest = json.loads((out / "p.cirindex" / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str(toy_run["run_dir"].resolve())


def test_step_log_resume_keeps_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    from cir_cli.engine.progress_log import StepLog, StepRecord

    def record(log: StepLog, step: int, loss: float) -> None:
        log.record(StepRecord(step, 6, 0, 1, loss, {"loss_a": loss / 2}, [1e-3, 2e-3], 10.0, 0.1))

    log = StepLog(tmp_path, "finetune", plain_lines=False)
    for step in range(1, 6):
        record(log, step, float(step))
    log.close()
    log = StepLog(tmp_path, "finetune", plain_lines=False)
    log.resume(3)  # the checkpoint was at step 3: steps 4 and 5 are trained again
    for step in range(4, 7):
        record(log, step, 10.0 + step)
    log.close(finished=True)
    with (tmp_path / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in rows] == [1, 2, 3, 14, 15, 16]
    assert rows[0]["lr_1"] == "0.002" and rows[0]["loss_a"] == "0.5"
    assert json.loads((tmp_path / "progress.json").read_text())["finished"] is True


def test_plain_line_every_n_steps_and_on_time(tmp_path: Path) -> None:
    import io

    from cir_cli.engine.progress_log import StepLog, StepRecord

    stream = io.StringIO()
    log = StepLog(
        tmp_path, "combiner", every_steps=4, every_seconds=1e9, plain_lines=True, stream=stream
    )
    for step in range(1, 11):
        log.record(StepRecord(step, 10, 0, 2, 1.0, {"loss_itc": 0.5}, [1e-4], 100.0, 0.5))
    lines = stream.getvalue().splitlines()
    assert [line.split(" step ")[1].split()[0] for line in lines] == [
        "1/10",
        "4/10",
        "8/10",
        "10/10",
    ]
    assert "(loss_itc 0.5000)" in lines[0] and "eta 0:00:03" in lines[1]  # 6 steps x 0.5 s
    stream = io.StringIO()
    log = StepLog(
        tmp_path / "b",
        "combiner",
        every_steps=1000,
        every_seconds=0.0,
        plain_lines=True,
        stream=stream,
    )
    (tmp_path / "b").mkdir()
    for step in range(1, 4):
        log.record(StepRecord(step, 0, 0, 0, 1.0, {}, [1e-4], 1.0, 1.0))
    assert len(stream.getvalue().splitlines()) == 3  # every_seconds = 0: a line per step
    log.close()


def test_tensorboard_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from cir_cli.engine.progress_log import StepLog, StepRecord

    log = StepLog(tmp_path, "finetune", plain_lines=False, tensorboard=True)
    log.record(StepRecord(1, 1, 0, 1, 2.5, {}, [1e-3], 1.0, 1.0))
    log.validation({"epoch": 1, "step": 1, "mean_r5_rs1": 12.0})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_line_shows_peak_gpu_memory_on_cuda() -> None:
    """The formatting of the CUDA field (no GPU here: peak_gpu_bytes is None off CUDA)."""
    import torch

    from cir_cli.engine.progress_log import StepRecord, peak_gpu_bytes

    assert peak_gpu_bytes(torch.device("cpu")) is None
    rec = StepRecord(3, 0, 0, 0, 1.0, {}, [1e-4, 1e-4, 2e-4], 5.0, 1.0, 3 * 2**30)
    line = rec.line("finetune")
    assert line.endswith("peak gpu 3.0 GiB")
    assert "step 3/? " in line and "epoch 1/? " in line and "eta" not in line  # steps unknown
    assert "lr 1.00e-04/2.00e-04 " in line  # equal group lrs shown once
