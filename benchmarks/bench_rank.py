"""Ranking, memory, cache and approximate-index benchmarks (issue 16), as ratios to bare baselines.

    python benchmarks/bench_rank.py [--repeats 3] [--threads 1] [--ann-sizes 100000x256 ...]
    python benchmarks/bench_rank.py --quick        # small shapes, a smoke run (~1 min)

Every time is CPU time (time.process_time) of one call, measured in interleaved rounds (ours,
bare, ours, bare, ...) and reported as the median over rounds of the per-round ratio, so load
from other processes on a shared machine cancels out as far as it can. Features are random
L2-normalised vectors (torch.randn), the worst case for the one-pass ranking: almost no target
lands in the top-50, so almost every target rank is counted over its whole row.

1. validate's ranking work (ranking.rank_split: top-50 + target ranks + group orders, as
   evaluation.evaluate_split calls it) vs ONE bare ``topk(q @ G.T, 50)`` per chunk of 1024
   queries; CIRR-shaped (4096 x 2297 x 640, reference removed, 6-image groups) and CIRCO-shaped
   (1000 x 123403 x 768, no removal).
2. ranking.rank_gallery vs the same bare chunked topk, 1000 x 100000 x 256.
3. Extra peak memory (VmHWM above the RSS before the call, in a fresh process) of rank_gallery
   and rank_split vs the bare chunked topk, 1000 x 100000 x 256.
4. Extra peak memory of search.rank_faiss (prebuilt exact flat index, k = 50) vs faiss's own
   ``index.search(q, 50)``, 1000 x 100000 x 256.
5. Warm feature-cache read of 40k rows x 640 floats (cache.FeatureCache over 40k image files,
   10 shards) vs ``np.load`` + copy of one array of the same rows: the repeated read (served by
   its read memo), the first read of a request (identity strings, no memo yet), and a bare loop
   of one ``os.lstat`` per image, the floor of any read that notices a file rewritten in place.
6. Approximate index (cir_cli.search.ann, default parameters): recall@50 of its top-50 vs the exact
   top-50, and the latency of 100 queries (rank_faiss on the prebuilt index, candidates
   re-scored) vs exact ranking.rank_gallery. Clustered synthetic data (N / 100 random unit
   centres, points = centre + noise, queries = a gallery point + noise), as image embeddings
   are clustered; on uniform random vectors no index can find neighbours (none are near).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("CIR_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 1024
K = 50


def _normal(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return x.div_(x.norm(dim=1, keepdim=True))


def bare_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int = K) -> None:
    for start in range(0, queries.shape[0], CHUNK):
        torch.topk(queries[start : start + CHUNK] @ gallery.T, k, dim=1)


def _cpu(fn) -> float:
    tic = time.process_time()
    fn()
    return time.process_time() - tic


def interleaved(pairs: dict, repeats: int) -> dict:
    """{name: fn} -> {name: [cpu seconds per round]}; round r runs every fn once, in turn."""
    for fn in pairs.values():
        fn()  # warm-up: page cache, allocator, BLAS
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, fn in pairs.items():
            times[name].append(_cpu(fn))
    return times


def ratio(times: dict, ours: str, bare: str) -> dict:
    per_round = [a / b for a, b in zip(times[ours], times[bare], strict=True)]
    return {
        "ours_s": statistics.median(times[ours]),
        "bare_s": statistics.median(times[bare]),
        "ratio": statistics.median(per_round),
    }


# --------------------------------------------------------------------------------------------
def bench_validate(shape: str, repeats: int, quick: bool) -> dict:
    from cir_cli import ranking

    if shape == "cirr":
        q, n, d = (512, 2297, 640) if quick else (4096, 2297, 640)
    else:
        q, n, d = (200, 20000, 768) if quick else (1000, 123403, 768)
    queries, gallery = _normal(q, d, 1), _normal(n, d, 2)
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, n, (q,), generator=gen)
    exclude = groups = None
    if shape == "cirr":
        exclude = (targets + torch.randint(1, n, (q,), generator=gen)) % n
        groups = torch.stack([torch.randperm(n, generator=gen)[:5] for _ in range(q)])
        groups[:, 0] = targets

    def ours() -> None:
        ranking.rank_split(
            queries, gallery, K, exclude, target_ids=targets, groups=groups, chunk_size=CHUNK
        )

    times = interleaved({"ours": ours, "bare": lambda: bare_topk(queries, gallery)}, repeats)
    return {"shape": f"{q} x {n} x {d}", **ratio(times, "ours", "bare")}


def bench_rank_gallery(repeats: int, quick: bool) -> dict:
    from cir_cli import ranking

    q, n, d = (200, 20000, 256) if quick else (1000, 100000, 256)
    queries, gallery = _normal(q, d, 4), _normal(n, d, 5)
    times = interleaved(
        {
            "ours": lambda: ranking.rank_gallery(queries, gallery, K, chunk_size=CHUNK),
            "bare": lambda: bare_topk(queries, gallery),
        },
        repeats,
    )
    return {"shape": f"{q} x {n} x {d}", **ratio(times, "ours", "bare")}


# --------------------------------------------------------------------------------------------
# Peak memory: each variant in a fresh process; VmHWM is reset after the inputs exist.


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child_memory(variant: str, q: int, n: int, d: int) -> None:
    from cir_cli import ranking, search

    queries, gallery = _normal(q, d, 6), _normal(n, d, 7)
    targets = torch.randint(0, n, (q,), generator=torch.Generator().manual_seed(8))
    index = None
    if variant.startswith("faiss"):
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(gallery.numpy())
    calls = {
        "bare_topk": lambda q: bare_topk(q, gallery),
        "rank_gallery": lambda q: ranking.rank_gallery(q, gallery, K, chunk_size=CHUNK),
        "rank_split": lambda q: ranking.rank_split(
            q, gallery, K, target_ids=targets[: q.shape[0]], chunk_size=CHUNK
        ),
        "faiss_alone": lambda q: index.search(q.numpy(), K),
        "faiss_path": lambda q: search.rank_faiss(q, gallery, K, index=index),
    }
    # Warm-up on 64 queries (faiss takes its BLAS path from 20): lazy initialisations such as
    # BLAS thread buffers are not counted.
    calls[variant](queries[:64])

    def fn() -> None:
        calls[variant](queries)

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        print(json.dumps({"extra_bytes": None}))
        return
    before = _status("VmRSS")
    fn()
    print(json.dumps({"extra_bytes": _status("VmHWM") - before}))


def memory(variant: str, q: int, n: int, d: int, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--child", variant, f"{q}x{n}x{d}", "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    value = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
    return None if value is None else value / 2**20


def bench_memory(repeats: int, quick: bool, threads: int) -> list[dict]:
    q, n, d = (200, 20000, 256) if quick else (1000, 100000, 256)
    rows = []
    for ours, bare in (
        ("rank_gallery", "bare_topk"),
        ("rank_split", "bare_topk"),
        ("faiss_path", "faiss_alone"),
    ):
        got: dict[str, list[float]] = {ours: [], bare: []}
        for _ in range(repeats):
            for name in (ours, bare):
                got[name].append(memory(name, q, n, d, threads))
        if None in got[ours]:
            rows.append({"measure": ours, "error": "/proc/self/clear_refs not writable"})
            continue
        a, b = statistics.median(got[ours]), statistics.median(got[bare])
        rows.append(
            {"measure": ours, "baseline": bare, "shape": f"{q} x {n} x {d}",
             "ours_mib": a, "bare_mib": b, "ratio": a / max(b, 1e-9)}
        )
    return rows


# --------------------------------------------------------------------------------------------
def bench_cache(repeats: int, quick: bool, workdir: Path) -> dict:
    from cir_cli import cache as cache_module
    from cir_cli.cache import FeatureCache

    n, d = (4000, 640) if quick else (40000, 640)
    images = workdir / "images"
    images.mkdir()
    names = [f"img{i:06d}" for i in range(n)]
    paths = {}
    for name in names:
        path = images / f"{name}.png"
        path.write_bytes(b"\x89PNG")
        paths[name] = path
    feats = _normal(n, d, 9)
    cache = FeatureCache(workdir / "cache")
    cache.get_or_compute_images(
        "bench", names, paths, lambda chunk: feats[[int(c[3:]) for c in chunk]]
    )
    plain = workdir / "plain.npy"
    np.save(plain, feats.numpy())

    def ours() -> None:
        cache.get_or_compute_images("bench", names, paths, lambda chunk: 1 / 0)

    def first_read() -> None:
        # The same read with its read memo unseen: the identity-string path a first read of a
        # request takes (plus writing the memo), as after any image changed.
        load = cache_module._ReadMemo.load
        cache_module._ReadMemo.load = lambda self: None
        try:
            cache.get_or_compute_images("bench", names, paths, lambda chunk: 1 / 0)
        finally:
            cache_module._ReadMemo.load = load

    texts = [str(paths[name]) for name in names]

    def lstat_only() -> None:
        # The floor of any read that notices an image rewritten in place: one lstat per image.
        for text in texts:
            os.lstat(text)

    def bare() -> None:
        np.load(plain, mmap_mode="r")[:].copy()

    got = cache.get_or_compute_images("bench", names, paths, lambda chunk: 1 / 0)
    assert torch.equal(got, feats)
    fns = {"ours": ours, "first": first_read, "lstat": lstat_only, "bare": bare}
    times = interleaved(fns, max(repeats, 5))
    return {
        "shape": f"{n} rows x {d}",
        **ratio(times, "ours", "bare"),
        "first": ratio(times, "first", "bare"),
        "lstat": ratio(times, "lstat", "bare"),
    }


# --------------------------------------------------------------------------------------------
def clustered(n: int, d: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 100), d, generator=gen)
    centres = centres / centres.norm(dim=1, keepdim=True)
    gallery = torch.empty(n, d)
    block = 65536
    for start in range(0, n, block):
        stop = min(n, start + block)
        which = torch.randint(0, centres.shape[0], (stop - start,), generator=gen)
        part = centres[which] + 0.6 * torch.randn(stop - start, d, generator=gen) / d**0.5
        gallery[start:stop] = part / part.norm(dim=1, keepdim=True)
    picks = torch.randint(0, n, (q,), generator=gen)
    queries = gallery[picks] + 0.6 * torch.randn(q, d, generator=gen) / d**0.5
    return queries / queries.norm(dim=1, keepdim=True), gallery


def bench_ann(n: int, d: int, kind: str, repeats: int, q: int = 100) -> dict:
    from cir_cli import ranking, search
    from cir_cli.search import ann

    queries, gallery = clustered(n, d, q, seed=n + d)
    params = ann.resolve_params(kind, {}, n)
    tic = time.perf_counter()
    index = ann.build(gallery.numpy(), kind, params)
    build_s = time.perf_counter() - tic
    exact = ranking.rank_gallery(queries, gallery, K).indices
    out = []
    # The default search parameter, then half of it (same index: only the search changes).
    key = "nprobe" if kind == "ivf" else "ef_search"
    for value in dict.fromkeys([params[key], max(1, params[key] // 2)]):
        searched = {**params, key: value}
        ann.set_search_params(index, kind, searched)
        approx, _ = search.rank_faiss(queries, gallery, K, index=index)
        hits = sum(
            len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)
        )
        times = interleaved(
            {
                "exact": lambda: ranking.rank_gallery(queries, gallery, K),
                "ann": lambda: search.rank_faiss(queries, gallery, K, index=index),
            },
            repeats,
        )
        r = ratio(times, "exact", "ann")
        out.append({
            "shape": f"{n} x {d}", "kind": kind, "params": searched, "build_s": build_s,
            "recall_at50": hits / exact.numel(), "exact_ms": 1000 * r["ours_s"],
            "ann_ms": 1000 * r["bare_s"], "speedup": r["ratio"], "queries": q,
        })
    return out


# --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: validate rank_gallery memory cache ann")
    parser.add_argument("--ann-sizes", nargs="*", default=None,
                        help="NxD sizes for the approximate index (default 100000x256 "
                        "100000x768 1000000x256; --quick: 20000x64)")
    parser.add_argument("--ann-kind", default="ivf", choices=["ivf", "hnsw"])
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
    if args.child:
        q, n, d = (int(x) for x in args.child[1].split("x"))
        child_memory(args.child[0], q, n, d)
        return
    only = set(args.only or ["validate", "rank_gallery", "memory", "cache", "ann"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} "
          "interleaved rounds, CPU time")
    table: list[tuple[str, str, str, str]] = []
    if "validate" in only:
        for shape in ("cirr", "circo"):
            r = bench_validate(shape, args.repeats, args.quick)
            table.append((f"validate ranking work, {shape.upper()}-shaped {r['shape']}",
                          f"{r['ours_s']:.3f} s vs {r['bare_s']:.3f} s",
                          f"{r['ratio']:.2f}x", "<= 1.3x"))
            print(table[-1])
    if "rank_gallery" in only:
        r = bench_rank_gallery(args.repeats, args.quick)
        table.append((f"rank_gallery vs bare topk, {r['shape']}",
                      f"{r['ours_s']:.3f} s vs {r['bare_s']:.3f} s", f"{r['ratio']:.2f}x",
                      "<= 1.2x"))
        print(table[-1])
    if "memory" in only:
        for r in bench_memory(args.repeats, args.quick, args.threads):
            if "error" in r:
                table.append((f"extra peak memory, {r['measure']}", r["error"], "-", "-"))
                continue
            goal = "<= 2x" if r["measure"] == "faiss_path" else "<= 1.6x"
            table.append((f"extra peak memory, {r['measure']} vs {r['baseline']}, {r['shape']}",
                          f"{r['ours_mib']:.0f} MiB vs {r['bare_mib']:.0f} MiB",
                          f"{r['ratio']:.2f}x", goal))
            print(table[-1])
    if "cache" in only:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_cache(args.repeats, args.quick, Path(tmp))
        table.append((f"warm cache read vs np.load + copy, {r['shape']}",
                      f"{1000 * r['ours_s']:.0f} ms vs {1000 * r['bare_s']:.0f} ms",
                      f"{r['ratio']:.2f}x", "<= 2x"))
        for what, label in (("first", "first read of a request (no read memo yet)"),
                            ("lstat", "one os.lstat per image alone (the floor)")):
            table.append((f"warm cache read: {label} vs np.load + copy",
                          f"{1000 * r[what]['ours_s']:.0f} ms vs "
                          f"{1000 * r[what]['bare_s']:.0f} ms",
                          f"{r[what]['ratio']:.2f}x", "-"))
        print(table[-3:])
    if "ann" in only:
        if faiss is None:
            table.append(("approximate index", "faiss not installed", "-", "-"))
        else:
            sizes = args.ann_sizes or (
                ["20000x64"] if args.quick else ["100000x256", "100000x768", "1000000x256"]
            )
            for size in sizes:
                n, d = (int(x) for x in size.split("x"))
                for r in bench_ann(n, d, args.ann_kind, args.repeats):
                    p = ",".join(f"{k}={v}" for k, v in r["params"].items())
                    table.append((f"approximate index ({r['kind']} {p}), {r['shape']}: "
                                  "recall@50 vs exact",
                                  f"{r['recall_at50']:.3f} (build {r['build_s']:.0f} s)",
                                  "-", ">= 0.95"))
                    table.append((f"approximate index, {r['shape']}: latency of {r['queries']} "
                                  "queries vs exact",
                                  f"{r['ann_ms']:.0f} ms vs {r['exact_ms']:.0f} ms",
                                  f"{r['speedup']:.1f}x faster", ">= 10x faster"))
                    print(table[-2:])
    print()
    print("| measure | measured | ratio | goal |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
