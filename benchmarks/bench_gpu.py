"""Real-size GPU throughput and peak memory with random weights (issue 16), as a table.

    python benchmarks/bench_gpu.py                      # on a CUDA machine (real sizes)
    python benchmarks/bench_gpu.py --device cpu --tiny  # smoke run of every code path on a CPU

Measures, each with "ours" and, where it applies, "the reference way" (what the reference
repositories do per training step):

1. BLIP-2 ViT-g/14 token extraction (the frozen tower SPRC caches), fp16 autocast, images/s.
2. An SPRC training step at batch 128 (Q-Former passes + loss + AdamW) on cached ViT tokens;
   the reference way (SPRC / LAVIS) runs the frozen ViT-g on the 2 x 128 images inside every
   step. Time per step and peak memory.
3. A BLIP4CIR stage-II (Combiner) step at batch 512 on cached features; the reference way
   (Bi-BLIP4CIR) re-encodes the 2 x 512 images with BLIP ViT-B/384 and the texts every step
   (the paper reports ~36 GB for it). Peak memory.
4. A CLIP RN50x4 stage-I step at batch 128 (both towers trained, as CLIP4Cir), without
   (the reference way) and with gradient checkpointing. Time per step and peak memory.

All models are random-initialised at the real architecture (weights do not change speed or
memory); the tokenizers use a synthetic vocabulary of bert-base's size, so nothing is
downloaded. Recipes: the papers' (sprc_cirr, blip4cir_cirr, clip4cir_cirr; --tiny: the toy_*
ones) on the synthetic toy dataset (CIRR layout) at each architecture's input size. Without CUDA
(and without --device cpu) the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

BERT_VOCAB = 30522


def synthetic_vocab(path: Path, size: int = BERT_VOCAB) -> Path:
    """A WordPiece vocab.txt of bert-base's size: special tokens, letters, filler words."""
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += letters + [f"##{c}" for c in letters] + [str(d) for d in range(10)]
    words += ["a", "the", "is", "with", "and", "of", "to", "in", "same", "but", "photo"]
    i = 0
    while len(words) < size:
        words.append(f"w{i}")
        i += 1
    path.write_text("\n".join(words[:size]) + "\n", encoding="utf-8")
    return path


