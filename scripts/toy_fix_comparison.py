"""Do the fixes help? Train each toy recipe with the reference behaviour (`toy_X`, [fixes] off)
and with the fixes on (`toy_X_fixed`), 3 seeds each, and report the selection metric of the
best validation (mean and spread) as a README table.

    python scripts/toy_fix_comparison.py --root data/toy --out runs/fix-comparison \
        --pairs toy_sprc toy_blip4cir toy_cala --seeds 0 1 2

Each run is a plain `cir finetune` (stage I; the schedule fixes act there) in its own process,
with `seed` set; results are appended to <out>/results.jsonl as they finish, so an interrupted
comparison keeps what it measured. `--table` prints the markdown table from that file.

`--set key=value` (repeatable) applies the same override to both arms, e.g. a shorter run when
the CPU is short:

    python scripts/toy_fix_comparison.py --pairs toy_sprc --out runs/fix-comparison-sprc-5ep \
        --set finetune.epochs=5 --set finetune.schedule_epochs=8 --set finetune.validate_every=1

Each row records its overrides; use a fresh --out per setting so rows of different settings are
never averaged together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_one(recipe: str, seed: int, root: str, out: Path, overrides: list[str]) -> dict:
    sets = [f"seed={seed}", f"data.root={root}", f"output.dir={out}/runs"]
    sets += [f"output.cache_dir={out}/cache", *overrides]
    code = (
        "import json, sys\n"
        "from cir_cli.recipes import load_recipe\n"
        "from cir_cli.workflows import run_training\n"
        f"r = load_recipe({recipe!r}, {sets!r})\n"
        "run = run_training(r, 'finetune')\n"
        "from cir_cli.evaluation import selection_metric\n"
        "m = selection_metric(r)\n"
        "print('RESULT ' + json.dumps({'metric': m, 'best': run.best, 'run_dir': str(run.run_dir)}))\n"  # noqa: E501
    )
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy()
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-3000:]}")
    payload = json.loads(line[len("RESULT ") :])
    best = payload["best"] or {}
    return {
        "recipe": recipe,
        "seed": seed,
        "metric": payload["metric"],
        "value": best.get(payload["metric"]),
        "best_epoch": best.get("epoch"),
        "seconds": round(time.time() - started, 1),
        "run_dir": payload["run_dir"],
        "overrides": overrides,
    }


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        runs = by.setdefault(r["recipe"], [])
        if not any(x["seed"] == r["seed"] for x in runs):  # first result of a (recipe, seed)
            runs.append(r)
    lines = [
        "| toy recipe | selection metric | reference (`toy_X`) mean ± sd | fixes on (`toy_X_fixed`)"
        " mean ± sd | per seed ref / fixed | fixes help? |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(k for k in by if not k.endswith("_fixed")):
        ref, fixed = by.get(name, []), by.get(f"{name}_fixed", [])

        def stats(rs: list[dict]) -> str:
            vals = [r["value"] for r in rs]
            if not vals:
                return "not run"
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.2f} ± {sd:.2f} (n={len(vals)})"

        seeds = sorted({r["seed"] for r in ref} | {r["seed"] for r in fixed})
        per = []
        for s in seeds:
            a = next((f"{r['value']:.2f}" for r in ref if r["seed"] == s), "-")
            b = next((f"{r['value']:.2f}" for r in fixed if r["seed"] == s), "-")
            per.append(f"s{s}: {a} / {b}")
        verdict = "-"
        if len(ref) == len(fixed) and ref:
            diff = statistics.mean(r["value"] for r in fixed) - statistics.mean(
                r["value"] for r in ref
            )
            sd = max(
                statistics.stdev([r["value"] for r in ref]) if len(ref) > 1 else 0.0,
                statistics.stdev([r["value"] for r in fixed]) if len(fixed) > 1 else 0.0,
            )
            verdict = f"{diff:+.2f}" + (" (within 1 sd)" if abs(diff) <= sd else "")
        metric = (ref or fixed)[0]["metric"]
        cells = [f"`{name}`", metric, stats(ref), stats(fixed), "; ".join(per), verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/toy")
    parser.add_argument("--out", default="runs/fix-comparison")
    parser.add_argument("--pairs", nargs="+", default=["toy_sprc", "toy_blip4cir", "toy_cala"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="run just these recipes (e.g. toy_cala_fixed)")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override applied to both arms (repeatable)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = []
    if results.exists():
        done = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        mixed = {tuple(d.get("overrides", [])) for d in done} - {tuple(args.overrides)}
        if mixed and not args.table:
            raise SystemExit(
                f"{results} holds runs with other overrides {sorted(mixed)}; use another --out"
            )
    if not args.table:
        for seed in args.seeds:
            for pair in args.pairs:
                for recipe in (pair, f"{pair}_fixed"):
                    if args.only and recipe not in args.only:
                        continue
                    if any(d["recipe"] == recipe and d["seed"] == seed for d in done):
                        continue
                    row = run_one(recipe, seed, str(Path(args.root).resolve()), out, args.overrides)
                    done.append(row)
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
