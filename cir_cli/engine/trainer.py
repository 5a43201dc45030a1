"""One training loop for every method and stage; methods plug in a `TrainingTask`.

The loop owns what is the same everywhere: seeded, resumable, distributed batch order; the
optimizer and the lr schedule of engine/optim.py (built from the stage's OptimizerSpec /
ScheduleSpec, applied before every optimizer step from (step, epoch)); mixed precision on GPU
(bf16, or fp16 with a GradScaler), fp32 on CPU; gradient
accumulation; validation every N epochs with the dataset's selection metric; `best` and `last`
checkpoints (safetensors of the trainable weights + JSON sidecar + training state); metrics.csv,
curves.png and Comet logging on rank 0.

A task says what is specific: which parameters train (and at which lr), how a batch of sample
indices becomes tensors, the loss, and how to validate.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cir_cli.engine.distributed import DistInfo
from cir_cli.engine.optim import LrSchedule, OptimizerSpec, ScheduleSpec, build_optimizer
from cir_cli.engine.run_log import RunLog
from cir_cli.engine.sampler import GlobalBatchSampler
from cir_cli.engine.seeding import seed_everything
from cir_cli.errors import CirError
from cir_cli.progress import progress_bar
from cir_cli.runs import (
    checkpoint_folder,
    latest_training_state,
    remove_stale_checkpoint_temps,
    save_run_checkpoint,
)


class TrainingTask(Protocol):
    stage: str
    selection_metric: str
    model: nn.Module

    def num_samples(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def dataset(self) -> torch.utils.data.Dataset | None: ...
    def collate(self, items: list[Any]) -> Any: ...
    def gather(self, indices: list[int]) -> Any: ...
    def param_groups(self) -> list[dict[str, Any]]: ...
    def set_train_mode(self) -> None: ...
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self) -> dict[str, float]: ...
    def trainable_state(self) -> dict[str, torch.Tensor]: ...
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def checkpoint_metadata(self) -> dict[str, Any]: ...


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    seed: int
    max_steps: int | None = None
    validate_every: int = 1
    # Validate every N optimizer steps (mid-epoch) instead of every `validate_every` epochs.
    validate_every_steps: int = 0
    # Extra optimizer steps at which to validate too (LinCIR's train_phi.py: step 50).
    validate_at_steps: tuple[int, ...] = ()
    validate_before: bool = True
    # Whether the validation before the first step competes for `best`. No reference does it
    # (they validate after training steps only): False logs it without selecting it.
    select_initial: bool = False
    grad_accum: int = 1
    amp: str = "auto"
    # The optimizer (its lr is the default of groups without one) and the lr schedule.
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    num_workers: int = 0
    log_every: int = 10
    # Save the resumable training state every N optimizer steps (0: only at validations).
    save_every_steps: int = 0
    # Stop after this many optimizer steps in this process (tests simulate a crash with it).
    stop_after_steps: int | None = None


class _LossModule(nn.Module):
    """Wraps the task so DistributedDataParallel sees one forward that returns the loss."""

    def __init__(self, task: TrainingTask) -> None:
        super().__init__()
        self.inner = task.model
        self._task = task

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self._task.compute_loss(batch)


def _amp(settings: TrainSettings, device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler)."""
    mode = settings.amp
    if device.type != "cuda" or mode == "fp32":
        return False, None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return True, (torch.bfloat16 if mode == "bf16" else torch.float16), mode == "fp16"


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    steps: int = 0
    stopped_early: bool = False
    # Wall time of each epoch's batch loop (no validation, no checkpoint writing).
    epoch_seconds: list[float] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        task: TrainingTask,
        settings: TrainSettings,
        run_dir: Path,
        device: torch.device,
        dist_info: DistInfo | None = None,
        run_log: RunLog | None = None,
    ) -> None:
        self.task = task
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.device = device
        self.dist = dist_info or DistInfo()
        self.log = run_log or RunLog(self.run_dir, enabled=self.dist.is_main)

    # -- setup -------------------------------------------------------------------------------

    def _loader(self, sampler: GlobalBatchSampler):
        dataset = self.task.dataset()
        if dataset is None:
            return None
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.settings.num_workers,
            collate_fn=self.task.collate,
            persistent_workers=False,
        )

    def _batches(self, sampler: GlobalBatchSampler, loader):
        if loader is not None:
            yield from loader
        else:
            for indices in sampler:
                yield self.task.gather(indices)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        s = self.settings
        task = self.task
        groups = task.param_groups()
        trainable = {id(p) for g in groups for p in g["params"]}
        # Parameters outside the optimizer must not receive gradients (DDP would wait on them).
        for p in task.model.parameters():
            p.requires_grad_(id(p) in trainable)
        base_lrs = [g.get("lr", s.optimizer.lr) for g in groups]
        optimizer = build_optimizer(s.optimizer, groups)
        after_step = getattr(task, "after_optimizer_step", None)
        if after_step is not None:
            # After every real optimizer step (a GradScaler skip does not call step()).
            optimizer.register_step_post_hook(lambda *_: after_step())
        amp_on, amp_dtype, use_scaler = _amp(s, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        loss_module: nn.Module = _LossModule(task)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            loss_module = DistributedDataParallel(loss_module, device_ids=ids)

        sampler = GlobalBatchSampler(
            task.num_samples(), s.batch_size, s.seed, self.dist.rank, self.dist.world_size
        )
        batches_per_epoch = sampler.batches_per_epoch()
        if batches_per_epoch == 0:
            raise CirError(
                f"{task.num_samples()} training samples do not fill one batch of {s.batch_size}; "
                "lower the stage's batch_size"
            )
        steps_per_epoch = batches_per_epoch // s.grad_accum
        total_steps = s.epochs * steps_per_epoch
        if s.max_steps:
            total_steps = min(total_steps, s.max_steps) if s.epochs else s.max_steps
        schedule = LrSchedule(s.schedule, optimizer, base_lrs, steps_per_epoch, total_steps)
        result = TrainResult(self.run_dir)

        epoch, batch_in_epoch, step = 0, 0, 0
        best_value = -math.inf
        # Losses of the current epoch's batches so far (its mean is the epoch's train_loss).
        losses: list[float] = []
        resumed = False
        if self.dist.is_main:
            # Staging folders of a save that a kill interrupted: never read, only in the way.
            remove_stale_checkpoint_temps(self.run_dir)
        if resume:
            state = latest_training_state(self.run_dir)
            if state is not None:
                resumed = True
                weights, training = state
                task.load_trainable_state(weights)
                optimizer.load_state_dict(training["optimizer"])
                if use_scaler and training.get("scaler"):
                    scaler.load_state_dict(training["scaler"])
                epoch, batch_in_epoch, step = (
                    training["epoch"],
                    training["batch_in_epoch"],
                    training["step"],
                )
                best_value = training.get("best_value", -math.inf)
                # A resumed epoch's train_loss averages the batches before the kill too.
                losses = [float(v) for v in training.get("epoch_losses", [])]
                # The logs may hold rows written after this checkpoint (a kill between a row
                # and the next save): cut them back to what the checkpoint has seen, so the
                # continuation writes them again exactly as an uninterrupted run would.
                self.log.rewind(training.get("history_rows"), step)
                result.history = self.log.load_history()
                _set_rng_state(training["rng"])
                self.log.info(f"resumed from step {step} (epoch {epoch}, batch {batch_in_epoch})")
            else:
                self.log.rewind(0, -1)  # killed before its first checkpoint: start the logs anew

        def training_state() -> dict[str, Any]:
            return {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else {},
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "best_value": best_value,
                # metrics.csv rows this state has written (rewound to this on resume).
                "history_rows": len(result.history),
                "epoch_losses": list(losses),
                "rng": _rng_state(),
            }

        def validate_and_save(
            epoch_done: int, train_loss: float | None, candidate: bool = True
        ) -> None:
            nonlocal best_value
            # Validation leaves the RNG streams as it found them: whether it had to encode
            # images (a cold feature cache draws DataLoader seeds) must not change training.
            rng = _rng_state()
            metrics = task.evaluate() if self.dist.is_main else {}
            _set_rng_state(rng)
            row = {"epoch": epoch_done, "step": step, **metrics}
            if train_loss is not None:
                row["train_loss"] = train_loss
            if not self.dist.is_main:
                return
            if metrics and task.selection_metric not in metrics:
                raise CirError(
                    f"eval.selection_metric '{task.selection_metric}' is not among the "
                    f"validation metrics: {', '.join(sorted(metrics))}"
                )
            result.history.append(row)
            self.log.validation(row, task.selection_metric)
            value = metrics.get(task.selection_metric, -math.inf)
            meta = {
                **task.checkpoint_metadata(),
                "epoch": epoch_done,
                "step": step,
                "metrics": metrics,
            }
            # `best` before `last`: the `last` state then records the updated best value, and
            # a kill between the two saves repeats this validation (same weights, same `best`).
            if candidate and value > best_value:
                best_value = value
                result.best = row
                save_run_checkpoint(self.run_dir, "best", task.trainable_state(), meta)
            save_run_checkpoint(
                self.run_dir, "last", task.trainable_state(), meta, training_state()
            )

        # A run resumed from its step-0 checkpoint (saved after the first validation) continues
        # from that state; only a run with no checkpoint starts afresh.
        fresh = not resumed
        if fresh:
            # Seeded here, not only before the task was built: building it may have encoded
            # images (cold cache) or not (warm), and training (dropout, random tokens) must
            # draw the same numbers either way.
            seed_everything(s.seed)
        if fresh and s.validate_before:
            # Not a `best` candidate unless asked (or nothing will train after it).
            validate_and_save(0, None, candidate=s.select_initial or total_steps == 0)

        steps_this_process = 0
        stop = total_steps == 0
        # epochs = 0 with max_steps: a steps-only run, as many epochs as the steps need.
        while not stop and (epoch < s.epochs or (not s.epochs and s.max_steps)):
            sampler.set_epoch(epoch, skip_batches=batch_in_epoch)
            task.set_epoch(epoch)
            loader = self._loader(sampler)
            task.set_train_mode()
            started = time.perf_counter()
            seen = 0
            remaining = batches_per_epoch - batch_in_epoch
            desc = f"{task.stage} epoch {epoch + 1}/{s.epochs or '?'}"
            with progress_bar(desc, remaining, fields=True) as advance:
                for batch in self._batches(sampler, loader):
                    with torch.autocast(
                        device_type=self.device.type, dtype=amp_dtype, enabled=amp_on
                    ):
                        loss, parts = loss_module(batch)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        # Stop before the step corrupts the weights; `last` stays the last good
                        # state. (fp16 GradScaler overflows are in the gradients, not the loss:
                        # the scaler still skips those steps.)
                        self._non_finite_loss(step + 1, loss_value, parts)
                    scaler.scale(loss / s.grad_accum).backward()
                    batch_in_epoch += 1
                    losses.append(loss_value)
                    seen += s.batch_size
                    if batch_in_epoch % s.grad_accum == 0:
                        schedule.apply(step, epoch)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        steps_this_process += 1
                        rate = seen / max(time.perf_counter() - started, 1e-9)
                        lr_now = optimizer.param_groups[0]["lr"]
                        advance(
                            s.grad_accum,
                            status=f"loss {losses[-1]:.4f} lr {lr_now:.2e} {rate:.0f} samples/s",
                        )
                        if self.dist.is_main:
                            self.log.train_step(
                                task.stage,
                                step,
                                total_steps,
                                epoch,
                                s.epochs,
                                float(np.mean(losses[-s.grad_accum :])),
                                parts,
                                [g["lr"] for g in optimizer.param_groups],
                                rate,
                                s.batch_size * s.grad_accum,
                                self.device,
                                comet_every=s.log_every,
                            )
                        if (
                            s.save_every_steps
                            and step % s.save_every_steps == 0
                            and self.dist.is_main
                        ):
                            meta = {**task.checkpoint_metadata(), "epoch": epoch, "step": step}
                            save_run_checkpoint(
                                self.run_dir,
                                "last",
                                task.trainable_state(),
                                meta,
                                training_state(),
                            )
                        if (
                            (s.validate_every_steps and step % s.validate_every_steps == 0)
                            or step in s.validate_at_steps
                        ) and not (total_steps and step >= total_steps):
                            validate_and_save(epoch, float(np.mean(losses)))
                            task.set_train_mode()
                        if s.stop_after_steps and steps_this_process >= s.stop_after_steps:
                            result.steps = step
                            result.stopped_early = True
                            return result
                        if total_steps and step >= total_steps:
                            stop = True
                            break
            result.epoch_seconds.append(time.perf_counter() - started)
            epoch_loss = float(np.mean(losses)) if losses else float("nan")
            losses = []
            epoch += 1
            batch_in_epoch = 0
            self.log.epoch(epoch, epoch_loss)
            by_epoch = not s.validate_every_steps and epoch % s.validate_every == 0
            if by_epoch or stop or epoch == s.epochs:
                validate_and_save(epoch, epoch_loss)
        result.steps = step
        return result

    def _non_finite_loss(self, step: int, value: float, parts: dict[str, float]) -> None:
        bad = [k for k, v in parts.items() if isinstance(v, float) and not math.isfinite(v)]
        terms = f" (non-finite term: {', '.join(bad)})" if bad else ""
        last = checkpoint_folder(self.run_dir / "checkpoints", "last")
        kept = f"; last good checkpoint kept: {last}" if last else "; no checkpoint was saved yet"
        raise CirError(f"training stopped at step {step}: the loss is {value}{terms}{kept}")
