"""Training engine: schedule, sampler, SIGKILL + resume equality, 2-process gloo == 1 process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cir_cli.engine.optim import ScheduleContext, ScheduleSpec, schedule_factor
from cir_cli.engine.sampler import GlobalBatchSampler
from tests.conftest import REPO, toy_overrides


def test_cosine_schedule_is_clamped_and_warmup_is_linear() -> None:
    s = ScheduleSpec("cosine", warmup_steps=10, min_lr=1e-6)
    base = 1e-4

    def lr_factor(step: int, total: int, spec: ScheduleSpec = s) -> float:
        return schedule_factor(spec, ScheduleContext(step, 0, total, total, base))[0]

    assert lr_factor(0, 110) == pytest.approx(0.1)
    assert lr_factor(9, 110) == pytest.approx(1.0)
    assert lr_factor(10, 110) == pytest.approx(1.0)
    # half way through the cosine part: (1 + floor) / 2 with floor = min_lr / base = 0.01
    assert lr_factor(60, 110) == pytest.approx(0.505)
    assert lr_factor(110, 110) == pytest.approx(0.01)
    # after the end it stays at the floor (epoch_cosine is the seeds' periodic one)
    assert lr_factor(500, 110) == pytest.approx(0.01)
    assert lr_factor(1234, 10, ScheduleSpec()) == 1.0


def test_sampler_is_deterministic_resumable_and_shards_the_global_batch() -> None:
    full = GlobalBatchSampler(10, 4, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)  # drop_last
    again = GlobalBatchSampler(10, 4, seed=3)
    again.set_epoch(2)
    assert list(again) == batches
    again.set_epoch(2, skip_batches=1)
    assert list(again) == batches[1:]
    other_epoch = GlobalBatchSampler(10, 4, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != batches
    shards = []
    for rank in range(2):
        s = GlobalBatchSampler(10, 4, seed=3, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
    assert [a + b for a, b in zip(*shards, strict=True)] == batches


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", CIR_PROGRESS="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _finetune_cmd(toy_root: Path, out: Path, *extra: str) -> list[str]:
    sets = toy_overrides(
        toy_root, out, finetune__epochs=3, finetune__batch_size=32, finetune__warmup_steps=5,
        finetune__validate_every=3, eval__batch_size=64, finetune__save_every_steps=4,
    )
    cmd = [sys.executable, "-m", "cir_cli", "finetune", "--recipe", "toy_clip4cir"]
    for item in sets:
        cmd += ["--set", item]
    return cmd + list(extra)


def _last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from cir_cli.checkpoints import load_weights

    return load_weights(run_dir / "checkpoints" / "last" / "weights.safetensors")[0]


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir() and "finetune" in p.name]
    return run


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(toy_root: Path, tmp_path: Path):
    straight = tmp_path / "straight"
    subprocess.run(_finetune_cmd(toy_root, straight), env=_env(), check=True,
                   capture_output=True, timeout=600)
    expected = _last_weights(_only_run(straight))

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_finetune_cmd(toy_root, crashed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 600 triplets / 32 = 18 steps per epoch: kill inside epoch 2, after a mid-epoch save.
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        sidecar = next(crashed.glob("*/checkpoints/last/weights.safetensors.json"), None)
        if sidecar is not None:
            step = json.loads(sidecar.read_text()).get("step", 0)
            if step >= 24:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 54, "the run must be killed before its end"
    run = _only_run(crashed)
    subprocess.run(
        [sys.executable, "-m", "cir_cli", "finetune", "--resume", str(run)],
        env=_env(), check=True, capture_output=True, timeout=600,
    )
    resumed = _last_weights(run)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    history = (run / "metrics.csv").read_text().splitlines()
    assert len(history) == 3  # header + epoch 0 + epoch 3


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(toy_root: Path, tmp_path: Path) -> None:
    single, double = tmp_path / "one", tmp_path / "two"
    base = _finetune_cmd(toy_root, single)
    subprocess.run(base, env=_env(), check=True, capture_output=True, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29517", "-m", "cir_cli"]
    cmd = torchrun + _finetune_cmd(toy_root, double)[3:]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _only_run(single), _only_run(double)
    w1, w2 = _last_weights(one), _last_weights(two)
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    # Same global batches and the all-gathered loss: only the float reduction order differs
    # (the gradients agree to ~1e-6, see the test below); Adam divides by sqrt(v) + eps, which
    # magnifies that noise for near-zero gradients, so after 54 steps at lr 1e-3 weights agree
    # to a few 1e-3 and the metrics within a point.
    assert worst < 5e-3, worst
    import pandas as pd

    m1 = pd.read_csv(one / "metrics.csv").iloc[-1]
    m2 = pd.read_csv(two / "metrics.csv").iloc[-1]
    for key in ("recall_at1", "recall_at5", "recall_at10", "group_recall_at1"):
        assert math.isclose(m1[key], m2[key], abs_tol=1.0), (key, m1[key], m2[key])
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    from cir_cli.engine.losses import contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    grads = _contrastive_grads(rank, world, contrastive_loss)
    if rank == 0:
        queue.put({k: v.tolist() for k, v in grads.items()})
    dist.destroy_process_group()


def _contrastive_grads(rank: int, world: int, loss_fn):
    """Gradients of the mean CE over a global batch of 8, this rank holding 8 / world rows."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    # float64: DDP's gradient all-reduce sums in another order than one process does, and in
    # float32 that reordering alone moved one element by 4e-5 (relative) on some CPUs. In
    # float64 the same reordering costs ~1e-15, so a 1e-10 tolerance still catches any
    # wrong gathering or scaling (those are off by whole factors).
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5).double()
    inputs = torch.randn(8, 2, 6, dtype=torch.float64)
    per = 8 // world
    rows = inputs[rank * per : (rank + 1) * per]

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            q = F.normalize(self.inner(x[:, 0]), dim=-1)
            t = F.normalize(self.inner(x[:, 1]), dim=-1)
            return loss_fn(q, t, 100.0)

    module = DistributedDataParallel(Wrapped()) if world > 1 else Wrapped()
    module(rows).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_all_gathered_contrastive_loss_gives_the_single_process_gradient(tmp_path: Path):
    import torch.multiprocessing as mp

    from cir_cli.engine.losses import contrastive_loss

    expected = _contrastive_grads(0, 1, contrastive_loss)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    for name, grad in expected.items():
        torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64), grad,
                                   rtol=1e-10, atol=1e-12)
