"""Benchmark of CaLa's BLIP-2 path in `cir` against the published code's way, as a table.

(a) parameters held in memory: CaLa loads three full LAVIS BLIP-2 ViT-L models (one per role);
    `cir` keeps one frozen ViT and three Q-Formers;
(b) one training step at batch B on the real-size BLIP-2 ViT-L (random weights): CaLa runs the
    frozen ViT three times per step (target, reference for the multimodal copy, reference again
    for TAC); `cir` reads cached ViT tokens and runs the Q-Formers and heads only;
(c) ARTEMIS evaluation scores for Q queries x N gallery images: CaLa's per-query broadcast
    loop vs `cir`'s factored scorer (four matrix products), same numbers.

    python benchmarks/bench_cala.py --batch 4 --queries 500 --gallery 2297

CPU only here; numbers depend on the machine. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


class _Vocab:
    """Stands in for the bert-base-uncased tokenizer (only its size shapes the model)."""

    def __len__(self) -> int:
        return 30523


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _timed(fn, repeat: int = 2) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="training batch for (b)")
    parser.add_argument("--queries", type=int, default=500, help="queries for (c)")
    parser.add_argument("--gallery", type=int, default=2297, help="gallery size for (c)")
    args = parser.parse_args()

    from cir_cli.backbones.blip2 import Blip2Backbone, QFormerCopy
    from cir_cli.modules.cala_heads import Artemis, HingeCrossAttention, TwinAttentionCompositor

    torch.manual_seed(0)
    rows: list[tuple[str, str, str, str]] = []

    # (a) + (b): the real-size ViT-L BLIP-2, random weights.
    backbone = Blip2Backbone("blip2-vit-l", _Vocab()).eval()
    copies = [QFormerCopy(backbone), QFormerCopy(backbone)]
    d = backbone.hidden_size
    tac, hca = TwinAttentionCompositor(d), HingeCrossAttention(d)
    full = _count(backbone)
    ours = full + sum(_count(c) for c in copies)
    rows.append(
        (
            "(a) BLIP-2 parameters in memory",
            f"{3 * full / 1e6:.0f} M (3 full copies)",
            f"{ours / 1e6:.0f} M (1 ViT + 3 Q-Formers)",
            f"{3 * full / ours:.2f}x",
        )
    )

    b = args.batch
    pixels = torch.randn(2 * b, 3, 224, 224)
    with torch.no_grad():
        tokens = backbone.vision_tokens(pixels)
    ids = torch.randint(1000, 2000, (b, 16))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    params = [p for c in copies for p in c.parameters()] + [
        *backbone.qformer.parameters(),
        *tac.parameters(),
        *hca.parameters(),
    ]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step(ref_tokens: torch.Tensor, tgt_tokens: torch.Tensor) -> None:
        ref, tgt = backbone.image_embeds(ref_tokens), backbone.image_embeds(tgt_tokens)
        caption = copies[0].text_outputs(ids, mask)
        reference = copies[1].multimodal_outputs(ref, ids, mask)[:, : backbone.num_query_tokens]
        target = backbone.query_outputs(tgt)
        gap = tac(backbone.query_outputs(ref), target)
        pseudo = hca(reference, caption, target, mask)
        m, r, t = caption[:, 0], reference[:, 0], F.normalize(target[:, 0], dim=-1)
        labels = torch.arange(b)
        main = 100 * F.normalize(r + m, dim=-1) @ t.T
        loss = 0.1 * F.cross_entropy(10 * pseudo @ r.T, labels) + 0.9 * F.cross_entropy(
            0.45 * 10 * m @ gap.T + 0.55 * main, labels
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def cached_step() -> None:
        step(tokens[:b], tokens[b:])

    def reference_step() -> None:
        # CaLa: the ViT runs for the target (visual copy), the reference (multimodal copy) and
        # the reference again (visual copy, for TAC); the ViT builds no graph (frozen).
        with torch.no_grad():
            tgt = backbone.vision_tokens(pixels[b:])
            ref = backbone.vision_tokens(pixels[:b])
            backbone.vision_tokens(pixels[:b])
        step(ref, tgt)

    cached = _timed(cached_step)
    recomputed = _timed(reference_step, repeat=1)
    rows.append(
        (
            f"(b) training step, batch {b}, ViT-L at 224 px",
            f"{recomputed:.2f} s (3 ViT passes)",
            f"{cached:.2f} s (cached tokens)",
            f"{recomputed / cached:.1f}x",
        )
    )
    rows.append(
        (
            "    frozen ViT tokens per image (cache, fp16)",
            "recomputed every step",
            f"{tokens.shape[1]} x {tokens.shape[2]} = {tokens[0].numel() * 2 / 1e6:.2f} MB",
            "",
        )
    )

    # (c) ARTEMIS scores: the per-query broadcast loop vs the factored scorer.
    artemis = Artemis(d).eval()
    q, n = args.queries, args.gallery
    r, m = torch.randn(q, d), torch.randn(q, d)
    gallery = F.normalize(torch.randn(n, d), dim=-1)

    def per_query() -> torch.Tensor:
        out = torch.empty(q, n)
        for i in range(q):  # CaLa's artemis validation: one query against the whole gallery
            a_em, a_is = artemis.Attention_EM(m[i : i + 1]), artemis.Attention_IS(m[i : i + 1])
            tr_m = artemis.Transform_m(m[i : i + 1])
            em = (tr_m * F.normalize(a_em * gallery, dim=-1)).sum(-1)
            ref_is = F.normalize(a_is * r[i : i + 1], dim=-1)
            is_ = (ref_is * F.normalize(a_is * gallery, dim=-1)).sum(-1)
            out[i] = em + is_
        return out

    with torch.no_grad():
        loop_time = _timed(per_query, repeat=1)
        factored_time = _timed(lambda: artemis(r, m, gallery), repeat=3)
        diff = float((per_query() - artemis(r, m, gallery)).abs().max())
    rows.append(
        (
            f"(c) ARTEMIS scores, {q} queries x {n} images",
            f"{loop_time:.2f} s (per-query loop)",
            f"{factored_time:.3f} s (factored)",
            f"{loop_time / factored_time:.0f}x (max |diff| {diff:.1e})",
        )
    )

    table = Table(title="CaLa (BLIP-2 ViT-L): published code's way vs cir (CPU)")
    for column in ("measurement", "CaLa's way", "cir", "ratio"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
