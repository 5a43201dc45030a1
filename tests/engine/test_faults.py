"""Faults: SIGKILLs at random moments, a full disk, a read-only output folder, two processes on
one feature cache, a non-finite loss. After each: one clear line, and nothing lost."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cir_cli.cli import app
from tests.conftest import REPO

runner = CliRunner()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", CIR_PROGRESS="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cir_cli.data.toy import generate_toy

    root = tmp_path_factory.mktemp("fault_toy")
    generate_toy(root, fmt="cirr", seed=0, n_train_triplets=64, n_val_queries=24,
                 n_test_queries=12)
    return root


def _sets(toy: Path, out: Path, cache: Path, **extra: object) -> list[str]:
    items = {
        "data.root": str(toy), "output.dir": str(out), "output.cache_dir": str(cache),
        "data.num_workers": 0, "finetune.epochs": 2, "finetune.batch_size": 8,
        "finetune.warmup_steps": 2, "finetune.validate_every": 1, "finetune.save_every_steps": 1,
        "eval.batch_size": 32, **extra,
    }
    return [arg for k, v in items.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


def _finetune(toy: Path, out: Path, cache: Path, **extra: object) -> list[str]:
    return [sys.executable, "-m", "cir_cli", "finetune", "--recipe", "toy_clip4cir",
            *_sets(toy, out, cache, **extra)]


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir() and "finetune" in p.name]
    return run


def _last_step(out: Path) -> int:
    sidecar = next(out.glob("*/checkpoints/last/weights.safetensors.json"), None)
    if sidecar is None:
        return -1
    try:
        return int(json.loads(sidecar.read_text()).get("step", -1))
    except (OSError, ValueError):
        return -1  # replaced while being read


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from cir_cli.checkpoints import load_weights

    return load_weights(folder / "weights.safetensors")[0]


# Columns that measure wall-clock time (train_log.csv's throughput and elapsed time): no two
# runs share them, killed or not. Every other value must be identical.
_CLOCK_COLUMNS = {"samples_per_s", "elapsed_s"}


def _logs(run: Path) -> dict[str, list[list[str]]]:
    """metrics.csv and every per-step CSV log of a run folder, less the clock columns."""
    import csv

    logs = {}
    for path in sorted(run.glob("*.csv")):
        rows = list(csv.reader(path.read_text().splitlines()))
        keep = [i for i, name in enumerate(rows[0]) if name not in _CLOCK_COLUMNS]
        logs[path.name] = [[row[i] for i in keep] for row in rows]
    return logs


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_an_uninterrupted_run(small_toy: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    # 48 steps (3 epochs of 16): enough that 12 kills land before the run ends even on an idle
    # machine, where one launch may get through several steps before its kill.
    longer = {"finetune.epochs": 3, "finetune.batch_size": 4}
    subprocess.run(_finetune(small_toy, straight, cache, **longer), env=_env(), check=True,
                   capture_output=True, timeout=600)
    expected_run = _only_run(straight)

    rng = random.Random(12)
    crashed = tmp_path / "crashed"
    kills, launches, run = 0, 0, None
    deadline = time.time() + 900
    while time.time() < deadline:
        cmd = (_finetune(small_toy, crashed, cache, **longer) if run is None else
               [sys.executable, "-m", "cir_cli", "finetune", "--resume", str(run)])
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        launches += 1
        start_step = _last_step(crashed)
        if kills < 12:
            # Kill at a random moment once this process has saved something new: inside a
            # step, a validation or the write of a checkpoint folder (every step saves).
            while proc.poll() is None and _last_step(crashed) <= start_step:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=600)
        if run is None:
            run = _only_run(crashed)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert kills >= 10, f"only {kills} kills in {launches} launches"
    print(f"{kills} SIGKILLs in {launches} launches")  # shown with -rP (for the note)

    assert _weights(run / "checkpoints" / "last").keys() == _weights(
        expected_run / "checkpoints" / "last").keys()
    for name in ("last", "best"):
        got, want = _weights(run / "checkpoints" / name), _weights(
            expected_run / "checkpoints" / name)
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)
    assert _logs(run) == _logs(expected_run)
    assert len(_logs(run)["metrics.csv"]) == 5  # header + epochs 0, 1, 2, 3
    steps = json.loads((run / "checkpoints/last/weights.safetensors.json").read_text())["step"]
    assert len(_logs(run)["train_log.csv"]) == 1 + steps  # header + one row per step
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert leftovers == ["best", "last"], leftovers
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_step_0_checkpoint_resumes_instead_of_restarting(
    small_toy: Path, tmp_path: Path, monkeypatch
) -> None:
    """Killed right after the first validation's checkpoint (step 0): --resume continues from
    it (no second validation row) and ends where an uninterrupted run ends."""
    from cir_cli.methods.clip4cir import Clip4Cir
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_training

    def recipe(out: Path):
        args = _sets(small_toy, out, tmp_path / "cache", **{"finetune.epochs": 1})
        return load_recipe("toy_clip4cir", args[1::2])

    straight = run_training(recipe(tmp_path / "a"), "finetune")

    class Killed(BaseException):
        pass

    real = Clip4Cir.finetune_task

    def dies_at_first_step(self, device):
        task = real(self, device)

        def compute_loss(batch):
            raise Killed

        task.compute_loss = compute_loss
        return task

    monkeypatch.setattr(Clip4Cir, "finetune_task", dies_at_first_step)
    with pytest.raises(Killed):
        run_training(recipe(tmp_path / "b"), "finetune")
    monkeypatch.undo()
    run = _only_run(tmp_path / "b")
    assert json.loads((run / "checkpoints/last/weights.safetensors.json").read_text())["step"] == 0
    resumed = run_training(None, "finetune", resume=str(run))
    assert _logs(run) == _logs(straight.run_dir)
    for key, value in _weights(straight.run_dir / "checkpoints" / "last").items():
        assert torch.equal(_weights(run / "checkpoints" / "last")[key], value), key
    assert resumed.steps == straight.steps


# ----------------------------------------------------------------------- refused writes


def _toy_args(small_toy: Path, out: Path, cache: Path) -> list[str]:
    return ["validate", "--recipe", "toy_clip4cir", "-o", str(out),
            "--set", f'data.root="{small_toy}"', "--set", "data.num_workers=0",
            "--set", f'output.cache_dir="{cache}"']


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    """ENOSPC injected into the writes of the second `last` save: one line with the free
    space, the first `last` checkpoint intact, no staging folder left."""
    from cir_cli.runs import save_run_checkpoint

    run = tmp_path / "run"
    weights = {"w": torch.arange(6.0)}
    first = save_run_checkpoint(run, "last", weights, {"step": 1}, {"step": 1})
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return Full(fh) if "w" in mode and "training_state" in str(file) else fh

    import builtins

    from cir_cli.errors import CirError

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(CirError) as info:
        save_run_checkpoint(run, "last", {"w": torch.zeros(6)}, {"step": 2}, {"step": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {run / 'checkpoints' / 'last'}: No space left")
    assert " free)" in message and "previous version is kept" in message
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_disk_full_on_a_real_small_tmpfs(small_toy: Path, tmp_path: Path) -> None:
    """A 256 KiB tmpfs as the output folder (root only; elsewhere the injected test above):
    the checkpoint cannot fit; one line naming the folder with its free space."""
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "256k"):
        pytest.skip("mounting a tmpfs needs root on Linux (the injected ENOSPC test covers it)")
    try:
        from cir_cli.errors import CirError
        from cir_cli.runs import save_run_checkpoint

        small = save_run_checkpoint(mount, "last", {"w": torch.ones(8)}, {"step": 1}, {"step": 1})
        before = {p.name: p.read_bytes() for p in small.iterdir()}
        with pytest.raises(CirError, match=r"No space left on device \([0-9.]+ \w+ free\)"):
            save_run_checkpoint(mount, "last", {"w": torch.ones(200_000)}, {"step": 2},
                                {"step": 2})
        assert {p.name: p.read_bytes() for p in small.iterdir()} == before
        assert sorted(p.name for p in (mount / "checkpoints").iterdir()) == ["last"]
        # The same through the CLI: `cir validate` writing its run folder onto the full disk.
        filler = mount / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            fh.write(b"\0" * 1024 * 1024)  # fill the rest of the disk
        result = runner.invoke(app, _toy_args(small_toy, mount / "runs", tmp_path / "cache"))
        line = _one_line(result)
        assert str(mount / "runs") in line and "No space left on device" in line
        assert "free)" in line
        assert not (mount / "runs").exists() or list((mount / "runs").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_read_only_output_folder_is_one_line(small_toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:
        # root ignores permission bits: make the folder a read-only bind mount instead.
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(out), str(out)],
                              capture_output=True)
        mounted = done.returncode == 0
        if not mounted:
            pytest.skip("running as root without mount rights: cannot make a read-only folder")
    else:
        out.chmod(0o555)
    try:
        result = runner.invoke(app, _toy_args(small_toy, out / "runs", tmp_path / "cache"))
        line = _one_line(result)
        assert f"cannot write {out / 'runs'}" in line or f"cannot access {out / 'runs'}" in line
        assert "Read-only file system" in line or "Permission denied" in line
        assert list(out.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], capture_output=True)
        else:
            out.chmod(0o755)


# ---------------------------------------------------------------------- two processes, one cache


@pytest.mark.slow
def test_two_concurrent_validations_on_one_cache(small_toy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cmds = [
        [sys.executable, "-m", "cir_cli", "validate", "--recipe", "toy_clip4cir",
         "-o", str(tmp_path / f"out{i}"), "--set", f'data.root="{small_toy}"',
         "--set", "data.num_workers=0", "--set", f'output.cache_dir="{cache}"']
        for i in range(2)
    ]
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    metrics = [json.loads(next((tmp_path / f"out{i}").glob("*/metrics.json")).read_text())
               for i in range(2)]
    assert metrics[0] == metrics[1]
    # Every committed shard is whole: its array has as many rows as its names file, and no
    # two shards share a number (each .json has its own .npy).
    import numpy as np

    shards = list(cache.rglob("shard-*.json"))
    assert shards
    for names_file in shards:
        names = json.loads(names_file.read_text())
        array = np.load(names_file.with_suffix(".npy"), mmap_mode="r")
        assert array.shape[0] == len(names), names_file
    assert not list(cache.rglob("*.claim")) and not list(cache.rglob(".*.tmp"))
    # A third run reads everything from the cache and agrees.
    again = subprocess.run(cmds[0], env=_env(), capture_output=True, timeout=600)
    assert again.returncode == 0
    third = sorted((tmp_path / "out0").glob("*/metrics.json"))[-1]
    assert json.loads(third.read_text()) == metrics[0]


def test_shard_numbers_are_claimed_once(tmp_path: Path) -> None:
    """The claim is exclusive: a number whose claim or JSON exists is skipped."""
    from cir_cli.cache import _claim_shard

    stem_a, claim_a = _claim_shard(tmp_path, 0)
    stem_b, claim_b = _claim_shard(tmp_path, 0)  # a second writer while the first still writes
    assert stem_a.name == "shard-00000" and stem_b.name == "shard-00001"
    stem_a.with_suffix(".json").write_text("[]")
    claim_a.unlink()
    stem_c, _ = _claim_shard(tmp_path, 0)
    assert stem_c.name == "shard-00002"


# ----------------------------------------------------------------------------- non-finite loss


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    small_toy: Path, tmp_path: Path, monkeypatch
) -> None:
    from cir_cli.methods.clip4cir import Clip4Cir

    calls = {"n": 0}
    real = Clip4Cir.finetune_task

    def poisoned(self, device):
        task = real(self, device)
        compute = task.compute_loss

        def compute_loss(batch):
            loss, parts = compute(batch)
            calls["n"] += 1
            if calls["n"] == 3:  # the third step's loss is NaN
                return loss * float("nan"), {**parts, "contrastive": float("nan")}
            return loss, parts

        task.compute_loss = compute_loss
        return task

    monkeypatch.setattr(Clip4Cir, "finetune_task", poisoned)
    args = ["finetune", "--recipe", "toy_clip4cir",
            *_sets(small_toy, tmp_path / "runs", tmp_path / "cache")]
    result = runner.invoke(app, args)
    # Training prints its validation lines to stderr before: the error is the one last line.
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    line = lines[-1]
    assert [x for x in lines if x.startswith("error")] == [line]
    run = _only_run(tmp_path / "runs")
    last = run / "checkpoints" / "last"
    assert line == (
        "error: training stopped at step 3: the loss is nan (non-finite term: contrastive); "
        f"last good checkpoint kept: {last}"
    )
    assert json.loads((last / "weights.safetensors.json").read_text())["step"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(last).values())


def test_checkpoints_respect_the_umask(tmp_path: Path) -> None:
    from cir_cli.runs import save_run_checkpoint

    old = os.umask(0o022)
    try:
        folder = save_run_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, {}, {"step": 0})
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_stale_staging_folders_are_removed_at_the_next_start(tmp_path: Path) -> None:
    from cir_cli.runs import remove_stale_checkpoint_temps

    root = tmp_path / "checkpoints"
    (root / ".last.abc123").mkdir(parents=True)
    (root / ".last.abc123" / "weights.safetensors").write_bytes(b"half")
    (root / ".best.x").mkdir()
    (root / "last").mkdir()
    (tmp_path / ".metrics.csv.k2j3.tmp").write_text("epoch,st")
    (tmp_path / "metrics.csv").write_text("epoch,step\n")
    removed = remove_stale_checkpoint_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".best.x", ".last.abc123", ".metrics.csv.k2j3.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.csv"]


def test_rewind_cuts_the_logs_back_to_the_checkpoint(tmp_path: Path) -> None:
    """metrics.csv to the checkpoint's row count, per-step logs to its step (a row cut off
    mid-append dropped), other CSV files untouched."""
    from cir_cli.engine.run_log import RunLog

    (tmp_path / "metrics.csv").write_text("epoch,step,r\n0,0,1.0\n1,4,2.0\n2,8,3.0\n")
    (tmp_path / "train_log.csv").write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.2\n5,0.")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    RunLog(tmp_path).rewind(2, 3)
    assert (tmp_path / "metrics.csv").read_text() == "epoch,step,r\n0,0,1.0\n1,4,2.0\n"
    assert (tmp_path / "train_log.csv").read_text() == "step,loss\n1,0.5\n2,0.4\n3,0.3\n"
    assert (tmp_path / "notes.csv").read_text() == "a,b\n1,2\n"
    RunLog(tmp_path).rewind(None, 0)  # a checkpoint from before the row count: by step
    assert (tmp_path / "metrics.csv").read_text() == "epoch,step,r\n0,0,1.0\n"
