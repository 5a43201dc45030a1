"""What each CLI command does, as plain functions (tests and notebooks call these too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.candidates import file_name, from_rankings, write_candidates
from cir_cli.config import Recipe
from cir_cli.data import get_dataset, load_eval_splits, submission_benchmark
from cir_cli.errors import CirError
from cir_cli.io import (
    read_json,
    refuse_blocked_folder,
    require_field,
    write_json_atomic,
    write_text_atomic,
)
from cir_cli.recipes import validate_recipe
from cir_cli.runs import (
    new_run_dir,
    resolve_checkpoint_ref,
    resolve_finetune_checkpoint,
    write_manifest,
)

if TYPE_CHECKING:
    from cir_cli.config import CombinerConfig, FinetuneConfig
    from cir_cli.engine.optim import OptimizerSpec, ScheduleSpec
    from cir_cli.engine.trainer import TrainSettings
    from cir_cli.evaluation import Evaluation
    from cir_cli.methods.base import CIRMethod


def resolve_refs(
    recipe: Recipe,
    checkpoint: str | None,
    stages: tuple[str, ...] = ("combiner", "finetune"),
    fetch: bool = True,
) -> tuple[Recipe, str | None, list[str]]:
    """Resolve `latest` (and, with `fetch`, hf://) in finetune.checkpoint and --checkpoint.

    Returns the recipe (a copy when changed), the checkpoint and one note per resolution
    ("--checkpoint latest -> runs/x") for the command to print: a log then says which run
    `latest` picked.
    """

    def resolve(ref: str | None, ref_stages: tuple[str, ...]) -> str | None:
        if ref is None or (not fetch and ref.startswith("hf://")):
            return ref
        return resolve_checkpoint_ref(ref, recipe.output.dir, recipe.name, ref_stages)

    notes = []
    base = resolve(recipe.finetune.checkpoint, ("finetune",))
    if base != recipe.finetune.checkpoint:
        notes.append(f"finetune.checkpoint {recipe.finetune.checkpoint} -> {base}")
        recipe = recipe.model_copy(deep=True)
        recipe.finetune.checkpoint = base
    resolved = resolve(checkpoint, stages)
    if resolved != checkpoint:
        notes.append(f"--checkpoint {checkpoint} -> {resolved}")
    return recipe, resolved, notes


def validate(
    model: CIRMethod,
    recipe: Recipe,
    split: str | None = None,
    use_cache: bool = True,
    depth: int | None = None,
) -> Evaluation:
    """Evaluate `model` on the recipe's dataset split with the dataset's protocol.

    `depth`: keep this many ranked names per query (default: the servers' 50)."""
    # torch-heavy: this module is imported by `cir ... --dry-run`, which loads no model.
    from cir_cli.cache import default_cache
    from cir_cli.evaluation import RANKING_DEPTH, evaluate

    splits = load_eval_splits(recipe, split)
    return evaluate(
        model,
        splits,
        cache=default_cache(recipe) if use_cache else None,
        batch_size=recipe.eval.batch_size,
        num_workers=recipe.data.num_workers,
        rank_chunk=recipe.eval.rank_chunk,
        depth=depth or RANKING_DEPTH,
    )


@dataclass
class ValidationRun:
    metrics: dict[str, float]
    run_dir: Path
    evaluation: object


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """metrics.json and a one-row metrics.csv (the csv module: pandas is a slow import here)."""
    import csv
    import io
    import math

    write_json_atomic(run_dir / "metrics.json", metrics)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(metrics))
    # As pandas wrote it: repr of each float, an empty cell for NaN / None.
    writer.writerow(
        "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
        for v in metrics.values()
    )
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def run_validation(
    recipe: Recipe,
    checkpoint: str | None = None,
    split: str | None = None,
    save_rankings: bool = False,
    use_cache: bool = True,
    report: Path | None = None,
    report_queries: int = 8,
    save_candidates: int | None = None,
) -> ValidationRun:
    from cir_cli.methods.loading import load_model

    if report is not None and not Path(report).expanduser().resolve().parent.is_dir():
        raise CirError(f"--report {report}: its folder does not exist")
    _check_candidates_k(save_candidates)
    refuse_blocked_folder(recipe.output.dir)
    model = load_model(recipe, checkpoint=checkpoint, device=recipe.device)
    split_reports = None
    if report is not None:
        # The same evaluation plus per-query ranks and the single-modality ranks (report/).
        from cir_cli.report import evaluate_with_report

        evaluation, split_reports = evaluate_with_report(
            model, recipe, split, use_cache, depth=save_candidates
        )
    else:
        evaluation = validate(
            model, recipe, split=split, use_cache=use_cache, depth=save_candidates
        )
    if not evaluation.metrics:
        raise CirError(
            f"split '{split or recipe.eval.split}' of {recipe.data.dataset} has no targets to "
            "score; use `cir submit` for test splits"
        )
    run_dir = new_run_dir(recipe.output.dir, recipe.name, "validate")
    try:
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
        if split_reports is not None:
            _write_report(
                run_dir, recipe, evaluation.metrics, split_reports, report, report_queries
            )
        if save_candidates:
            write_candidate_lists(run_dir, evaluation, save_candidates)
        if save_rankings:
            write_json_atomic(run_dir / "rankings.json", evaluation.rankings(), indent=None)
            save_in_server_format = get_dataset(recipe.data.dataset).save_rankings
            if save_in_server_format is not None:
                # The official evaluator's input (CIRCO: {"<query id>": [50 unique int ids]}).
                result = evaluation.splits[0]
                save_in_server_format(run_dir, result.split, result.top)
    except BaseException:
        # A refused write (disk full, ...): no run folder with half its files.
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return ValidationRun(evaluation.metrics, run_dir, evaluation)


def _write_report(run_dir, recipe, metrics, split_reports, out, n) -> None:
    """The HTML report, and the modality audit added to metrics.json (metrics.csv stays flat)."""
    from cir_cli.report import audit_table, render_report

    audit = audit_table(split_reports, n)
    write_json_atomic(run_dir / "metrics.json", {**metrics, "modality_audit": audit})
    labels = ", ".join(r.label for r in split_reports)
    render_report(
        out,
        metrics,
        split_reports,
        audit,
        title=f"cir validate: {recipe.name}",
        subtitle=f"{labels} | run {run_dir}",
        n=n,
    )


def _check_candidates_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise CirError(f"--save-candidates {k}: expected a positive number of candidates")


def write_candidate_lists(run_dir: Path, evaluation, k: int) -> list[Path]:
    """One candidate list (top-k names + scores per query) per split, beside the manifest."""
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    source = {
        "run_dir": str(run_dir.resolve()),
        "recipe": manifest.get("recipe", {}).get("name"),
        "command": manifest.get("command"),
        "checkpoint": manifest.get("checkpoint"),
        "model": manifest.get("model"),
        "git_commit": manifest.get("git_commit"),
    }
    paths = []
    for result in evaluation.splits:
        cands = from_rankings(result.split, result.top, result.top_scores or None, k, source)
        paths.append(write_candidates(run_dir / file_name(result.split), cands, result.split))
    return paths


def run_submission(
    recipe: Recipe,
    benchmark: str,
    checkpoint: str | None = None,
    name: str | None = None,
    save_candidates: int | None = None,
) -> list[Path]:
    """`cir submit <benchmark>`: the test server's files (the dataset's writer), validated,
    written atomically into a new run folder."""
    from cir_cli.methods.loading import load_model

    spec = submission_benchmark(benchmark)
    submission = spec.submission
    assert submission is not None  # submission_benchmark checked it
    if recipe.data.dataset != spec.name:
        raise CirError(
            f"`cir submit {spec.name}` needs a {spec.title} recipe; {recipe.name} uses "
            f'data.dataset = {recipe.data.dataset!r} (set data.dataset="{spec.name}" and '
            "data.root)"
        )
    _check_candidates_k(save_candidates)
    model = load_model(recipe, checkpoint=checkpoint, device=recipe.device)
    split_name = submission.split_for(recipe.data.test_split)
    evaluation = validate(model, recipe, split=split_name, depth=save_candidates)
    result = evaluation.splits[0]
    run_dir = new_run_dir(recipe.output.dir, recipe.name, f"submit-{spec.name}")
    write_manifest(
        run_dir,
        recipe,
        f"submit {spec.name}",
        {"checkpoint": model.loaded_from, "split": split_name, "model": model.describe()},
    )
    paths = submission.write(
        run_dir, name or recipe.name, result.split, result.top, result.subset_top
    )
    if save_candidates:
        return list(paths) + write_candidate_lists(run_dir, evaluation, save_candidates)
    return list(paths)


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
    manifest = Path(resume).expanduser() / "manifest.json"
    if not manifest.is_file():
        raise CirError(f"--resume {resume}: not a run folder (no manifest.json)")

    data = require_field(read_json(manifest, "run manifest", dict), "recipe", dict, manifest)
    return validate_recipe(data, str(manifest))


def stage_amp(recipe: Recipe, amp: str) -> str:
    """A stage's AMP mode: the recipe's, except that `fixes.amp_auto` turns the references'
    fp16 (autocast + GradScaler) into "auto" (bf16 where the GPU supports it)."""
    return "auto" if recipe.fixes.amp_auto and amp == "fp16" else amp


def train_settings(
    recipe: Recipe, stage: str, stop_after_steps: int | None = None
) -> TrainSettings:
    """The trainer's settings of a recipe stage ("finetune" / "combiner"): loop, optimizer and
    lr schedule (engine/optim.py, with the recipe's [fixes] applied)."""
    from cir_cli.engine.optim import combiner_specs, finetune_specs

    if stage == "finetune":
        ft = recipe.finetune
        return _loop_settings(
            recipe,
            ft,
            *finetune_specs(ft, recipe.fixes),
            stop_after_steps,
            validate_every_steps=ft.validate_every_steps,
            validate_at_steps=tuple(ft.validate_at_steps),
            grad_accum=ft.grad_accum,
        )
    # Stage II validates by epoch, one batch per step: [combiner] has no such keys.
    return _loop_settings(
        recipe, recipe.combiner, *combiner_specs(recipe.combiner, recipe.fixes), stop_after_steps
    )


def _loop_settings(
    recipe: Recipe,
    cfg: FinetuneConfig | CombinerConfig,
    optimizer: OptimizerSpec,
    schedule: ScheduleSpec,
    stop_after_steps: int | None,
    validate_every_steps: int = 0,
    validate_at_steps: tuple[int, ...] = (),
    grad_accum: int = 1,
) -> TrainSettings:
    from cir_cli.engine.trainer import TrainSettings

    return TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=recipe.seed,
        max_steps=cfg.max_steps,
        validate_every=cfg.validate_every,
        validate_every_steps=validate_every_steps,
        validate_at_steps=validate_at_steps,
        select_initial=recipe.fixes.select_initial_validation,
        grad_accum=grad_accum,
        amp=stage_amp(recipe, cfg.amp),
        optimizer=optimizer,
        schedule=schedule,
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
    from cir_cli.engine.distributed import (
        broadcast_object,
        init_distributed,
        resolve_device,
        shutdown_distributed,
    )
    from cir_cli.engine.run_log import RunLog, start_comet
    from cir_cli.engine.seeding import seed_everything
    from cir_cli.engine.trainer import Trainer
    from cir_cli.methods import build_method

    recipe = resolve_finetune_checkpoint(_recipe_for_resume(recipe, resume))
    dist_info, device = init_distributed(resolve_device(recipe.device))
    try:
        seed_everything(recipe.seed)
        model = build_method(recipe)
        if not model.has_stage(stage):
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
        task = model.training_task(stage, device)
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
        log = RunLog(
            run_dir,
            enabled=dist_info.is_main,
            comet=comet,
            every_steps=recipe.logging.every_steps or recipe.logging.log_every,
            every_seconds=recipe.logging.every_seconds,
            tensorboard=recipe.logging.tensorboard,
        )
        trainer = Trainer(task, settings, run_dir, device, dist_info, log)
        finished = False
        try:
            result = trainer.fit(resume=resume is not None)
            finished = not result.stopped_early
        finally:
            log.close(finished)
        if comet is not None:
            comet.end()
        return TrainingRun(run_dir, result.best, result.history, result.steps, result.stopped_early)
    finally:
        shutdown_distributed()
