"""Start-up cost of `cir --help` and `cir recipes list`, against a bare `python -c pass`.

Wall and CPU (user + sys of the child) time, median of N runs each; CPU time is the steadier
figure on a shared machine. Also which heavy libraries `import cir_cli.cli` pulls in (none
should: torch, transformers, pandas... are imported inside the commands that need them).

    python benchmarks/bench_startup.py            # 5 runs each
    python benchmarks/bench_startup.py --json out.json

Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "pandas", "open_clip", "gradio", "matplotlib", "numpy")


def measure(command: list[str], runs: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {
        "wall_median_s": round(statistics.median(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cir = shutil.which("cir") or str(Path(sys.executable).with_name("cir"))
    rows = {
        "python -c pass": measure([sys.executable, "-c", "pass"], args.runs),
        "cir --help": measure([cir, "--help"], args.runs),
        "cir recipes list": measure([cir, "recipes", "list"], args.runs),
    }
    probe = (
        "import sys, cir_cli.cli; print(len(sys.modules)); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    lines = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    bare = rows["python -c pass"]
    print(f"{'command':<18} {'wall (s)':>9} {'cpu (s)':>8} {'cpu / bare python':>18}")
    for name, row in rows.items():
        ratio = row["cpu_median_s"] / max(bare["cpu_median_s"], 1e-9)
        wall, cpu = row["wall_median_s"], row["cpu_median_s"]
        print(f"{name:<18} {wall:>9.3f} {cpu:>8.3f} {ratio:>17.1f}x")
    print(f"import cir_cli.cli: {lines[0]} modules; heavy libraries loaded: {lines[1] or 'none'}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        out = {
            **rows,
            "modules_after_import_cir_cli_cli": int(lines[0]),
            "heavy_modules_loaded": lines[1].split(),
            "loadavg": [round(x, 1) for x in os.getloadavg()],
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
