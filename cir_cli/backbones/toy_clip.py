"""The tiny *aligned* CLIP and text corpus of the `toy_lincir` recipe, from the toy data.

LinCIR is zero-shot: it needs a CLIP whose image and text features already agree, and trains
only Phi, on text. A random tiny CLIP has no such agreement (any zero-shot method is at chance
with it), so this module first trains the tiny open_clip config `cir-tiny` contrastively on the
toy *training* images paired with descriptions of their attributes (data/toy_lincir.py); the toy
val/test images are never seen. It writes, under `<toy root>/lincir/`:

- `tiny_clip.safetensors`: the CLIP state dict (open_clip keys; `backbone.pretrained`),
- `texts.txt`: captions generated from the toy vocabulary (`method.text_files`).

Run once after `cir prepare toy`:  cir prepare toy-lincir --root data/toy
(or python -m cir_cli.backbones.toy_clip --root data/toy)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Imported for its side effect too: it registers the `cir-tiny` config with open_clip.
from cir_cli.backbones import open_clip_towers  # noqa: F401
from cir_cli.data.images import open_rgb
from cir_cli.data.text_corpus import toy_text_lines
from cir_cli.data.toy_lincir import describe, train_images
from cir_cli.data.transforms import build_transform
from cir_cli.io import atomic_path, write_text_atomic


def train_toy_clip(
    root: Path,
    out: Path,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
) -> Path:
    """Contrastively train open_clip `cir-tiny` on toy train images + attribute descriptions."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(f"cir-toy-clip/{seed}")
    items = train_images(Path(root))
    model = open_clip.create_model("cir-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("cir-tiny")
    transform = build_transform("clip", 64)
    pixels = torch.stack([transform(open_rgb(path)) for path, _ in items]).to(device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30)
        batch = rng.sample(range(len(items)), batch_size)
        texts = tokenizer([describe(items[i][1], rng) for i in batch]).to(device)
        image = F.normalize(model.encode_image(pixels[batch]), dim=-1)
        text = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        labels = torch.arange(batch_size, device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"toy CLIP step {step + 1}/{steps} loss {float(loss):.3f}", flush=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    return out


def prepare_toy_lincir(
    root: Path, steps: int = 2000, n_texts: int = 20_000, seed: int = 0
) -> tuple[Path, Path]:
    """Write `<root>/lincir/tiny_clip.safetensors` and `<root>/lincir/texts.txt`."""
    root = Path(root)
    folder = root / "lincir"
    texts = folder / "texts.txt"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(texts, "\n".join(toy_text_lines(n_texts, seed)) + "\n")
    clip = train_toy_clip(root, folder / "tiny_clip.safetensors", steps=steps, seed=seed)
    return clip, texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/toy", help="toy dataset (CIRR layout)")
    parser.add_argument("--steps", type=int, default=2000, help="CLIP training steps")
    parser.add_argument("--texts", type=int, default=20_000, help="text lines to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clip, texts = prepare_toy_lincir(Path(args.root), args.steps, args.texts, args.seed)
    print(f"wrote {clip} and {texts}")


if __name__ == "__main__":
    main()
