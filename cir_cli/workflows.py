"""What each CLI command does, as plain functions (tests and notebooks call these too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.errors import CirError
from cir_cli.io import write_json_atomic
from cir_cli.recipes import Recipe

if TYPE_CHECKING:
    from cir_cli.engine.trainer import TrainSettings


@dataclass
class ValidationRun:
    metrics: dict[str, float]
    run_dir: Path
    evaluation: object


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    import pandas as pd

    from cir_cli.io import atomic_path

    write_json_atomic(run_dir / "metrics.json", metrics)
    with atomic_path(run_dir / "metrics.csv") as tmp:
        pd.DataFrame([metrics]).to_csv(tmp, index=False)


def run_validation(
    recipe: Recipe,
    checkpoint: str | None = None,
    split: str | None = None,
    save_rankings: bool = False,
    use_cache: bool = True,
) -> ValidationRun:
    from cir_cli import api
    from cir_cli.runs import new_run_dir, write_manifest

    model = api.load_model(recipe, checkpoint=checkpoint, device=recipe.device)
    evaluation = api.validate(model, recipe, split=split, use_cache=use_cache)
    if not evaluation.metrics:
        raise CirError(
            f"split '{split or recipe.eval.split}' of {recipe.data.dataset} has no targets to "
            "score; use `cir submit` for test splits"
        )
    run_dir = new_run_dir(recipe.output.dir, recipe.name, "validate")
    write_manifest(
        run_dir,
        recipe,
        "validate",
        {
            "checkpoint": model.loaded_from,
            "split": split or recipe.eval.split,
            "model": model.describe(),
        },
    )
    write_metrics(run_dir, evaluation.metrics)
    if save_rankings:
        write_json_atomic(run_dir / "rankings.json", evaluation.rankings(), indent=None)
        if recipe.data.dataset == "circo":
            # The official CIRCO evaluator's input: {"<query id>": [50 unique int image ids]}.
            from cir_cli.submission import write_circo_submission

            result = evaluation.splits[0]
            write_circo_submission(
                run_dir / "circo_rankings.json",
                evaluation.rankings(),
                [t.query_id for t in result.split.triplets],
            )
    return ValidationRun(evaluation.metrics, run_dir, evaluation)


def run_submission(
    recipe: Recipe, benchmark: str, checkpoint: str | None = None, name: str | None = None
) -> list[Path]:
    from cir_cli import api
    from cir_cli.runs import new_run_dir, write_manifest

    if benchmark == "circo":
        return [_circo_submission(recipe, checkpoint, name)]
    if benchmark != "cirr":
        raise CirError(f"unknown benchmark {benchmark!r} for `cir submit`; expected cirr or circo")
    if recipe.data.dataset != "cirr":
        raise CirError(
            f"`cir submit cirr` needs a CIRR recipe; {recipe.name} uses data.dataset = "
            f"{recipe.data.dataset!r}"
        )
    from cir_cli.submission import build_cirr_submission, write_cirr_submission

    model = api.load_model(recipe, checkpoint=checkpoint, device=recipe.device)
    split_name = recipe.data.test_split
    evaluation = api.validate(model, recipe, split=split_name)
    result = evaluation.splits[0]
    top50 = {t.query_id: names for t, names in zip(result.split.triplets, result.top, strict=True)}
    top3 = {
        t.query_id: names for t, names in zip(result.split.triplets, result.subset_top, strict=True)
    }
    recall, recall_subset = build_cirr_submission(result.split, top50, top3)
    run_dir = new_run_dir(recipe.output.dir, recipe.name, "submit-cirr")
    write_manifest(
        run_dir,
        recipe,
        "submit cirr",
        {"checkpoint": model.loaded_from, "split": split_name, "model": model.describe()},
    )
    paths = write_cirr_submission(run_dir, name or recipe.name, recall, recall_subset, result.split)
    return list(paths)


def _circo_submission(recipe: Recipe, checkpoint: str | None, name: str | None) -> Path:
    """`cir submit circo`: top-50 of every test query, validated, written atomically."""
    from cir_cli import api
    from cir_cli.runs import new_run_dir, write_manifest
    from cir_cli.submission import write_circo_submission

    if recipe.data.dataset != "circo":
        raise CirError(
            f"`cir submit circo` needs a CIRCO recipe; {recipe.name} uses data.dataset = "
            f'{recipe.data.dataset!r} (set data.dataset="circo" and data.root)'
        )
    model = api.load_model(recipe, checkpoint=checkpoint, device=recipe.device)
    split_name = "test"
    evaluation = api.validate(model, recipe, split=split_name)
    result = evaluation.splits[0]
    run_dir = new_run_dir(recipe.output.dir, recipe.name, "submit-circo")
    write_manifest(
        run_dir,
        recipe,
        "submit circo",
        {"checkpoint": model.loaded_from, "split": split_name, "model": model.describe()},
    )
    query_ids = [t.query_id for t in result.split.triplets]
    path = run_dir / f"circo_submission_{name or recipe.name}.json"
    return write_circo_submission(path, evaluation.rankings(), query_ids)


@dataclass
class TrainingRun:
    run_dir: Path
    best: dict | None
    history: list[dict]
    steps: int
    stopped_early: bool


def _recipe_for_resume(recipe: Recipe | None, resume: str | None) -> Recipe:
    """On --resume the run's own resolved recipe is used, so the continuation is the same run."""
    if resume is None:
        if recipe is None:
            raise CirError("--recipe is required (or --resume <run dir>)")
        return recipe
    import json

    manifest = Path(resume).expanduser() / "manifest.json"
    if not manifest.is_file():
        raise CirError(f"--resume {resume}: not a run folder (no manifest.json)")
    from cir_cli.recipes import validate_recipe

    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))["recipe"]
    except (json.JSONDecodeError, KeyError):
        raise CirError(f"{manifest}: malformed manifest (no 'recipe' entry)") from None
    return validate_recipe(data, str(manifest))


