"""Every paper recipe's learning rates, per parameter group and per optimizer step of the whole
run, equal an independent formula of its reference code's schedule.

The real trainer (`Trainer.fit`, the settings `workflows.train_settings` builds from the recipe,
the engine's optimizer builder and schedule registry) drives a stand-in task: tiny parameters
laid out in the reference code's parameter groups (same order and lr multiples), a few
samples per epoch so an epoch is `SPE` optimizer steps, no model forward. A global optimizer
step pre-hook records what the trainer applied right before each step. The expected values
are computed here from the reference code's own formulas (read in the reference repositories;
SPRC's curve by torch's `OneCycleLR` itself):

- Bi-BLIP4CIR stage I (src/clip_fine_tune.py + src/utils.py `cosine_lr_schedule`, called at
  the start of each epoch with onlyGroup0=True): group 0 at init * (1 + cos(pi e / 10)) / 2
  through epoch e, periodic; group 1 (text_proj) at 100 x init all run.
- CaLa (src/blip_fine_tune.py + src/utils.py): the same per-epoch cosine over max-epoch 15 on
  group 0 (the multimodal Q-Former's BERT); its query_tokens, the textual / visual Q-Formers,
  TAC, HCA (2x) and ARTEMIS (10x) at their base lr all run.
- SPRC (src/blip_fine_tune_2.py): OneCycleLR stepped after every batch; CIRR over 80 epochs of
  steps (pct_start 1/50, div 25) whatever the run length; FashionIQ over num_epochs (pct_start
  1.5/num_epochs, div 100); beta1 cycled.
- CLIP4Cir clip_fine_tune.py (AdamW) and every combiner_train.py (Adam): constant.
- LinCIR train_phi.py: get_scheduler("constant_with_warmup", 0 warm-up steps): constant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cir_cli.recipes import load_recipe

SPE = 3  # optimizer steps per epoch in these runs


class StandInTask:
    """A TrainingTask with tiny parameters in the given groups and a loss with a gradient."""

    stage = "finetune"
    selection_metric = "none"

    def __init__(self, lrs: list[float], samples: int) -> None:
        self.model = nn.Module()
        self.params = nn.ParameterList([nn.Parameter(torch.ones(2)) for _ in lrs])
        self.model.params = self.params
        self.lrs = lrs
        self.samples = samples

    def num_samples(self) -> int:
        return self.samples

    def set_epoch(self, epoch: int) -> None:
        pass

    def dataset(self):
        return None

    def collate(self, items):
        return items

    def gather(self, indices: list[int]):
        return len(indices)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p], "lr": lr} for p, lr in zip(self.params, self.lrs, strict=True)]

    def set_train_mode(self) -> None:
        self.model.train()

    def compute_loss(self, batch):
        return sum((p * p).sum() for p in self.params), {}

    def evaluate(self) -> dict[str, float]:
        return {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"p{i}": p.detach() for i, p in enumerate(self.params)}

    def load_trainable_state(self, state) -> None:
        pass

    def checkpoint_metadata(self) -> dict:
        return {"stage": self.stage}


def applied_lrs(recipe, stage: str, lrs: list[float], tmp: Path) -> list[list[tuple]]:
    """Run the real trainer; per optimizer step, (lr, beta1) of every group it applied."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cir_cli.engine.run_log import RunLog
    from cir_cli.engine.trainer import Trainer
    from cir_cli.workflows import train_settings

    settings = train_settings(recipe, stage)
    # Validation cadence and checkpoint writing do not touch the schedule: once, at the end.
    settings.validate_before = False
    settings.validate_every = 10**9
    settings.validate_every_steps = 0
    settings.save_every_steps = 0
    task = StandInTask(lrs, settings.batch_size * settings.grad_accum * SPE)
    seen: list[list[tuple]] = []

    def record(opt, _args, _kwargs) -> None:
        seen.append([(g["lr"], g["betas"][0]) for g in opt.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        log = RunLog(tmp / stage, enabled=False)
        result = Trainer(task, settings, tmp / stage, torch.device("cpu"), run_log=log).fit()
    finally:
        handle.remove()
    assert result.steps == len(seen)
    return seen


def epoch_cosine(init: float, epoch: int, max_epoch: int, min_lr: float = 0.0) -> float:
    """BLIP's utils.cosine_lr_schedule, as written there (no clamp on epoch)."""
    return (init - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def torch_onecycle(max_lr: float, epochs: int, pct: float, div: float, steps: int) -> list:
    """(lr, beta1) of torch's OneCycleLR for the first `steps` steps, as SPRC builds it."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=max_lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, pct_start=pct, div_factor=div, steps_per_epoch=SPE, epochs=epochs
    )
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return out


def assert_lrs(seen: list[list[tuple]], expected: list[list[float]], betas=None) -> None:
    assert len(seen) == len(expected)
    for step, (got, want) in enumerate(zip(seen, expected, strict=True)):
        assert [g[0] for g in got] == pytest.approx(want, rel=1e-12, abs=1e-20), step
        if betas is not None:
            assert [g[1] for g in got] == pytest.approx([betas[step]] * len(got), rel=1e-12)


# -- Bi-BLIP4CIR --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["blip4cir_cirr", "blip4cir_fiq", "blip4cir_nobi_cirr", "blip4cir_nobi_fiq"]
)
def test_blip4cir_stage1_is_the_seeds_per_epoch_periodic_cosine_on_group0(
    name: str, tmp_path: Path
) -> None:
    r = load_recipe(name)
    lr = r.finetune.lr
    seen = applied_lrs(r, "finetune", [lr, lr * 100], tmp_path)
    expected = [
        [epoch_cosine(5e-5, e, 10), 5e-5 * 100] for e in range(20) for _ in range(SPE)
    ]
    assert_lrs(seen, expected)
    # the figures of the issue: epoch 5's last step 2.5e-05; the cosine is back up by epoch 19
    assert seen[6 * SPE - 1][0][0] == pytest.approx(2.5e-5, rel=1e-12)
    assert seen[20 * SPE - 1][0][0] == pytest.approx(5e-5 * 0.5 * (1 + math.cos(1.9 * math.pi)))


@pytest.mark.parametrize("name", ["blip4cir_cirr", "blip4cir_fiq", "clip4cir_cirr", "clip4cir_fiq"])
def test_combiner_stage_is_constant_adam(name: str, tmp_path: Path) -> None:
    r = load_recipe(name)
    assert r.combiner.optimizer == "adam" and r.combiner.lr == 2e-5
    seen = applied_lrs(r, "combiner", [r.combiner.lr], tmp_path)
    assert_lrs(seen, [[2e-5]] * (300 * SPE))


def test_blip4cir_fixed_decays_per_step_and_holds_zero(tmp_path: Path) -> None:
    r = load_recipe("blip4cir_cirr_fixed")
    seen = applied_lrs(r, "finetune", [5e-5, 5e-3], tmp_path)
    span = 10 * SPE
    expected = [
        [5e-5 * 0.5 * (1 + math.cos(math.pi * min(s / span, 1.0))), 5e-3] for s in range(20 * SPE)
    ]
    assert_lrs(seen, expected)


# -- SPRC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sprc_cirr", "sprc_vitl_cirr"])
def test_sprc_cirr_onecycle_spans_80_epochs_whatever_the_run(name: str, tmp_path: Path) -> None:
    r = load_recipe(name)
    assert r.finetune.epochs == 50
    seen = applied_lrs(r, "finetune", [1e-5], tmp_path)
    ref = torch_onecycle(1e-5, 80, 1 / 50, 25.0, 50 * SPE)
    assert_lrs(seen, [[lr] for lr, _ in ref], betas=[b for _, b in ref])
    # the figure: lr / max at the start of epoch 40 (0-based) ~0.516 (cir was 0.099)
    assert seen[40 * SPE][0][0] / 1e-5 == pytest.approx(0.516, abs=0.01)


def test_sprc_fiq_onecycle_spans_its_30_epochs(tmp_path: Path) -> None:
    r = load_recipe("sprc_fiq")
    seen = applied_lrs(r, "finetune", [2e-5], tmp_path)
    ref = torch_onecycle(2e-5, 30, 1.5 / 30, 100.0, 30 * SPE)
    assert_lrs(seen, [[lr] for lr, _ in ref], betas=[b for _, b in ref])


def test_sprc_fixed_spans_the_run(tmp_path: Path) -> None:
    r = load_recipe("sprc_cirr_fixed")
    seen = applied_lrs(r, "finetune", [1e-5], tmp_path)
    ref = torch_onecycle(1e-5, 50, 1 / 50, 25.0, 50 * SPE)
    assert_lrs(seen, [[lr] for lr, _ in ref], betas=[b for _, b in ref])


# -- CaLa ---------------------------------------------------------------------------------------


def _cala_layout(r) -> list[float]:
    """CaLa src/blip_fine_tune.py's groups for the recipe (lr multiples, in order)."""
    if r.backbone.name == "blip2":  # encoder "both"
        # mm bert, mm query_tokens, text bert, visual bert, visual query_tokens, TAC, HCA
        layout = [1, 1, 1, 1, 1, 2, 2]
        return layout + ([10] if r.method.frame == "artemis" else [])
    return [1, 2, 2]  # the CLIP text tower, TAC, HCA


@pytest.mark.parametrize(
    "name",
    [
        "cala_blip2_cirr",
        "cala_blip2_fiq",
        "cala_blip2_artemis_cirr",
        "cala_clip_cirr",
        "cala_clip_fiq",
    ],
)
def test_cala_per_epoch_periodic_cosine_on_group0_only(name: str, tmp_path: Path) -> None:
    r = load_recipe(name)
    lr = r.finetune.lr
    scales = _cala_layout(r)
    seen = applied_lrs(r, "finetune", [lr * s for s in scales], tmp_path)
    expected = [
        [epoch_cosine(5e-6, e, 15)] + [5e-6 * s for s in scales[1:]]
        for e in range(30)
        for _ in range(SPE)
    ]
    assert_lrs(seen, expected)
    # epoch 15 reaches 0 and the cosine rises again: epoch 29 is back at ~0.989 x lr
    assert seen[15 * SPE][0][0] == pytest.approx(0.0, abs=1e-20)
    assert seen[29 * SPE][0][0] == pytest.approx(5e-6 * 0.5 * (1 + math.cos(math.pi * 29 / 15)))


def test_cala_fixed_decays_per_step_with_the_query_tokens_in_group0(tmp_path: Path) -> None:
    r = load_recipe("cala_blip2_cirr_fixed")
    # fixes.schedule_query_tokens: mm bert + tokens, text bert, visual bert + tokens, TAC, HCA
    scales = [1, 1, 1, 2, 2]
    seen = applied_lrs(r, "finetune", [5e-6 * s for s in scales], tmp_path)
    span = 15 * SPE
    expected = [
        [5e-6 * 0.5 * (1 + math.cos(math.pi * min(k / span, 1.0)))]
        + [5e-6 * s for s in scales[1:]]
        for k in range(30 * SPE)
    ]
    assert_lrs(seen, expected)


# -- CLIP4Cir, the zero-shot sum baselines, LinCIR -----------------------------------------------


@pytest.mark.parametrize("name", ["clip4cir_cirr", "clip4cir_fiq", "clip_sum_cirr", "clip_sum_fiq"])
def test_clip4cir_stage1_is_constant_adamw(name: str, tmp_path: Path) -> None:
    r = load_recipe(name)
    assert (r.finetune.optimizer, r.finetune.lr, r.finetune.eps) == ("adamw", 2e-6, 1e-7)
    seen = applied_lrs(r, "finetune", [r.finetune.lr], tmp_path)
    assert_lrs(seen, [[2e-6]] * (100 * SPE))


@pytest.mark.slow  # 20,000 trainer steps (~30 s on a busy 2-core CPU)
def test_lincir_is_constant_for_its_20000_steps(tmp_path: Path) -> None:
    r = load_recipe("lincir_large")
    assert (r.finetune.epochs, r.finetune.max_steps, r.finetune.warmup_steps) == (0, 20000, 0)
    seen = applied_lrs(r, "finetune", [r.finetune.lr], tmp_path)
    assert_lrs(seen, [[1e-4]] * 20000)


@pytest.mark.parametrize("name", ["lincir_huge", "lincir_giga"])
def test_lincir_huge_giga_train_as_lincir_large(name: str) -> None:
    """Only the backbone differs: the trainer gets the very settings replayed above."""
    from cir_cli.workflows import train_settings

    want = train_settings(load_recipe("lincir_large"), "finetune")
    assert train_settings(load_recipe(name), "finetune") == want


def test_moved_schedule_keys_point_to_their_new_place() -> None:
    from cir_cli.errors import CirError

    with pytest.raises(CirError, match="'method.schedule_epochs' has moved: use finetune.sched"):
        load_recipe("sprc_cirr", ["method.schedule_epochs=80"])
    with pytest.raises(CirError, match="'finetune.cosine_epochs' has moved"):
        load_recipe("blip4cir_cirr", ["finetune.cosine_epochs=10"])
