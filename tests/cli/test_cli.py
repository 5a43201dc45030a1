"""The CLI: fast help, recipe commands, and bad input as one line + exit 2 (no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli.cli import app
from tests.conftest import toy_overrides

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.stderr.strip() if result.stderr else result.output.strip()
    assert "Traceback" not in result.output
    assert text.startswith("error:"), text
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("prepare", "finetune", "train-combiner", "validate", "submit", "recipes"):
        assert command in result.output


def test_help_and_recipes_list_do_not_import_torch() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from cir_cli.cli import app; "
        "r = CliRunner().invoke(app, ['recipes', 'list']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_recipes_commands(tmp_path: Path) -> None:
    listed = run("recipes", "list")
    assert "toy_clip4cir" in listed.output and "clip_sum_cirr" in listed.output
    shown = run("recipes", "show", "clip_sum_fiq", "--set", "eval.batch_size=7")
    assert shown.exit_code == 0
    assert 'dataset = "fashioniq"' in shown.output and "batch_size = 7" in shown.output
    copied = run("recipes", "cp", "toy_clip4cir", str(tmp_path / "mine.toml"))
    assert copied.exit_code == 0 and (tmp_path / "mine.toml").is_file()
    assert run("recipes", "validate", str(tmp_path / "mine.toml")).exit_code == 0


def test_unknown_recipe() -> None:
    assert_one_line_error(run("validate", "--recipe", "no_such_recipe"), "unknown recipe")


def test_unknown_key_and_wrong_type() -> None:
    assert_one_line_error(
        run("recipes", "show", "toy_clip4cir", "--set", "data.rooot=x"),
        "unknown key 'data.rooot'", "did you mean 'root'",
    )
    assert_one_line_error(
        run("validate", "--recipe", "toy_clip4cir", "--set", "eval.batch_size=big"),
        "eval.batch_size must be an integer",
    )


def test_missing_root(tmp_path: Path) -> None:
    result = run("validate", "--recipe", "toy_clip4cir", "--set", f"data.root={tmp_path}/none")
    assert_one_line_error(result, str(tmp_path / "none"))
    result = run("prepare", "cirr", "--root", str(tmp_path / "none"))
    assert_one_line_error(result, str(tmp_path / "none"))


@pytest.fixture()
def toy_copy(toy_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    return root


def test_malformed_json(toy_copy: Path, tmp_path: Path) -> None:
    (toy_copy / "cirr/captions/cap.rc2.val.json").write_text('[{"pairid": 1,')
    result = run("validate", "--recipe", "toy_clip4cir", *_sets(toy_copy, tmp_path))
    assert_one_line_error(result, "cap.rc2.val.json")


def test_missing_annotation_key(toy_copy: Path, tmp_path: Path) -> None:
    path = toy_copy / "cirr/captions/cap.rc2.val.json"
    records = json.loads(path.read_text())
    del records[3]["caption"]
    path.write_text(json.dumps(records))
    result = run("validate", "--recipe", "toy_clip4cir", *_sets(toy_copy, tmp_path))
    assert_one_line_error(result, "cap.rc2.val.json", "caption")


def test_missing_image(toy_copy: Path, tmp_path: Path) -> None:
    victim = sorted((toy_copy / "dev").glob("*.png"))[5]
    victim.unlink()
    result = run("validate", "--recipe", "toy_clip4cir", *_sets(toy_copy, tmp_path))
    assert_one_line_error(result, "missing", victim.name)


def test_unreadable_image(toy_copy: Path, tmp_path: Path) -> None:
    victim = sorted((toy_copy / "dev").glob("*.png"))[7]
    victim.write_bytes(b"not a png at all")
    result = run("validate", "--recipe", "toy_clip4cir", *_sets(toy_copy, tmp_path))
    assert_one_line_error(result, victim.name)
    # and `cir prepare` lists it
    result = run("prepare", "cirr", "--root", str(toy_copy))
    assert result.exit_code == 2
    assert victim.stem in result.output


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["--debug", "validate", "--recipe", "no_such_recipe"])
    from cir_cli.errors import CirError

    assert isinstance(result.exception, CirError)
    from cir_cli.cli import common

    common._state["debug"] = False


def _sets(root: Path, out: Path) -> list[str]:
    args = []
    for item in toy_overrides(root, out / "runs"):
        args += ["--set", item]
    return args


@pytest.mark.parametrize("folder", ["runs/it's", 'runs/say "hi"', "runs/back\\slash", "runs/a=b"])
def test_output_dir_is_taken_verbatim(folder: str) -> None:
    """--output-dir is set as a typed value, not re-parsed as TOML (a quote once changed it)."""
    from cir_cli.cli import common

    assert common._load("toy_clip4cir", None, Path(folder), None).output.dir == folder
    assert common._load("toy_clip4cir", None, None, "cuda:1").device == "cuda:1"


_NOISY = """
import logging, sys
from cir_cli import cli
from cir_cli.cli.common import cli_command
from cir_cli.errors import CirError

@cli.app.command("noisy")
@cli_command
def noisy() -> None:
    logging.error("a library's own complaint")  # what made 'ERROR:root:...' appear
    logging.getLogger("transformers").warning("a transformers warning")
    import warnings
    warnings.warn("a library's UserWarning", stacklevel=1)
    raise CirError("the one line")

sys.argv = ["cir", *sys.argv[1:], "noisy"]
cli.main()
"""


def test_third_party_log_lines_stay_off_stderr_unless_debug() -> None:
    plain = subprocess.run([sys.executable, "-c", _NOISY], capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr == "error: the one line\n"
    debug = subprocess.run([sys.executable, "-c", _NOISY, "--debug"], capture_output=True,
                           text=True)
    assert "ERROR:root:a library's own complaint" in debug.stderr
    assert "UserWarning: a library's UserWarning" in debug.stderr
