"""Benchmark of the training engine's caching (issue: training engine), printed as a table.

(a) one stage-II (Combiner) epoch through `cir`'s Trainer on cached features vs the seeds' way,
    which re-reads, re-preprocesses and re-encodes every image and caption of every batch with
    the frozen encoders;
(b) the same Trainer epoch vs a bare loop of Combiner forward/backward/step over the same
    in-memory tensors (the engine's overhead);
(c) `validate` with a cold feature cache vs a warm one.

    python benchmarks/bench_engine.py --arch RN50x4 --triplets 64     # random weights
    python benchmarks/bench_engine.py --arch cir-tiny --triplets 2048

CPU only here; numbers depend on the machine. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="RN50x4", help="open_clip architecture (random init)")
    parser.add_argument("--triplets", type=int, default=64, help="training triplets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encode-batch", type=int, default=32, help="the seeds' --clip-bs")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--projection-dim", type=int, default=2560, help="CLIP4Cir's P")
    parser.add_argument("--hidden-dim", type=int, default=5120, help="CLIP4Cir's H")
    parser.add_argument("--skip-validate", action="store_true", help="skip (c)")
    args = parser.parse_args()

    from cir_cli import api
    from cir_cli.data.toy import generate_toy
    from cir_cli.engine.optim import OptimizerSpec
    from cir_cli.engine.trainer import Trainer, TrainSettings
    from cir_cli.recipes import load_recipe

    work = Path(tempfile.mkdtemp(prefix="cir-bench-"))
    generate_toy(work / "toy", n_train_triplets=args.triplets, n_val_queries=60,
                 n_test_queries=10)
    overrides = [
        f'data.root="{work / "toy"}"', f'output.dir="{work / "runs"}"',
        f'backbone.arch="{args.arch}"', "eval.batch_size=32",
        f"data.num_workers={args.workers}", f"combiner.batch_size={args.batch_size}",
        f"combiner.projection_dim={args.projection_dim}", f"combiner.hidden_dim={args.hidden_dim}",
    ]
    recipe = load_recipe("toy_clip4cir", overrides)
    recipe.data.image_size = None  # the architecture's own input size (RN50x4: 288)
    torch.manual_seed(0)
    model = api.load_model(recipe)
    rows = []

    # -- (a)/(b) stage II ----------------------------------------------------------------------
    t0 = time.perf_counter()
    task = model.combiner_task(torch.device("cpu"))
    feature_seconds = time.perf_counter() - t0  # one-off: encode every image and caption once
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, seed=0, validate_before=False,
                             validate_every=10**6,
                             optimizer=OptimizerSpec("adam", lr=recipe.combiner.lr))
    task.evaluate = lambda: {}  # time the epoch only
    trainer = Trainer(task, settings, work / "runs" / "bench", torch.device("cpu"))
    t0 = time.perf_counter()
    fit = trainer.fit()
    fit_total = time.perf_counter() - t0
    # the epoch's batch loop; the rest of fit() is writing the best/last checkpoints
    epoch_cached = fit.epoch_seconds[0]
    steps = len(task.split.triplets) // args.batch_size

    # bare loop: the same number of Combiner steps over tensors already in memory
    combiner = model.combiner
    combiner.train()
    optimizer = torch.optim.Adam(combiner.parameters(), lr=1e-4)
    feats = task.image_feats
    refs, tgts = task.ref_rows, task.tgt_rows
    texts = task.text_feats[task.variant_rows[:, 0]]
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.arange(step * args.batch_size, (step + 1) * args.batch_size)
        q = combiner.combine_features(feats[refs[idx]], texts[idx])
        logits = 100 * q @ F.normalize(feats[tgts[idx]], dim=-1).T
        loss = F.cross_entropy(logits, torch.arange(len(idx)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    epoch_bare = time.perf_counter() - t0

    # the seeds' way: decode + preprocess + encode everything of every batch, every epoch
    from cir_cli.data.images import open_rgb

    split = task.split
    t0 = time.perf_counter()
    model.eval()
    for step in range(steps):
        batch = split.triplets[step * args.batch_size : (step + 1) * args.batch_size]
        with torch.no_grad():
            parts = []
            for start in range(0, len(batch), args.encode_batch):
                chunk = batch[start : start + args.encode_batch]
                ref_px = torch.stack([model.preprocess(open_rgb(split.image_paths[t.reference]))
                                      for t in chunk])
                tgt_px = torch.stack([model.preprocess(open_rgb(split.image_paths[t.target]))
                                      for t in chunk])
                parts.append((model.encode_images(ref_px), model.encode_images(tgt_px),
                              model.encode_texts([t.captions[0] for t in chunk])))
            ref_f = torch.cat([p[0] for p in parts])
            tgt_f = torch.cat([p[1] for p in parts])
            txt_f = torch.cat([p[2] for p in parts])
        q = combiner.combine_features(ref_f, txt_f)
        loss = F.cross_entropy(100 * q @ F.normalize(tgt_f, dim=-1).T,
                               torch.arange(len(batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    epoch_reencode = time.perf_counter() - t0

    rows.append(("stage II epoch, cir (Trainer, cached features)", f"{epoch_cached:.3f} s", ""))
    rows.append(("stage II epoch, bare Combiner loop (same tensors)", f"{epoch_bare:.3f} s",
                 f"cir / bare = {epoch_cached / epoch_bare:.2f}x"))
    rows.append(("stage II epoch, re-encoding every batch (seeds)", f"{epoch_reencode:.3f} s",
                 f"re-encode / cir = {epoch_reencode / epoch_cached:.0f}x"))
    rows.append(("checkpoint writing after the epoch (best + last)",
                 f"{fit_total - epoch_cached:.3f} s", "once per validation, not per step"))
    rows.append(("one-off feature extraction for stage II", f"{feature_seconds:.2f} s",
                 "paid once, reused by every epoch, stage and run"))

    # -- (c) validate cold vs warm -------------------------------------------------------------
    if args.skip_validate:
        _print(rows, args, split)
        return
    recipe.output.cache_dir = str(work / "fresh-cache")
    t0 = time.perf_counter()
    api.validate(model, recipe)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    api.validate(model, recipe)
    warm = time.perf_counter() - t0
    rows.append(("validate, cold cache (648-image gallery)", f"{cold:.2f} s", ""))
    rows.append(("validate, warm cache", f"{warm:.2f} s", f"cold / warm = {cold / warm:.1f}x"))
    _print(rows, args, split)


def _print(rows, args, split) -> None:
    table = Table("measurement", "time", "ratio",
                  title=f"cir engine benchmark: {args.arch}, {len(split.triplets)} triplets, "
                        f"batch {args.batch_size}, {torch.get_num_threads()} threads, CPU")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
