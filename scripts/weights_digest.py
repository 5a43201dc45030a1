"""Digest of a run's saved weights: sha256 of every tensor's bytes, keys sorted.

Bit-identity evidence across a refactor: run the same commands before and after, then compare
the digests (the file's own bytes also hold metadata such as paths and times, so the file hash
would differ even for identical weights).

    python scripts/weights_digest.py runs/toy_clip4cir-finetune-*     # one or more run folders
    python scripts/weights_digest.py runs/ --json digest.json           # every run under runs/

For each run folder, each `checkpoints/<name>/weights.safetensors` gets one line:
`<run>/<name>  <sha256 over all tensors>  <n tensors>`; `--json` writes per-tensor hashes too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def tensor_digests(path: Path) -> dict[str, str]:
    """key -> sha256 of dtype, shape and raw bytes of the tensor, for every key (sorted)."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        for key in sorted(fh.keys()):  # noqa: SIM118 (safe_open is not a dict)
            tensor = fh.get_tensor(key).contiguous()
            digest = hashlib.sha256()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            out[key] = digest.hexdigest()
    return out


def combined(per_tensor: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(per_tensor):
        digest.update(f"{key}\0{per_tensor[key]}\n".encode())
    return digest.hexdigest()


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named, or found one level below a folder that holds runs."""
    found = []
    for p in paths:
        if (p / "checkpoints").is_dir():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if (q / "checkpoints").is_dir()))
        else:
            sys.exit(f"{p}: not a run folder (no checkpoints/) nor a folder of runs")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders of runs")
    parser.add_argument("--json", type=Path, help="also write per-tensor hashes here")
    args = parser.parse_args(argv)
    report = {}
    for run in run_folders(args.paths):
        for weights in sorted((run / "checkpoints").glob("*/weights.safetensors")):
            per_tensor = tensor_digests(weights)
            name = f"{run.name}/{weights.parent.name}"
            report[name] = {"sha256": combined(per_tensor), "tensors": per_tensor}
            print(f"{name}  {report[name]['sha256']}  {len(per_tensor)}")
    if not report:
        sys.exit("no checkpoints/*/weights.safetensors found")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
