"""`cir runs` (issue 14) on hand-made run folders, and the small consistency fixes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli import run_table
from cir_cli.cli import app

runner = CliRunner()


def _run(root: Path, name: str, recipe: dict, progress: dict | None, metrics: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    stage = name.split("-")[1]
    manifest = {
        "command": stage,
        "created": f"2026-01-0{len(list(root.iterdir()))}T00:00:00+00:00",
        "recipe": recipe,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    if progress is not None:
        (run / "progress.json").write_text(json.dumps(progress))
    if metrics:
        keys = list(metrics[0])
        lines = [",".join(keys)] + [",".join(str(m[k]) for k in keys) for m in metrics]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    recipe = {
        "name": "toy_clip4cir",
        "finetune": {"lr": 1e-3, "checkpoint": None},
        "data": {"dataset": "cirr"},
        "eval": {"selection_metric": None},
    }
    metrics = [
        {"epoch": 0, "step": 0, "mean_r5_rs1": 9.8},
        {"epoch": 1, "step": 46, "mean_r5_rs1": 30.5},
        {"epoch": 2, "step": 92, "mean_r5_rs1": 30.5},
        {"epoch": 3, "step": 138, "mean_r5_rs1": 21.0},
    ]
    _run(
        tmp_path,
        "toy_clip4cir-finetune-1",
        recipe,
        {
            "step": 138,
            "total_steps": 138,
            "finished": True,
            "selection_metric": "mean_r5_rs1",
            "pid": 1,
            "host": "x",
        },
        metrics,
    )
    # Same host, a pid that is not alive: interrupted. This process: running.
    _run(
        tmp_path,
        "toy_clip4cir-finetune-2",
        {**recipe, "finetune": {"lr": 5e-4}},
        {
            "step": 50,
            "total_steps": 138,
            "finished": False,
            "pid": 2**22 + 12345,
            "host": __import__("platform").node(),
            "selection_metric": "mean_r5_rs1",
        },
        metrics[:2],
    )
    base = str(tmp_path / "toy_clip4cir-finetune-1")
    _run(
        tmp_path,
        "toy_clip4cir-combiner-3",
        {**recipe, "finetune": {"checkpoint": base}},
        {
            "step": 7,
            "total_steps": 20,
            "finished": False,
            "pid": os.getpid(),
            "host": __import__("platform").node(),
            "selection_metric": "mean_r5_rs1",
        },
        [],
    )
    _run(tmp_path, "other-finetune-4", {**recipe, "name": "other"}, None, [])
    return tmp_path


def test_list_runs_status_steps_best(runs: Path) -> None:
    infos = {i.path.name: i for i in run_table.list_runs(runs)}
    first = infos["toy_clip4cir-finetune-1"]
    # Best = the first of the two 30.5 validations (what picked `best`), epoch 1.
    assert (first.status, first.step, first.total_steps) == ("finished", 138, 138)
    assert (first.best, first.best_epoch) == (30.5, 1)
    assert infos["toy_clip4cir-finetune-2"].status == "interrupted"
    combiner = infos["toy_clip4cir-combiner-3"]
    assert combiner.status == "running" and combiner.base_checkpoint.endswith("finetune-1")
    assert infos["other-finetune-4"].status == "interrupted"
    assert [i.recipe for i in run_table.list_runs(runs, "other")] == ["other"]


def test_runs_cli_table_json_and_compare(runs: Path) -> None:
    table = runner.invoke(app, ["runs", "toy_clip4cir", "-o", str(runs)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == [
        "run",
        "recipe",
        "stage",
        "started",
        "steps",
        "status",
        "best",
        "base",
        "checkpoint",
    ]
    assert "138/138" in lines[1] and "mean_r5_rs1 30.50 @ epoch 1" in lines[1]
    assert len(lines) == 4  # three toy_clip4cir runs
    data = json.loads(runner.invoke(app, ["runs", "-o", str(runs), "--json"]).output)
    assert len(data) == 4
    cmp = runner.invoke(
        app,
        [
            "runs",
            "-o",
            str(runs),
            "--compare",
            "toy_clip4cir-finetune-1",
            "toy_clip4cir-finetune-2",
        ],
    )
    assert cmp.exit_code == 0, cmp.output
    assert "finetune.lr" in cmp.output and "0.001" in cmp.output and "0.0005" in cmp.output
    assert "data.dataset" not in cmp.output  # differences only
    row = next(line for line in cmp.output.splitlines() if line.startswith("mean_r5_rs1"))
    assert row.split()[1:] == ["30.50", "30.50"]
    bad = runner.invoke(
        app, ["runs", "-o", str(runs), "--compare", "nope", "toy_clip4cir-finetune-1"]
    )
    assert bad.exit_code == 2 and "not a run folder" in bad.output


def test_version_and_recipe_completion() -> None:
    from cir_cli import __version__
    from cir_cli.cli.common import complete_recipe

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cir {__version__}"
    assert complete_recipe("blip4cir_n") == ["blip4cir_nobi_cirr", "blip4cir_nobi_fiq"]
    assert "toy_clip4cir" in complete_recipe("")


def test_recipes_show_prints_unset_keys_as_comments() -> None:
    import tomllib

    result = runner.invoke(app, ["recipes", "show", "toy_clip4cir"])
    assert result.exit_code == 0
    assert "# tokenizer = (unset)" in result.output
    assert "# checkpoint = (unset)" in result.output
    tomllib.loads(result.output)  # still valid TOML


def test_fashioniq_metrics_grid(capsys: pytest.CaptureFixture[str]) -> None:
    from cir_cli.cli.workflows import _print_metrics
    from cir_cli.metrics import fashioniq_summary

    metrics = fashioniq_summary(
        {
            "dress": {10: 30.0, 50: 50.0},
            "shirt": {10: 20.0, 50: 40.0},
            "toptee": {10: 40.0, 50: 60.0},
        }
    )
    _print_metrics({"epoch": 3.0, **metrics}, "blip4cir_fiq on fashioniq val")
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert rows["dress"].split("│")[2:5] == [" 30.00 ", " 50.00 ", " 40.00 "]
    # Averages: (30+20+40)/3 = 30, (50+40+60)/3 = 50, (30+50)/2 = 40.
    assert rows["average"].split("│")[2:5] == [" 30.00 ", " 50.00 ", " 40.00 "]
    assert "average_recall 40.00" in out and "epoch" in out
    assert "dress_recall_at10" not in out


def test_blip2_missing_local_path_says_not_found(tmp_path: Path) -> None:
    from cir_cli.backbones.blip2 import Blip2Backbone
    from cir_cli.config import BackboneConfig
    from cir_cli.errors import CirError

    for path in ("models/blip2_pretrained_vitL.pth", str(tmp_path / "no" / "blip2-itm-vit-g")):
        cfg = BackboneConfig(name="blip2", arch="blip2-tiny", pretrained=path)
        with pytest.raises(CirError, match=r"backbone.pretrained: not found: "):
            Blip2Backbone.from_config(cfg)


def test_hints_name_real_options(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["validate", "--recipe", "toy_clip4cir", "--set", f'data.root="{tmp_path / "nope"}"']
    )
    assert result.exit_code == 2
    assert "--set data.root=DIR" in result.output and "as --root" not in result.output
    from cir_cli.weights import missing_hint

    assert "cir prepare toy-lincir" in missing_hint("data/toy/lincir/tiny_clip.safetensors")


def test_submit_names_the_servers() -> None:
    # The servers are the datasets' protocol now (DatasetSpec.submission), not a CLI table.
    from cir_cli.data import get_dataset

    assert get_dataset("cirr").submission.server == "https://cirr.cecs.anu.edu.au/test_process/"
    assert get_dataset("circo").submission.server == "https://circo.micc.unifi.it/evaluation"
