"""Benchmark of candidate re-ranking (TMLR'24) in `cir`, as a table.

(a) re-ranking throughput (queries/s) of the tiny config (`cir-tiny-blip`, 65 ViT tokens) on
    cached tokens: `cir`'s batched scoring (many queries x K candidates per forward) against the
    reference's way (one query at a time, one forward of its K candidates, z_t recomputed), and
    against the bare first stage (stage I ranking only, the baseline re-ranking adds to);
(b) the paper-size estimate: FLOPs of one (query, candidate) pass of the BLIP ViT-B dual
    encoder (577 tokens, L text tokens), K passes per query (+5 for CIRR's subset), and the
    measured CPU time of a few real-size passes (random weights).

    python benchmarks/bench_rerank.py --queries 200 --k 50 --real-pairs 4

CPU only here; numbers depend on the machine. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def _tiny_model():
    from cir_cli.methods import build_method
    from cir_cli.recipes import load_recipe

    model = build_method(load_recipe("toy_rerank", ["data.num_workers=0"]))
    model.eval()
    return model


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def bench_tiny(queries: int, k: int, gallery: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = _tiny_model()
    tokens = model.backbone.vision_model.config.image_size // 8
    reps = torch.randn(gallery, tokens * tokens + 1, model.backbone.vision_model.config.hidden_size)
    texts = [
        f"make the shape {'red' if i % 2 else 'blue'} and move it left" for i in range(queries)
    ]
    ref_rows = torch.randint(0, gallery, (queries,))
    cand_rows = torch.stack([torch.randperm(gallery)[:k] for _ in range(queries)])

    t_cir, ours = _timed(
        lambda: model.score_candidates(reps, ref_rows, texts, cand_rows, pairs_per_batch=512)
    )

    def reference_way():
        rows = []
        for q in range(queries):
            ids, mask = model.tokenize([texts[q]])
            z_t = model.stage1_states(reps[ref_rows[q : q + 1]], ids, mask)
            rows.append(
                model.pair_scores(
                    ids.expand(k, -1),
                    mask.expand(k, -1),
                    z_t.expand(k, -1, -1),
                    reps[cand_rows[q]],
                )
            )
        return torch.stack(rows)

    t_ref, theirs = _timed(reference_way)

    def first_stage():
        q = model.queries_from_representation(reps[ref_rows], texts)
        g = model.targets_from_representation(reps)
        return (q @ g.T).topk(k, dim=1).indices

    t_first, _ = _timed(first_stage)
    return {
        "cir": t_cir,
        "reference": t_ref,
        "first": t_first,
        "max_diff": float((ours - theirs).abs().max()),
    }


@torch.no_grad()
def bench_real(pairs: int, text_len: int) -> tuple[float, float]:
    """(GFLOPs per pair, measured seconds per pair) of the BLIP ViT-B dual encoder."""
    from cir_cli.modules.dual_encoder import DualEncoderConfig, DualEncoderScorer, attention_flops

    cfg = DualEncoderConfig(vocab_size=30524)
    flops = attention_flops(cfg, text_len, 577) / 1e9
    if pairs == 0:
        return flops, float("nan")
    scorer = DualEncoderScorer(cfg).eval()
    ids = torch.randint(1000, 2000, (pairs, text_len))
    mask = torch.ones_like(ids)
    z_t = torch.randn(pairs, text_len, 768)
    image = torch.randn(pairs, 577, 768)
    scorer(ids[:1], mask[:1], z_t[:1], image[:1])  # warm-up
    seconds, _ = _timed(lambda: scorer(ids, mask, z_t, image))
    return flops, seconds / pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--gallery", type=int, default=648)
    parser.add_argument("--real-pairs", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=20)
    args = parser.parse_args()
    console = Console()
    console.print(f"torch threads: {torch.get_num_threads()}")

    tiny = bench_tiny(args.queries, args.k, args.gallery)
    table = Table(
        "tiny config (cir-tiny-blip, 65 tokens)",
        "seconds",
        "queries/s",
        "ratio",
        title=f"re-ranking {args.queries} queries x K = {args.k}",
    )
    qps = {name: args.queries / tiny[name] for name in ("cir", "reference", "first")}
    table.add_row(
        "cir: batched (query, candidate) pairs", f"{tiny['cir']:.2f}", f"{qps['cir']:.1f}", "1.00x"
    )
    table.add_row(
        "reference way: one query per forward of K",
        f"{tiny['reference']:.2f}",
        f"{qps['reference']:.1f}",
        f"{tiny['reference'] / tiny['cir']:.2f}x slower",
    )
    table.add_row(
        "bare first stage (stage I ranking only)",
        f"{tiny['first']:.2f}",
        f"{qps['first']:.1f}",
        f"{tiny['cir'] / tiny['first']:.1f}x faster than cir",
    )
    console.print(table)
    console.print(f"max |cir - reference way| score difference: {tiny['max_diff']:.2e}")

    gflops, seconds = bench_real(args.real_pairs, args.text_len)
    real = Table("BLIP ViT-B dual encoder (577 tokens)", "value", title="paper-size estimate")
    real.add_row(f"GFLOPs per (query, candidate), L = {args.text_len}", f"{gflops:.1f}")
    for name, k in (("CIRR K = 50 + 5 subset", 55), ("FashionIQ K = 100", 100)):
        real.add_row(f"TFLOPs per query, {name}", f"{gflops * k / 1e3:.2f}")
    if seconds == seconds:
        real.add_row("CPU seconds per pair (measured)", f"{seconds:.2f}")
        real.add_row("CPU queries/s at K = 50", f"{1 / (seconds * 50):.4f}")
    console.print(real)


if __name__ == "__main__":
    main()
