"""Run directories and manifests: every run records what produced its outputs."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cir_cli import __version__
from cir_cli.config import Recipe
from cir_cli.io import write_json_atomic

_PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "pandas")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"cir-cli": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the cir checkout (None for an installed wheel or without git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def new_run_dir(output_dir: str | Path, recipe_name: str, stage: str) -> Path:
    """`<output>/<recipe>-<stage>-<YYYYmmdd-HHMMSS>`: no colons, unique if two start at once."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{recipe_name or 'recipe'}-{stage}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def write_manifest(
    run_dir: str | Path, recipe: Recipe, command: str, extra: dict[str, Any] | None = None
) -> Path:
    manifest = {
        "command": command,
        "argv": sys.argv,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seed": recipe.seed,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "host": platform.node(),
        "recipe": recipe.to_dict(),
        **(extra or {}),
    }
    path = Path(run_dir) / "manifest.json"
    write_json_atomic(path, manifest)
    return path
