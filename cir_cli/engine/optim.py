"""The one owner of optimisation: the optimizer builder and the registry of lr schedules.

Methods only declare their parameter groups (`TrainingTask.param_groups`); the recipe's stage
section picks the optimizer and the schedule, and the trainer applies the schedule right before
every optimizer step from (step, epoch), so a resumed run continues the same curve.

Schedules (what the reference repositories do):

- ``constant``: the base lr (CLIP4Cir stage I, every Combiner, LinCIR's
  ``constant_with_warmup`` with 0 warm-up steps).
- ``cosine``: per optimizer step, from the base lr to ``min_lr`` over ``span_epochs`` (None: the
  run), clamped at ``min_lr`` after it (cir's own; the toy recipes).
- ``epoch_cosine``: BLIP's ``cosine_lr_schedule``, called once at the start of every epoch e
  (Bi-BLIP4CIR ``src/clip_fine_tune.py`` + ``src/utils.py``, CaLa ``src/blip_fine_tune.py`` +
  ``src/utils.py``): lr(e) = min + (base - min) * (1 + cos(pi * e / span)) / 2, constant within
  the epoch and periodic past the span (nothing caps e: it climbs back after ``span``).
- ``onecycle``: torch's ``OneCycleLR`` (two cos phases, beta1 cycled 0.95 -> 0.85 -> 0.95) over
  ``span_epochs`` epochs of steps whatever the run length (SPRC ``src/blip_fine_tune_2.py``
  built it with ``epochs=80`` on CIRR, ``epochs=num_epochs`` on FashionIQ). Past its end the
  final values hold (torch raised there).

Which groups follow: ``groups = "all"``, or ``"first"`` (BLIP's ``onlyGroup0=True``: group 0 is
scheduled, every other group keeps its base lr all run). A group may also opt out itself with
``"scheduled": False``. Warm-up (any schedule): a linear ramp (step + 1) / warmup_steps of the
scheduled groups over the first ``warmup_steps`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.config import CombinerConfig, FinetuneConfig, FixesConfig

# --------------------------------------------------------------------------------------------
# Optimizer


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"  # "adamw" | "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


def build_optimizer(spec: OptimizerSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer of every stage. A group's own keys (lr, weight_decay) win over the spec's.

    `scheduled` (a schedule flag, not an optimizer option) stays in the group; torch keeps
    unknown group keys, and the trainer reads it.
    """
    if spec.name == "adam":
        # The Combiner stages (CLIP4Cir / Bi-BLIP4CIR combiner_train.py): Adam(lr) defaults.
        return torch.optim.Adam(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    if spec.name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=spec.lr,
            betas=spec.betas,
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            # the multi-tensor update: same arithmetic, far fewer kernel launches
            foreach=True,
        )
    raise CirError(f"optimizer {spec.name!r} is not known; expected 'adamw' or 'adam'")


# --------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = "constant"  # a key of SCHEDULES
    warmup_steps: int = 0
    min_lr: float = 0.0
    # cosine / epoch_cosine / onecycle: the span in epochs (None: the run's length).
    span_epochs: float | None = None
    groups: str = "all"  # "all" | "first" (onlyGroup0)
    # onecycle (torch OneCycleLR's defaults but pct_start)
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True


@dataclass(frozen=True)
class ScheduleContext:
    """Where training is: optimizer step (0-based, the step about to be taken) and epoch."""

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int  # the run's optimizer steps
    base_lr: float  # group 0's base lr (min_lr is relative to it)


# A schedule maps (spec, context) to (lr multiplier, beta1 or None = leave beta1 alone).
Schedule = Callable[[ScheduleSpec, ScheduleContext], tuple[float, float | None]]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def wrap(fn: Schedule) -> Schedule:
        SCHEDULES[name] = fn
        return fn

    return wrap


def _floor(spec: ScheduleSpec, ctx: ScheduleContext) -> float:
    return spec.min_lr / ctx.base_lr if ctx.base_lr > 0 else 0.0


def _span_steps(spec: ScheduleSpec, ctx: ScheduleContext) -> int:
    if spec.span_epochs is None:
        return max(ctx.total_steps, 1)
    return max(round(spec.span_epochs * ctx.steps_per_epoch), 1)


@register_schedule("constant")
def constant(spec: ScheduleSpec, ctx: ScheduleContext) -> tuple[float, float | None]:
    return 1.0, None


@register_schedule("cosine")
def step_cosine(spec: ScheduleSpec, ctx: ScheduleContext) -> tuple[float, float | None]:
    """Per step, after the warm-up, to min_lr over the span; clamped past it."""
    span = max(_span_steps(spec, ctx) - spec.warmup_steps, 1)
    progress = min(max(ctx.step - spec.warmup_steps, 0) / span, 1.0)
    floor = _floor(spec, ctx)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)), None


@register_schedule("epoch_cosine")
def epoch_cosine(spec: ScheduleSpec, ctx: ScheduleContext) -> tuple[float, float | None]:
    """BLIP's cosine_lr_schedule(epoch, max_epoch): per epoch, periodic past max_epoch."""
    span = spec.span_epochs if spec.span_epochs is not None else _run_epochs(ctx)
    floor = _floor(spec, ctx)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * ctx.epoch / span)), None


def _run_epochs(ctx: ScheduleContext) -> float:
    return max(ctx.total_steps / max(ctx.steps_per_epoch, 1), 1.0)


