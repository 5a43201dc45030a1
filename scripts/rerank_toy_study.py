"""Does candidate re-ranking help on the toy? (issue 17's toy study; README "Re-ranking on the toy")

One first stage, trained once: `toy_clip4cir` as the quickstart trains it (stage I + Combiner,
seed 0); its top-50 per val query saved with `cir validate ... --save-candidates 50`. Then the
re-ranker (`toy_rerank`: stage I `cir finetune`, stage II `cir train-combiner`) with each seed,
its random frozen towers fixed by `backbone.init_seed` (so seeds vary only the trained layers'
init, data order and dropout, never the frozen ViT the stages read), validated on the saved
candidates with `rerank.fusion = "none"` (stage-II score alone, the reference) and `"sum"`
(stage-II score + w x first-stage cosine, w = CLIP4Cir's logit scale 100).

    nice -n 15 python scripts/rerank_toy_study.py --root data/toy --out runs/rerank-study \
        --seeds 0 1 2 --jobs 2
    python scripts/rerank_toy_study.py --out runs/rerank-study --table

Every step is a plain `cir` command in its own output folder (<out>/<step>), printed before it
runs; a step whose folder already holds a finished run is reused (a run still going there, by a
live pid, is waited for), so an interrupted study resumes. The feature cache stays the recipes'
(runs/.cache): with the towers fixed, the re-ranker's ViT tokens are computed once for all seeds.
Results are appended to <out>/results.jsonl; `--table` prints the README table from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIRST = "toy_clip4cir"
RERANK = "toy_rerank"
K = 50
# CLIP4Cir's training logit scale: "sum" fusion adds the two models' logits.
FUSION_WEIGHT = 100.0
METRICS = {
    "R@1": "recall_at1",
    "R@5": "recall_at5",
    "R@10": "recall_at10",
    "Rs@1": "group_recall_at1",
    "(R@5+Rs@1)/2": "mean_r5_rs1",
}
_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _finished(run: Path, command: str) -> bool:
    if command == "validate":
        return (run / "metrics.json").is_file()
    try:
        return bool(json.loads((run / "progress.json").read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return False


def _running(run: Path) -> bool:
    try:
        progress = json.loads((run / "progress.json").read_text())
    except (OSError, ValueError):
        return False
    return not progress.get("finished") and _alive(int(progress.get("pid", -1)))


def _writing_to(folder: Path) -> bool:
    """A live `cir ... -o <folder>` (Linux /proc): a run that has not written progress.json yet."""
    wanted = f"\0-o\0{folder}\0".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if wanted in b"\0" + cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def step(out: Path, name: str, recipe: str, command: str, args: list[str]) -> Path:
    """Run `cir <command> --recipe <recipe> -o <out>/<name> <args>` unless that folder already
    holds a finished run; return the run folder."""
    folder = out / name
    prefix = f"{recipe}-{'combiner' if command == 'train-combiner' else command}-"

    def runs() -> list[Path]:
        return sorted(folder.glob(prefix + "*")) if folder.is_dir() else []

    while any(_running(r) for r in runs()) or _writing_to(folder):
        time.sleep(20)
    done = [r for r in runs() if _finished(r, command)]
    if done:
        log(f"{name}: reusing {done[-1]}")
        return done[-1]
    argv = ["cir", command, "--recipe", recipe, "-o", str(folder), *args]
    log(f"{name}: {' '.join(argv)}")
    started = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    # Output to a file, not a pipe: a run outlives an interrupted study script.
    with (folder / "cir.log").open("a", encoding="utf-8") as fh:
        code = subprocess.run(
            [sys.executable, "-m", "cir_cli", *argv[1:]], stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        tail = (folder / "cir.log").read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"{name} failed ({' '.join(argv)}):\n{tail}")
    done = [r for r in runs() if _finished(r, command)]
    if not done:
        raise SystemExit(f"{name}: no finished run under {folder}")
    log(f"{name}: done in {time.time() - started:.0f} s -> {done[-1]}")
    return done[-1]


def first_stage(out: Path, root: str, stage1: Path | None = None) -> Path:
    """toy_clip4cir as the quickstart trains it, then its top-K val candidates (a folder).
    `stage1`: a finished `cir finetune --recipe toy_clip4cir` run (seed 0) to reuse."""
    base = ["--set", f"data.root={root}", "--set", "seed=0"]
    s1 = stage1 or step(out, "first_finetune", FIRST, "finetune", base)
    s2 = step(
        out,
        "first_combiner",
        FIRST,
        "train-combiner",
        [*base, "--set", f"finetune.checkpoint={s1}"],
    )
    return step(
        out,
        "first_candidates",
        FIRST,
        "validate",
        [
            *base,
            "--set",
            f"finetune.checkpoint={s1}",
            "--checkpoint",
            str(s2),
            "--save-candidates",
            str(K),
        ],
    )


def reranker(
    out: Path, root: str, seed: int, init_seed: int, stage2_epochs: int | None = None
) -> tuple[Path, Path]:
    base = [
        "--set",
        f"data.root={root}",
        "--set",
        f"seed={seed}",
        "--set",
        f"backbone.init_seed={init_seed}",
    ]
    s1 = step(out, f"rerank_s{seed}_finetune", RERANK, "finetune", base)
    # A shorter stage II keeps the recipe's schedule: its first N epochs (validated at N).
    short = [] if stage2_epochs is None else [
        "--set", f"combiner.epochs={stage2_epochs}",
        "--set", f"combiner.validate_every={stage2_epochs}",
    ]  # fmt: skip
    name = f"rerank_s{seed}_combiner" + ("" if stage2_epochs is None else f"_e{stage2_epochs}")
    s2 = step(
        out, name, RERANK, "train-combiner", [*base, "--set", f"finetune.checkpoint={s1}", *short]
    )
    return s1, s2


def evaluate(
    out: Path,
    root: str,
    seed: int,
    init_seed: int,
    s1: Path,
    s2: Path,
    cands: Path,
    stage2_epochs: int | None = None,
) -> list[dict]:
    rows = []
    tag = "" if stage2_epochs is None else f"_e{stage2_epochs}"
    for fusion in ("none", "sum"):
        run = step(
            out,
            f"rerank_s{seed}_val_{fusion}{tag}",
            RERANK,
            "validate",
            [
                "--set", f"data.root={root}",
                "--set", f"seed={seed}",
                "--set", f"backbone.init_seed={init_seed}",
                "--set", f"finetune.checkpoint={s1}",
                "--checkpoint", str(s2),
                "--set", f"rerank.candidates={cands}",
                "--set", f"rerank.k={K}",
                "--set", f"rerank.fusion={fusion}",
                "--set", f"rerank.fusion_weight={FUSION_WEIGHT}",
            ],
        )  # fmt: skip
        metrics = json.loads((run / "metrics.json").read_text())
        metrics = metrics.get("metrics", metrics)
        row = {"seed": seed, "init_seed": init_seed, "fusion": fusion, "run_dir": str(run)}
        row["stage2_epochs"] = stage2_epochs or "recipe"
        row["stage1_run"], row["stage2_run"], row["candidates"] = str(s1), str(s2), str(cands)
        for label, key in METRICS.items():
            row[f"{label} before"] = metrics[f"first_stage_{key}"]
            row[f"{label} after"] = metrics[key]
        # Stage II's own quality: R@1 of a random order of the same K candidates would be
        # (share of queries whose target is among the K) / K.
        row["R@1 random order of K"] = metrics["first_stage_recall_at50"] / K
        rows.append(row)
        with _print_lock, (out / "results.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    return rows


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def table(out: Path) -> str:
    rows: dict[tuple[str, str, int], dict] = {}
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        epochs = str(r.get("stage2_epochs", "recipe"))
        rows[(epochs, r["fusion"], r["seed"])] = r  # the last result of each
    lines = [
        "| stage II epochs | fusion | seeds | R@1 before | R@5 before | R@1 after | R@5 after |"
        " (R@5+Rs@1)/2 before | (R@5+Rs@1)/2 after | R@1 after per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for epochs in sorted({e for e, _, _ in rows}):
        shown = epochs
        if epochs == "recipe":
            from cir_cli.recipes import load_recipe

            shown = f"{load_recipe(RERANK).combiner.epochs} (recipe)"
        for fusion in ("none", "sum"):
            rs = [r for (e, f, _), r in sorted(rows.items()) if e == epochs and f == fusion]
            if not rs:
                continue
            label = "none (stage II alone)" if fusion == "none" else f"sum (w = {FUSION_WEIGHT:g})"
            cells = [
                _ms([r["R@1 before"] for r in rs]),
                _ms([r["R@5 before"] for r in rs]),
                _ms([r["R@1 after"] for r in rs]),
                _ms([r["R@5 after"] for r in rs]),
                _ms([r["(R@5+Rs@1)/2 before"] for r in rs]),
                _ms([r["(R@5+Rs@1)/2 after"] for r in rs]),
                " / ".join(f"{r['R@1 after']:.1f}" for r in rs),
            ]
            seeds = ", ".join(str(r["seed"]) for r in rs)
            lines.append(f"| {shown} | {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/toy", help="toy dataset (cir prepare toy --out ROOT)")
    p.add_argument("--out", type=Path, default=Path("runs/rerank-study"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--init-seed", type=int, default=0, help="backbone.init_seed of every re-ranker run"
    )
    p.add_argument("--jobs", type=int, default=1, help="re-ranker seeds trained at once")
    p.add_argument(
        "--stage2-epochs",
        type=int,
        help="train stage II for only the first N epochs of toy_rerank's schedule (CPU time)",
    )
    p.add_argument(
        "--first-stage-run",
        type=Path,
        help="reuse this finished toy_clip4cir stage-I run (seed 0) instead of training it",
    )
    p.add_argument("--table", action="store_true", help="print the table of <out>/results.jsonl")
    a = p.parse_args()
    if a.table:
        print(table(a.out))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    if not Path(a.root).is_dir():
        raise SystemExit(f"{a.root}: no toy dataset; run `cir prepare toy --out {a.root}`")
    with ThreadPoolExecutor(1) as first_pool, ThreadPoolExecutor(max(1, a.jobs)) as pool:
        cands = first_pool.submit(first_stage, a.out, a.root, a.first_stage_run)

        def chain(seed: int) -> list[dict]:
            s1, s2 = reranker(a.out, a.root, seed, a.init_seed, a.stage2_epochs)
            return evaluate(
                a.out, a.root, seed, a.init_seed, s1, s2, cands.result(), a.stage2_epochs
            )

        for f in [pool.submit(chain, s) for s in a.seeds]:
            f.result()
    print(table(a.out))


if __name__ == "__main__":
    main()
