"""Benchmark `cir index` / `cir search` (issue 8): build throughput and search latency.

    python benchmarks/bench_search.py [--sizes 10000 100000] [--dim 256] [--repeats 20]

1. Index build throughput (images/s) on the toy val gallery (648 images of 64 px) with the tiny
   random-initialised CLIP of `toy_clip4cir`: decoding + preprocessing + encoding, as
   `cir index` does it (model loading excluded).
2. Search latency over random L2-normalised features stored as a real index features file and
   opened memory-mapped (as `cir search` does): one query and a batch of 100 queries, k = 12,
   with the exact torch path (ranking.rank_gallery) and, when installed, faiss (an exact flat
   inner-product index, built per search as `cir search` would, and prebuilt for reference).
   The two paths' top-k indices are compared.

Query encoding and model loading are not part of the latency figures (they do not depend on the
gallery size). Timings are medians; the machine's other load shows up in them (use --threads 1
on a shared, oversubscribed machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, BLAS threads)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def bench_build(workdir: Path, num_workers: int) -> dict[str, float]:
    from cir_cli import api
    from cir_cli import search as lib
    from cir_cli.data.toy import generate_toy
    from cir_cli.recipes import load_recipe

    root = workdir / "toy"
    generate_toy(root, "cirr", seed=0, n_train_triplets=6, n_val_queries=10, n_test_queries=0)
    recipe = load_recipe("toy_clip4cir", [f'data.root="{root}"'])
    model = api.load_model(recipe, device="cpu")
    summary = lib.build_index(
        root / "dev", recipe, workdir / "toy.cirindex", model=model, num_workers=num_workers
    )
    return {
        "images": float(summary.total),
        "images_per_s": summary.images_per_second,
        "seconds": summary.encode_seconds,
    }


def bench_search(workdir: Path, n: int, dim: int, repeats: int, k: int = 12) -> list[dict]:
    from cir_cli import search as lib
    from cir_cli.ranking import rank_gallery

    gen = torch.Generator().manual_seed(n)
    feats = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1).numpy()
    path = workdir / f"features-{n}.npy"
    np.save(path, feats)
    del feats
    gallery = torch.from_numpy(np.load(path, mmap_mode="c"))
    rows = []
    for q in (1, 100):
        queries = torch.nn.functional.normalize(torch.randn(q, dim, generator=gen), dim=-1)
        ref = rank_gallery(queries, gallery, k)
        row = {
            "gallery": n,
            "queries": q,
            "torch_ms": _median_ms(
                lambda queries=queries: rank_gallery(queries, gallery, k), repeats
            ),
        }
        if lib.faiss_available():
            import faiss

            idx, _ = lib.rank_faiss(queries, gallery, k)
            row["same"] = bool(torch.equal(idx, ref.indices))
            row["faiss_ms"] = _median_ms(
                lambda queries=queries: lib.rank_faiss(queries, gallery, k), repeats
            )
            flat = faiss.IndexFlatIP(dim)
            flat.add(np.ascontiguousarray(gallery.numpy()))
            qn = queries.numpy()
            row["faiss_prebuilt_ms"] = _median_ms(
                lambda qn=qn, flat=flat: flat.search(qn, k), repeats
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/faiss threads (default: torch's). On a busy machine 1 thread avoids OpenMP "
        "barrier stalls that inflate every elementwise op of the ranking by 100x.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from cir_cli import search as lib

    console = Console()
    if args.threads and lib.faiss_available():
        import faiss

        faiss.omp_set_num_threads(args.threads)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"faiss {'installed' if lib.faiss_available() else 'not installed'}"
    )
    with tempfile.TemporaryDirectory(prefix="cir-bench-search-") as tmp:
        workdir = Path(tmp)
        if not args.skip_build:
            build = bench_build(workdir, args.num_workers)
            table = Table("index build", "images", "seconds", "images/s", header_style="bold")
            table.add_row(
                f"toy val gallery, cir-tiny, {args.num_workers} workers",
                f"{build['images']:.0f}",
                f"{build['seconds']:.2f}",
                f"{build['images_per_s']:.1f}",
            )
            console.print(table)
        table = Table(
            "gallery",
            "queries",
            "torch (ms)",
            "faiss per search (ms)",
            "faiss prebuilt (ms)",
            "same top-k",
            title=f"search latency, {args.dim}-d, k=12, median of {args.repeats}",
            header_style="bold",
        )
        for n in args.sizes:
            for row in bench_search(workdir, n, args.dim, args.repeats):
                table.add_row(
                    f"{row['gallery']:,}",
                    str(row["queries"]),
                    f"{row['torch_ms']:.1f}",
                    f"{row['faiss_ms']:.1f}" if "faiss_ms" in row else "-",
                    f"{row['faiss_prebuilt_ms']:.1f}" if "faiss_prebuilt_ms" in row else "-",
                    str(row.get("same", "-")),
                )
        console.print(table)


if __name__ == "__main__":
    main()
