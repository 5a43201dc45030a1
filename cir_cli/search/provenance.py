"""Which model an index was built with: checkpoint records, the recipe keys that decide what
features mean, and the check that a (recipe, checkpoint) given at search time is that model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cir_cli import __version__
from cir_cli.checkpoints import sha1_file
from cir_cli.errors import CirError
from cir_cli.runs import resolve_weights_file

if TYPE_CHECKING:
    from cir_cli.config import Recipe
    from cir_cli.methods.base import CIRMethod
    from cir_cli.search.storage import Index

# Recipe keys that decide what the features mean; any other key (output dir, batch sizes,
# training hyper-parameters, data.root) may differ between indexing and search.
_MODEL_SECTIONS = ("method", "backbone")
_MODEL_DATA_KEYS = ("transform", "target_ratio", "image_size")


def _checkpoint_files(path: Path) -> list[Path]:
    """The file(s) whose content defines a checkpoint argument (a file, run dir or folder)."""
    if path.is_file():
        return [path]
    try:
        return [resolve_weights_file(path)]
    except CirError:
        # Another method's checkpoint folder (e.g. a save_pretrained layout): all of its files.
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise CirError(f"checkpoint {path}: an empty folder") from None
        return files


def checkpoint_record(path: str | os.PathLike[str], known: dict | None = None) -> dict:
    """{path, files: [[file, size, mtime_ns]], sha1} of a checkpoint argument.

    When `known` (a stored record) lists the same files with the same size and mtime, its SHA1
    is reused instead of re-reading gigabytes on every search.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise CirError(f"checkpoint not found: {p}")
    files = _checkpoint_files(p)
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if known is not None and known.get("files") == stats and known.get("sha1"):
        return {"path": str(p), "files": stats, "sha1": known["sha1"]}
    if len(files) == 1:
        sha = sha1_file(files[0])
    else:
        digest = hashlib.sha1()
        for f in files:
            digest.update(f.relative_to(p).as_posix().encode() + b"\0")
            digest.update(sha1_file(f).encode())
        sha = digest.hexdigest()
    return {"path": str(p), "files": stats, "sha1": sha}


def model_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """The flattened recipe keys that decide what the gallery features mean."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                flatten(f"{prefix}.{key}", value[key])
        else:
            out[prefix] = value

    for section in _MODEL_SECTIONS:
        flatten(section, recipe.get(section, {}))
    data = recipe.get("data", {})
    for key in _MODEL_DATA_KEYS:
        if key in data:
            out[f"data.{key}"] = data[key]
    return out


def resolve_recipe_paths(recipe: Recipe) -> Recipe:
    """The recipe with finetune.checkpoint made absolute, so search works from any folder."""
    ckpt = recipe.finetune.checkpoint
    if not ckpt:
        return recipe
    copy = recipe.model_copy(deep=True)
    copy.finetune.checkpoint = str(Path(ckpt).expanduser().resolve())
    return copy


def provenance_record(model: CIRMethod, recipe: Recipe, checkpoint: str | None) -> dict[str, Any]:
    base = recipe.finetune.checkpoint
    return {
        "recipe_name": recipe.name,
        "recipe": recipe.to_dict(),
        "method": model.describe(),
        "checkpoint": checkpoint_record(checkpoint) if checkpoint else None,
        "base_checkpoint": checkpoint_record(base) if base else None,
        "preprocessing": model.preprocessing_id(),
        # The image tower's content key (None while it trains): provenance for humans and tools.
        "image_cache_key": model.image_cache_key(),
        "cir_version": __version__,
    }


def load_recipe_model(recipe: Recipe, checkpoint: str | None, device: str | None) -> CIRMethod:
    # Imported here: the model-loading code may import torch at module level, and this package
    # must import without torch (`cir index --dry-run` reads search.storage).
    from cir_cli.methods.loading import load_model

    return load_model(recipe, checkpoint=checkpoint, device=device or recipe.device)


def check_compatible(
    index: Index,
    recipe: Recipe | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[Recipe, str | None]:
    """The (recipe, checkpoint) to load for `index`; CirError when the given ones do not match.

    Without arguments the index's own recipe and checkpoint are used (and the checkpoint file is
    checked against its recorded SHA1). A given recipe must agree on the keys that decide what
    features mean (model_keys); a given checkpoint must have the recorded content.
    """
    where = index.location
    if recipe is not None:
        want = model_keys(index.recipe_dict)
        got = model_keys(recipe.to_dict())
        # Keys the index's recipe lacks come from a newer schema (defaults added since it was
        # built): they cannot be compared, and the index's own recipe still loads without them.
        for key in sorted(want):
            if want[key] != got.get(key):
                raise CirError(
                    f"{where}: recipe mismatch: the index was built with {key} = "
                    f"{want[key]!r}, the recipe gives {got.get(key)!r} (omit --recipe to "
                    "use the index's, or rebuild the index)"
                )
        recipe = resolve_recipe_paths(recipe)
    else:
        recipe = index.recipe()
    stored = index.checkpoint
    if checkpoint is None and stored is not None:
        checkpoint = stored["path"]
    if (checkpoint is None) != (stored is None):
        given = "none" if checkpoint is None else str(checkpoint)
        built = "none" if stored is None else stored["path"]
        raise CirError(
            f"{where}: checkpoint mismatch: the index was built with checkpoint {built}, "
            f"got {given}"
        )
    for label, rec, path in (
        ("checkpoint", stored, checkpoint),
        ("finetune.checkpoint", index.manifest.get("base_checkpoint"), recipe.finetune.checkpoint),
    ):
        if rec is None or path is None:
            if (rec is None) != (path is None):
                raise CirError(
                    f"{where}: {label} mismatch: index {rec['path'] if rec else 'none'}, "
                    f"given {path or 'none'}"
                )
            continue
        if not Path(path).expanduser().exists():
            raise CirError(f"{where}: {label} {path} (used to build the index) not found")
        known = rec if Path(path).expanduser().resolve() == Path(rec["path"]) else None
        now = checkpoint_record(path, known)
        if now["sha1"] != rec["sha1"]:
            raise CirError(
                f"{where}: {label} mismatch: {path} has SHA1 {now['sha1'][:12]}, the index was "
                f"built with SHA1 {rec['sha1'][:12]} ({rec['path']}); rebuild the index"
            )
    return recipe, str(checkpoint) if checkpoint is not None else None


def load_index_model(
    index: Index,
    recipe: Recipe | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> CIRMethod:
    """The model an index was built with (checked by check_compatible), in eval mode."""
    recipe, ckpt = check_compatible(index, recipe, checkpoint)
    model = load_recipe_model(recipe, ckpt, device)
    if model.preprocessing_id() != index.manifest["preprocessing"]:
        raise CirError(
            f"{index.location}: preprocessing mismatch: index {index.manifest['preprocessing']}, "
            f"model {model.preprocessing_id()}"
        )
    return model