def onecycle(
    step: int,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[float, float]:
    """(lr factor, beta1) of torch's OneCycleLR (cos annealing, two phases) at `step`.

    Phase 1 anneals lr/div_factor -> lr and beta1 0.95 -> 0.85 over pct_start of the steps;
    phase 2 anneals lr -> lr/(div_factor*final_div_factor) and beta1 back to 0.95. Steps past
    the end keep the final values (torch raises there; SPRC's CIRR script crashed above 80
    epochs).
    """

    def cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    initial = 1.0 / div_factor
    final = initial / final_div_factor
    step = min(step, total_steps - 1)
    peak = float(pct_start * total_steps) - 1
    last = total_steps - 1
    if step <= peak:
        pct = step / peak if peak > 0 else 1.0
        return cos(initial, 1.0, pct), cos(max_momentum, base_momentum, pct)
    pct = (step - peak) / (last - peak) if last > peak else 1.0
    return cos(1.0, final, pct), cos(base_momentum, max_momentum, pct)


@register_schedule("onecycle")
def onecycle_schedule(spec: ScheduleSpec, ctx: ScheduleContext) -> tuple[float, float | None]:
    factor, beta1 = onecycle(
        ctx.step, _span_steps(spec, ctx), spec.pct_start, spec.div_factor, spec.final_div_factor
    )
    return factor, (beta1 if spec.cycle_momentum else None)


def schedule_factor(spec: ScheduleSpec, ctx: ScheduleContext) -> tuple[float, float | None]:
    """(lr multiplier of the scheduled groups, beta1 or None) at ctx, warm-up included."""
    if spec.name not in SCHEDULES:
        known = ", ".join(sorted(SCHEDULES))
        raise CirError(f"scheduler {spec.name!r} is not known; expected one of {known}")
    factor, beta1 = SCHEDULES[spec.name](spec, ctx)
    if spec.warmup_steps and ctx.step < spec.warmup_steps:
        # The per-step cosine starts after the warm-up; the others are scaled by the ramp.
        ramp = (ctx.step + 1) / spec.warmup_steps
        factor = ramp if spec.name in ("constant", "cosine") else ramp * factor
    return factor, beta1


def scheduled_flags(spec: ScheduleSpec, groups: list[dict[str, Any]]) -> list[bool]:
    """Which param groups follow the schedule (the others keep their base lr all run)."""
    return [
        bool(g.get("scheduled", True)) and (spec.groups == "all" or i == 0)
        for i, g in enumerate(groups)
    ]


class LrSchedule:
    """Applies a ScheduleSpec to an optimizer's groups before each step."""

    def __init__(
        self,
        spec: ScheduleSpec,
        optimizer: torch.optim.Optimizer,
        base_lrs: list[float],
        steps_per_epoch: int,
        total_steps: int,
    ) -> None:
        self.spec = spec
        self.optimizer = optimizer
        self.base_lrs = base_lrs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.flags = scheduled_flags(spec, optimizer.param_groups)

    def apply(self, step: int, epoch: int) -> None:
        ctx = ScheduleContext(
            step, epoch, self.steps_per_epoch, self.total_steps, self.base_lrs[0]
        )
        factor, beta1 = schedule_factor(self.spec, ctx)
        for group, base, on in zip(
            self.optimizer.param_groups, self.base_lrs, self.flags, strict=True
        ):
            group["lr"] = base * factor if on else base
            if on and beta1 is not None and "betas" in group:
                group["betas"] = (beta1, group["betas"][1])


def finetune_specs(
    cfg: FinetuneConfig, fixes: FixesConfig | None = None
) -> tuple[OptimizerSpec, ScheduleSpec]:
    """(optimizer, schedule) of a [finetune] section, with the recipe's [fixes] applied."""
    optimizer = OptimizerSpec(
        name=cfg.optimizer,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    schedule = ScheduleSpec(
        name=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        min_lr=cfg.min_lr,
        span_epochs=cfg.schedule_epochs,
        groups=cfg.schedule_groups,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        cycle_momentum=cfg.cycle_momentum,
    )
    return optimizer, apply_schedule_fixes(schedule, fixes)


def combiner_specs(
    cfg: CombinerConfig, fixes: FixesConfig | None = None
) -> tuple[OptimizerSpec, ScheduleSpec]:
    """(optimizer, schedule) of a [combiner] section, with the recipe's [fixes] applied.

    The section has no betas / eps / onecycle keys: torch's Adam(W) and OneCycleLR defaults
    (the specs' defaults) hold."""
    optimizer = OptimizerSpec(name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = ScheduleSpec(
        name=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        min_lr=cfg.min_lr,
        span_epochs=cfg.schedule_epochs,
        groups=cfg.schedule_groups,
    )
    return optimizer, apply_schedule_fixes(schedule, fixes)


def apply_schedule_fixes(schedule: ScheduleSpec, fixes: FixesConfig | None) -> ScheduleSpec:
    """[fixes] step_cosine: BLIP's per-epoch cosine becomes per step; onecycle_spans_run: the
    one-cycle spans the whole run, not schedule_epochs."""
    if fixes is None:
        return schedule
    if schedule.name == "epoch_cosine" and fixes.step_cosine:
        schedule = replace(schedule, name="cosine")
    if schedule.name == "onecycle" and fixes.onecycle_spans_run:
        schedule = replace(schedule, span_epochs=None)
    return schedule
