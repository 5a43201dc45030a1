"""`--dry-run` (issue 14): every built-in recipe against placeholder datasets built from the
real annotations, every problem listed at once, exit 2, no model loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli.cli import app
from cir_cli.recipes import builtin_names, load_recipe
from tests.conftest import REPO, tiny_png, toy_overrides

runner = CliRunner()


def _link_all(root: Path, relpaths, data: bytes) -> None:
    """One placeholder PNG, hard-linked under every name (tens of thousands in seconds)."""
    source = root / ".placeholder.png"
    source.write_bytes(data)
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)


@pytest.fixture(scope="module")
def placeholder_fiq(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real FashionIQ annotations with a placeholder image for every id of every split."""
    root = tmp_path_factory.mktemp("fiq_placeholder")
    shutil.copytree(shared_data / "fashioniq" / "captions", root / "captions")
    shutil.copytree(shared_data / "fashioniq" / "image_splits", root / "image_splits")
    names: set[str] = set()
    for split_file in (root / "image_splits").glob("split.*.json"):
        names.update(json.loads(split_file.read_text()))
    _link_all(root, (f"images/{n}.png" for n in sorted(names)), tiny_png())
    return root


@pytest.fixture(scope="module")
def placeholder_cirr_all(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIRR: the real captions (val, test1; train captions are not in the shared set) and
    image splits, a placeholder image for every image of every split."""
    root = tmp_path_factory.mktemp("cirr_all")
    shutil.copytree(shared_data / "cirr" / "captions", root / "cirr" / "captions")
    shutil.copytree(shared_data / "cirr" / "image_splits", root / "cirr" / "image_splits")
    rels: list[str] = []
    for split_file in (root / "cirr" / "image_splits").glob("split.rc2.*.json"):
        rels += list(json.loads(split_file.read_text()).values())
    _link_all(root, rels, tiny_png())
    return root


def _roots(recipe: str, toy_root: Path, cirr: Path, fiq: Path) -> Path:
    if recipe.startswith("toy_"):
        return toy_root
    return fiq if load_recipe(recipe).data.dataset == "fashioniq" else cirr


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin_names())
def test_dry_run_of_every_builtin_recipe(
    name: str,
    toy_root: Path,
    placeholder_cirr_all: Path,
    placeholder_fiq: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no models/ folder, no data/toy: nothing found by accident
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    root = _roots(name, toy_root, placeholder_cirr_all, placeholder_fiq)
    args = ["validate", "--recipe", name, "--dry-run", "--device", "cpu"]
    for item in toy_overrides(root, tmp_path / "runs"):
        args += ["--set", item]
    result = runner.invoke(app, args)
    out = result.output
    assert "Traceback" not in out and "dry run of `cir validate`" in out, out
    # The val split and every one of its images are there: no data problem.
    assert "PROBLEM  data" not in out
    assert "  ok       data " in out
    recipe = load_recipe(name)
    problems = [line for line in out.splitlines() if line.startswith("  PROBLEM")]
    # The toy recipes build tiny random models and need no file; toy_lincir needs the files of
    # `cir prepare toy-lincir` (its tiny CLIP and corpus).
    if name.startswith("toy_") and name != "toy_lincir":
        assert result.exit_code == 0, out
        assert "everything needed is in place" in out
        return
    assert result.exit_code == 2, out
    assert f"dry run: {len(problems)} problem(s)" in out
    # Every missing weight of the recipe is named in the same run.
    pretrained = recipe.backbone.pretrained
    if name == "toy_lincir":
        assert any("tiny_clip.safetensors" in p and "cir prepare toy-lincir" in p for p in problems)
        assert any("texts.txt" in p for p in problems)
    elif pretrained:
        assert any(p.startswith(f"  PROBLEM  backbone.pretrained = {pretrained}") for p in problems)
    if recipe.backbone.name in ("blip", "blip2"):
        assert any("backbone.tokenizer = bert-base-uncased" in p for p in problems)
    if recipe.backbone.vision_pretrained:
        assert any("backbone.vision_pretrained" in p for p in problems)


@pytest.mark.slow
def test_finetune_dry_run_names_the_absent_train_split(
    placeholder_cirr_all: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--recipe", "clip4cir_cirr", "--dry-run", "--device", "cpu"]
    for item in toy_overrides(placeholder_cirr_all, tmp_path / "runs"):
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "PROBLEM  data train: absent (not found:" in result.output
    assert "ok       data cirr val: 4,181 queries, 2,297 images" in result.output


def test_dry_run_loads_no_model(toy_root: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cir_cli.cli import main\n"
        f"sys.argv = ['cir', 'finetune', '--recipe', 'toy_clip4cir', '--dry-run', '--set', "
        f"'data.root=\"{toy_root}\"', '--set', 'output.dir=\"{tmp_path}/runs\"']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('EXIT', code, sorted(m for m in ('torch', 'open_clip', 'transformers') "
        "if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "everything needed is in place" in proc.stdout, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    # Neither a model library nor torch (no NVIDIA driver on CI; with one, torch checks it).
    if Path("/proc/driver/nvidia/gpus").is_dir():
        assert last in ("EXIT 0 ['torch']", "EXIT None ['torch']"), last
    else:
        assert last in ("EXIT 0 []", "EXIT None []"), last
    assert not (tmp_path / "runs").exists()  # nothing written


def test_dry_run_resolves_latest_and_reports_all_problems(toy_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "toy_clip4cir-finetune-20260101-000000"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "checkpoints" / "best" / "weights.safetensors").write_bytes(b"x")
    args = ["train-combiner", "--recipe", "toy_clip4cir", "--dry-run", "--device", "cuda:7"]
    args += ["--set", "finetune.checkpoint=latest", "--set", "logging.comet=true"]
    args += ["--set", "logging.comet_offline=false"]
    for item in toy_overrides(toy_root, tmp_path / "runs"):
        args += ["--set", item]
    env_key = os.environ.pop("COMET_API_KEY", None)
    try:
        result = runner.invoke(app, args)
    finally:
        if env_key is not None:
            os.environ["COMET_API_KEY"] = env_key
    out = result.output
    assert f"finetune.checkpoint latest -> {run}" in out
    assert result.exit_code == 2
    assert "COMET_API_KEY" in out or "comet-ml" in out
    assert "device cuda:7" in out
    assert "dry run: 2 problem(s)" in out, out


def test_output_dir_keeps_the_feature_cache(tmp_path: Path) -> None:
    from cir_cli.cli.common import _load

    cfg = _load("toy_clip4cir", None, tmp_path / "elsewhere", None)
    assert cfg.output.dir == str(tmp_path / "elsewhere")
    assert cfg.output.cache_dir == str(Path(load_recipe("toy_clip4cir").output.dir) / ".cache")
    pinned = _load("toy_clip4cir", ["output.cache_dir=/c"], tmp_path / "x", None)
    assert pinned.output.cache_dir == "/c"