class Meter:
    """Wall time per call (synchronised) and peak memory (CUDA allocator) of a callable."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        fn()  # warm-up: cuDNN autotuning, allocator, lazy init
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.repeats):
            tic = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - tic)
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        return statistics.median(times), peak


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _model(name: str, overrides: list[str], device: torch.device):
    from cir_cli import api
    from cir_cli.recipes import load_recipe

    recipe = load_recipe(name, overrides)
    return api.load_model(recipe, device=str(device))


def _batch(task, size: int):
    dataset = task.dataset()
    indices = list(range(size))
    if dataset is None:
        return task.gather(indices)
    return task.collate([dataset[i] for i in indices])


def _step_fn(task, batch, amp: torch.dtype | None, device: torch.device, before=None):
    task.set_train_mode()
    optimizer = task.make_optimizer(task.param_groups())

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            current = before(batch) if before is not None else batch
            loss, _ = task.compute_loss(current)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny architectures and batches (CPU smoke run of every path)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: vit sprc blip4cir clip")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; it measures GPU throughput and memory. Run it "
              "on a machine with a GPU, or `--device cpu --tiny` for a smoke run of its code.")
        return
    torch.manual_seed(0)
    amp = torch.float16 if device.type == "cuda" else None
    tiny = args.tiny
    repeats = 1 if tiny else args.repeats
    only = set(args.only or ["vit", "sprc", "blip4cir", "clip"])
    meter = Meter(device, repeats)
    work = Path(tempfile.mkdtemp(prefix="cir-bench-gpu-"))
    vocab = synthetic_vocab(work / "vocab.txt", 200 if tiny else BERT_VOCAB)

    from cir_cli.data.toy import generate_toy

    big = 520 if not tiny else 12
    generate_toy(work / "toy", fmt="cirr", seed=0, n_train_triplets=big, n_val_queries=4,
                 n_test_queries=0)
    base = [f'data.root="{work / "toy"}"', f'output.dir="{work / "runs"}"',
            "data.num_workers=0"]
    rows: list[tuple[str, str, str]] = []

    def peak(gib: float | None) -> str:
        return f"{gib:.1f} GiB" if gib is not None else "n/a (CPU)"

    if only & {"vit", "sprc"}:
        arch = "blip2-tiny" if tiny else "blip2-vit-g"
        over = base + [f'backbone.arch="{arch}"', 'backbone.pretrained=""',
                       "data.image_size=" + ("64" if tiny else "224")]
        if not tiny:
            over += [f'backbone.tokenizer="{vocab}"', 'backbone.precision="fp16"']
        model = _model("toy_sprc" if tiny else "sprc_cirr", over, device)
        size = model.image_size
        if "vit" in only:
            batch = 4 if tiny else 128
            pixels = torch.randn(batch, 3, size, size, device=device)

            def extract() -> None:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                     enabled=amp is not None):
                    model.backbone.vision_tokens(pixels)

            seconds, gib = meter(extract)
            rows.append((f"BLIP-2 {arch} token extraction, batch {batch}, "
                         f"{'fp16' if amp else 'fp32'}", f"{batch / seconds:.0f} images/s, "
                         f"peak {peak(gib)}", "same forward, every training step"))
            print(rows[-1])
            del pixels
        if "sprc" in only:
            batch = 4 if tiny else 128
            task = model.finetune_task(device)
            cached = _batch(task, batch)
            step = _step_fn(task, cached, amp, device)
            seconds, gib = meter(step)
            pixels = torch.randn(2 * batch, 3, size, size, device=device)

            def with_vit(b):
                with torch.no_grad():
                    tokens = model.backbone.vision_tokens(pixels)
                return tokens[:batch], tokens[batch:], b[2]

            ref_step = _step_fn(task, cached, amp, device, before=with_vit)
            ref_seconds, ref_gib = meter(ref_step)
            rows.append((f"SPRC step, batch {batch}, cached ViT tokens",
                         f"{seconds * 1000:.0f} ms/step, peak {peak(gib)}",
                         f"ViT in the step: {ref_seconds * 1000:.0f} ms/step, "
                         f"peak {peak(ref_gib)}"))
            print(rows[-1])
            del task, cached, step, ref_step, pixels
        del model
        _free(device)

    if "blip4cir" in only:
        arch = "cir-tiny-blip" if tiny else "blip-base"
        over = base + [f'backbone.arch="{arch}"', 'backbone.pretrained=""']
        if not tiny:
            over += [f'backbone.tokenizer="{vocab}"', "data.image_size=384"]
        model = _model("toy_blip4cir" if tiny else "blip4cir_cirr", over, device)
        batch = 8 if tiny else 512
        task = model.combiner_task(device)
        cached = _batch(task, batch)
        step = _step_fn(task, cached, amp, device)
        seconds, gib = meter(step)
        size = model.image_size
        pixels = torch.randn(2 * batch, 3, size, size, device=device)
        texts = ["is red and has a photo of the same"] * batch

        def reencode(b):
            with torch.no_grad():
                images = torch.cat([model.encode_images(p) for p in pixels.split(128)])
                forward = model.encode_texts(texts)
                backward = model.encode_texts(texts)
            return images[:batch], forward, backward, images[batch:]

        ref_step = _step_fn(task, cached, amp, device, before=reencode)
        ref_seconds, ref_gib = meter(ref_step)
        rows.append((f"BLIP4CIR stage II step, batch {batch}, cached features",
                     f"{seconds * 1000:.0f} ms/step, peak {peak(gib)}",
                     f"re-encoding every step: {ref_seconds * 1000:.0f} ms/step, "
                     f"peak {peak(ref_gib)}"))
        print(rows[-1])
        del model, task, cached, step, ref_step, pixels
        _free(device)

    if "clip" in only:
        arch = "cir-tiny-rn" if tiny else "RN50x4"
        batch = 4 if tiny else 128
        results = {}
        for checkpointing in (False, True):
            size = "64" if tiny else "288"
            over = base + [f'backbone.arch="{arch}"', f"data.image_size={size}",
                           'finetune.encoder="both"',
                           f"finetune.grad_checkpointing={str(checkpointing).lower()}"]
            if not tiny:
                over.append('backbone.pretrained=""')
            model = _model("toy_clip4cir" if tiny else "clip4cir_cirr", over, device)
            task = model.finetune_task(device)
            batch_data = _batch(task, batch)
            batch_data = tuple(t.to(device) if torch.is_tensor(t) else t for t in batch_data)
            results[checkpointing] = meter(_step_fn(task, batch_data, amp, device))
            del model, task, batch_data
            _free(device)
        (s0, g0), (s1, g1) = results[False], results[True]
        rows.append((f"CLIP {arch} stage I step, batch {batch}, gradient checkpointing",
                     f"{s1 * 1000:.0f} ms/step, peak {peak(g1)}",
                     f"without (reference): {s0 * 1000:.0f} ms/step, peak {peak(g0)}"))
        print(rows[-1])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, median of {repeats} step(s) after a warm-up\n")
    print("| measure | ours | the reference way |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