def train_settings(
    recipe: Recipe, stage: str, stop_after_steps: int | None = None
) -> TrainSettings:
    """The trainer's settings of a recipe stage ("finetune" / "combiner"): loop, optimizer and
    lr schedule (engine/optim.py, with the recipe's [fixes] applied)."""
    from cir_cli.engine.optim import stage_specs
    from cir_cli.engine.trainer import TrainSettings

    cfg = recipe.finetune if stage == "finetune" else recipe.combiner
    optimizer_spec, schedule_spec = stage_specs(cfg, recipe.fixes)
    return TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=recipe.seed,
        max_steps=cfg.max_steps,
        validate_every=cfg.validate_every,
        validate_every_steps=getattr(cfg, "validate_every_steps", 0),
        grad_accum=getattr(cfg, "grad_accum", 1),
        amp=cfg.amp,
        optimizer=optimizer_spec,
        schedule=schedule_spec,
        num_workers=recipe.data.num_workers,
        log_every=recipe.logging.log_every,
        save_every_steps=cfg.save_every_steps,
        stop_after_steps=stop_after_steps,
    )


def run_training(
    recipe: Recipe | None,
    stage: str,
    resume: str | None = None,
    stop_after_steps: int | None = None,
) -> TrainingRun:
    """`cir finetune` (stage="finetune") and `cir train-combiner` (stage="combiner")."""
    from cir_cli import api
    from cir_cli.engine.distributed import broadcast_object, init_distributed, shutdown_distributed
    from cir_cli.engine.run_log import RunLog, start_comet
    from cir_cli.engine.trainer import Trainer
    from cir_cli.methods import build_method
    from cir_cli.runs import new_run_dir, write_manifest

    recipe = _recipe_for_resume(recipe, resume)
    if recipe.finetune.checkpoint == "latest":
        from cir_cli.engine.checkpointing import resolve_checkpoint_ref

        recipe = recipe.model_copy(deep=True)
        recipe.finetune.checkpoint = resolve_checkpoint_ref(
            "latest", recipe.output.dir, recipe.name, ("finetune",)
        )
    dist_info, device = init_distributed(api.resolve_device(recipe.device))
    try:
        api.seed_everything(recipe.seed)
        model = build_method(recipe)
        task_factory = {"finetune": "finetune_task", "combiner": "combiner_task"}[stage]
        if not hasattr(model, task_factory):
            raise CirError(f"method {recipe.method.name} has no {stage} stage")
        if stage == "combiner" and recipe.finetune.checkpoint:
            model.load_checkpoint(recipe.finetune.checkpoint)
        model.to(device)
        if resume is not None:
            run_dir = Path(resume).expanduser()
        else:
            run_dir = (
                new_run_dir(recipe.output.dir, recipe.name, stage) if dist_info.is_main else None
            )
            run_dir = Path(broadcast_object(str(run_dir) if run_dir else None))
        task = getattr(model, task_factory)(device)
        if dist_info.is_main:
            write_manifest(
                run_dir,
                recipe,
                stage,
                {
                    "resumed": resume is not None,
                    "world_size": dist_info.world_size,
                    "model": model.describe(),
                },
            )
        comet = None
        if dist_info.is_main:
            comet = start_comet(recipe.logging, run_dir, recipe.to_dict(), f"cir {recipe.name}")
        settings = train_settings(recipe, stage, stop_after_steps)
        log = RunLog(run_dir, enabled=dist_info.is_main, comet=comet)
        trainer = Trainer(task, settings, run_dir, device, dist_info, log)
        result = trainer.fit(resume=resume is not None)
        if comet is not None:
            comet.end()
        return TrainingRun(run_dir, result.best, result.history, result.steps, result.stopped_early)
    finally:
        shutdown_distributed()
