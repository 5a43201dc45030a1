"""Run folders: naming, the manifest, the `best` / `last` checkpoints inside, resume and `latest`.

Every run writes `<output>/<recipe>-<stage>-<YYYYmmdd-HHMMSS>/` with a `manifest.json` (what
produced its outputs) and `checkpoints/{best,last}/`. Each checkpoint folder holds
`weights.safetensors` (only the weights that trained) with a JSON sidecar (recipe, stage, epoch,
step, metrics, the checkpoint it was trained on top of) and, for `last`, `training_state.pt`
(optimizer, scaler, RNG states, epoch / batch position): plain tensors and containers, loaded
with `weights_only=True`. The file formats themselves are checkpoints.py's.

A checkpoint folder is written under a temporary name and renamed into place, so a crash never
leaves a half checkpoint: either the previous `last` or the new one exists (`last.old` is picked
up if the crash fell between the two renames).
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cir_cli import __version__
from cir_cli.checkpoints import load_torch_checkpoint, load_weights, save_weights
from cir_cli.errors import CirError
from cir_cli.io import atomic_dir, atomic_path, remove_stale_temp, write_json_atomic
from cir_cli.weights import fetch_hf

if TYPE_CHECKING:
    import torch

    from cir_cli.config import Recipe

# torch is imported where a checkpoint is written: `latest` resolution (preflight, `cir runs`)
# must not pay for it.

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


# --------------------------------------------------------------------------------------------
# Checkpoints inside a run folder
# --------------------------------------------------------------------------------------------

WEIGHTS = "weights.safetensors"
TRAINING_STATE = "training_state.pt"


def save_run_checkpoint(
    run_dir: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    final = Path(run_dir) / "checkpoints" / name
    with atomic_dir(final) as staging:
        save_weights(staging / WEIGHTS, weights, metadata)
        if training_state is not None:
            import torch

            # Through a Python file object: a refused write (disk full) then surfaces as the
            # OSError behind torch's RuntimeError, which atomic_dir reports as one line.
            with atomic_path(staging / TRAINING_STATE) as tmp, open(tmp, "wb") as fh:
                torch.save(training_state, fh)
    return final


def remove_stale_checkpoint_temps(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written (call at run start): `.last.*` / `.best.*`
    staging folders and the `.<file>.*.tmp` files of atomic writes in the run folder."""
    root = Path(run_dir) / "checkpoints"
    removed = [p for name in ("last", "best") for p in remove_stale_temp(root, name)]
    if Path(run_dir).is_dir():
        for tmp in Path(run_dir).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def checkpoint_folder(root: Path, name: str) -> Path | None:
    """`root/name`, or `root/name.old` when a crash fell between the two renames of a save."""
    for candidate in (root / name, root / f"{name}.old"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    return None


def latest_training_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(weights, training state) of the run's `last` checkpoint, or None for a fresh run."""
    folder = checkpoint_folder(Path(run_dir) / "checkpoints", "last")
    if folder is None or not (folder / TRAINING_STATE).is_file():
        return None
    weights, _ = load_weights(folder / WEIGHTS)
    return weights, load_torch_checkpoint(folder / TRAINING_STATE)


def resolve_weights_file(path: str | Path) -> Path:
    """A run dir, a checkpoint dir or a weights file -> the weights file to load.

    A run dir resolves to its `best` checkpoint (falling back to `last`).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise CirError(f"checkpoint not found: {p}")
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    for name in ("best", "last"):
        folder = checkpoint_folder(p / "checkpoints", name)
        if folder is not None:
            return folder / WEIGHTS
    raise CirError(
        f"{p}: no checkpoint found (expected {WEIGHTS}, or checkpoints/best|last/ inside a run dir)"
    )


def latest_run(output_dir: str | Path, recipe_name: str, stages: tuple[str, ...]) -> Path:
    """The newest run folder of `recipe_name` for the first of `stages` that has one.

    Lets scripts chain stages without copying timestamps: `--checkpoint latest`,
    `--set finetune.checkpoint=latest`.
    """
    root = Path(output_dir).expanduser()
    for stage in stages:
        runs = [
            p
            for p in root.glob(f"{recipe_name}-{stage}-*")
            if checkpoint_folder(p / "checkpoints", "best")
            or checkpoint_folder(p / "checkpoints", "last")
        ]
        if runs:
            return max(runs, key=lambda p: (p.stat().st_mtime, p.name))
    raise CirError(
        f"'latest': no {' or '.join(stages)} run of recipe '{recipe_name}' with a checkpoint "
        f"under {root}"
    )


def resolve_checkpoint_ref(
    ref: str | None, output_dir: str | Path, recipe_name: str, stages: tuple[str, ...]
) -> str | None:
    """`latest` -> the newest matching run folder; `hf://org/repo/file` -> the file in the hub
    cache (downloaded when online); anything else unchanged."""
    if ref is not None and ref.startswith("hf://"):
        return str(fetch_hf(ref))
    if ref != "latest":
        return ref
    return str(latest_run(output_dir, recipe_name, stages))


def resolve_finetune_checkpoint(recipe: Recipe) -> Recipe:
    """The recipe with its finetune.checkpoint `latest` / hf:// resolved (a copy when changed)."""
    base = resolve_checkpoint_ref(
        recipe.finetune.checkpoint, recipe.output.dir, recipe.name, ("finetune",)
    )
    if base == recipe.finetune.checkpoint:
        return recipe
    recipe = recipe.model_copy(deep=True)
    recipe.finetune.checkpoint = base
    return recipe
