"""Reading and writing weights: the seeds' `.pt` layouts and our own safetensors format.

Every method loads published or previously trained weights through this module, so a wrong,
truncated or unsafe file is reported the same way everywhere: one CirError line naming the file
and what is wrong with it (missing / unexpected / mis-shaped keys, SHA1 mismatch, ...).

Seeds' layout (spec 7): `torch.save({'epoch': int, <ClassName>: state_dict
[, 'optimizer_state_dict': ...]})`. It is always read with `weights_only=True`: published files
come from file-sharing links, and a full unpickler would run arbitrary code from them.

Our layout: a safetensors file holding one module's state dict, plus a JSON sidecar
`<path>.json` with the run metadata (recipe, epoch, step, metrics) for humans and tools. The same
metadata is also embedded in the safetensors header, and that copy is the one `load_weights`
returns: the two files are written one after the other, so after a crash between the two writes
only the embedded copy is guaranteed to describe the weights next to it.

torch and safetensors are imported inside the functions, like elsewhere in the package, so that
importing this module (e.g. from the CLI) stays cheap.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cir_cli.errors import CirError
from cir_cli.io import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from torch import Tensor, nn

PathLike = str | os.PathLike[str]

# Key in the safetensors header under which the metadata JSON is embedded.
_EMBEDDED_METADATA_KEY = "cir_metadata"
# How many key names an error message lists per category before summarising with a count.
_MAX_LISTED = 10


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar next to a weights file: `<path>.json` (suffix appended, not replaced)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _require_file(path: PathLike, what: str = "checkpoint") -> Path:
    p = Path(path)
    if not p.exists():
        raise CirError(f"{what} not found: {p}")
    if not p.is_file():
        raise CirError(f"{what} is not a regular file: {p}")
    return p


def _first_line(text: str) -> str:
    # CirError messages must stay on one line; torch's messages are multi-line and contain ANSI.
    for line in text.replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"{shown}, ... (+{more} more)" if more > 0 else shown


def is_safetensors(path: PathLike) -> bool:
    """True when `path` is (or claims by suffix to be) a safetensors file.

    The magic check lets files keep any suffix: a safetensors file starts with an 8-byte
    little-endian header length followed by the JSON header's '{'. Torch's zip checkpoints start
    with 'PK' and legacy pickles with 0x80, so neither can be mistaken for it.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        return True
    try:
        with p.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    # A real header is small; the bound rejects arbitrary bytes that happen to be followed by '{'.
    return 0 < header_len < 100 * 1024 * 1024 and head[8:9] == b"{"


# --------------------------------------------------------------------------------------------
# Seeds' .pt layout
# --------------------------------------------------------------------------------------------


def load_torch_checkpoint(path: PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Safely load a seed `.pt` checkpoint (weights_only=True) and return its top-level dict."""
    import pickle

    import torch

    p = _require_file(path)
    if is_safetensors(p):
        raise CirError(f"{p}: is a safetensors file, not a torch .pt checkpoint; use load_weights")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        # Random bytes also fail inside the weights-only unpickler ("Unsupported operand"): that
        # is a damaged file, not an unsafe one. Any other weights-only failure is a refusal.
        if "Weights only load failed" in msg and "Unsupported operand" not in msg:
            detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), "")
            detail = detail.split(" was not an allowed global")[0].replace(
                "WeightsUnpickler error: ", ""
            )
            raise CirError(
                f"{p}: not a plain tensor checkpoint (refused for safety: loading it would run "
                f"code from the file){'; ' + detail if detail else ''}"
            ) from exc
        raise CirError(f"{p}: cannot read torch checkpoint: {_first_line(msg)}") from exc
    except Exception as exc:
        # torch.load on damaged input raises many unrelated types (RuntimeError for a truncated
        # zip, EOFError for an empty file, KeyError for random bytes): all mean "unreadable".
        reason = _first_line(str(exc))
        kind = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise CirError(f"{p}: cannot read torch checkpoint ({kind})") from exc
    if not isinstance(ckpt, dict):
        raise CirError(
            f"{p}: expected a dict like {{'epoch': int, '<ClassName>': state_dict}}, "
            f"got {type(ckpt).__name__}"
        )
    return ckpt


def extract_state_dict(ckpt: Mapping[str, Any], key: str, path: PathLike) -> dict[str, Tensor]:
    """Return `ckpt[key]` (key = the seeds' class name: 'CLIP', 'Combiner', ...) as a state dict."""
    import torch

    if key not in ckpt:
        present = ", ".join(repr(k) for k in ckpt) or "none"
        raise CirError(f"{path}: no {key!r} entry in the checkpoint; it has keys: {present}")
    sd = ckpt[key]
    if not isinstance(sd, Mapping):
        raise CirError(f"{path}: {key!r} is a {type(sd).__name__}, expected a state dict")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CirError(f"{path}: {key!r} has non-tensor entries: {_list_keys(bad)}")
    return dict(sd)


def save_seed_checkpoint(
    path: PathLike,
    class_name: str,
    state_dict: Mapping[str, Tensor],
    epoch: int,
    optimizer_state_dict: Mapping[str, Any] | None = None,
) -> None:
    """Write the seeds' `{'epoch': int, <class_name>: state_dict}` layout atomically.

    Tensors are moved to CPU so that the file loads anywhere without a map_location.
    """
    import torch

    obj: dict[str, Any] = {
        "epoch": int(epoch),
        class_name: {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    if optimizer_state_dict is not None:
        obj["optimizer_state_dict"] = optimizer_state_dict
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------------------------
# Strict loading into a module
# --------------------------------------------------------------------------------------------


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    # A pattern matches the full key or a dotted suffix of it, so 'position_ids' also catches
    # 'text_encoder.embeddings.position_ids' without every caller writing '*.position_ids'.
    return any(
        fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(key, "*." + pat) for pat in patterns
    )


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    ignore: Sequence[str] = (),
) -> None:
    """Load `state_dict` into `module`; any key or shape disagreement is a one-line CirError.

    Keys matching an `ignore` pattern (fnmatch, on the full key or a dotted suffix) are dropped
    from both sides first, e.g. 'position_ids', a buffer that some transformers versions save and
    others do not. Shapes are checked before loading because torch's own error is a multi-line
    RuntimeError that lists only the first problem class it meets.
    """
    expected = {k: v for k, v in module.state_dict().items() if not _ignored(k, ignore)}
    given = {k: v for k, v in state_dict.items() if not _ignored(k, ignore)}

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} (file {list(given[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_list_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_list_keys(mismatched)}")
    if problems:
        raise CirError(
            f"{source}: weights do not fit {type(module).__name__}: " + "; ".join(problems)
        )

    result = module.load_state_dict(given, strict=False)
    # Defensive: a module with a custom _load_from_state_dict could still disagree.
    left = [k for k in [*result.missing_keys, *result.unexpected_keys] if not _ignored(k, ignore)]
    if left:
        raise CirError(f"{source}: weights do not fit {type(module).__name__}: {_list_keys(left)}")


def named_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that train right now, by their names in `model` (what checkpoints hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_named_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy a subset of named parameters/buffers into `model`; every key must match exactly."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"unexpected keys {unknown[:10]}" + (" ..." if len(unknown) > 10 else ""))
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:10]
                )
            )
        raise CirError(f"{source}: does not fit this model: {'; '.join(parts)}")
    import torch

    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))


# --------------------------------------------------------------------------------------------
# Our own format: safetensors + JSON sidecar
# --------------------------------------------------------------------------------------------


def _prepare_for_safetensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage (safetensors refuses both).

    Tied weights (e.g. an embedding shared with an output layer) share storage; each extra user
    gets its own copy, so the file holds both names and loads back into either module layout.
    """
    import torch

    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0:
            seen.add(ptr)
        out[key] = t
    return out


def save_weights(
    path: PathLike,
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `state_dict` as safetensors at `path` and `metadata` as JSON at `<path>.json`.

    Both writes are atomic. The metadata is serialised first so that a non-JSON value fails
    before anything is written.
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta_json = json.dumps(meta, indent=2, sort_keys=False)
    tensors = _prepare_for_safetensors(state_dict)
    header = {"format": "pt", _EMBEDDED_METADATA_KEY: json.dumps(meta, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    write_text_atomic(sidecar_path(path), meta_json + "\n")


def load_weights(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by `save_weights`: (state dict on CPU, metadata).

    Metadata comes from the copy embedded in the weights file; for a foreign safetensors file
    without one it comes from the sidecar, and is {} when there is neither.
    """
    from safetensors import SafetensorError, safe_open

    p = _require_file(path, "weights file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CirError(f"{p}: cannot read safetensors file: {_first_line(str(exc))}") from exc

    embedded = header.get(_EMBEDDED_METADATA_KEY)
    side = sidecar_path(p)
    if embedded is not None:
        text, origin = embedded, f"{p} (embedded metadata)"
    elif side.is_file():
        text, origin = side.read_text(encoding="utf-8"), str(side)
    else:
        return state_dict, {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CirError(f"{origin}: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CirError(f"{origin}: metadata must be a JSON object, got {type(meta).__name__}")
    return state_dict, meta


def read_state_dict(path: PathLike, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read one module's weights from either format: (state dict, metadata).

    A safetensors file holds a single module, so `key` only selects the entry of a seed `.pt`
    file; its metadata is {'epoch': ...} when the file records one.
    """
    p = _require_file(path)
    if is_safetensors(p):
        return load_weights(p)
    ckpt = load_torch_checkpoint(p)
    meta = {"epoch": ckpt["epoch"]} if isinstance(ckpt.get("epoch"), int) else {}
    return extract_state_dict(ckpt, key, p), meta


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------


def sha1_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA1 of a file, read in chunks so multi-GB checkpoints do not need to fit in memory."""
    p = _require_file(path, "file")
    digest = hashlib.sha1()
    with p.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def check_sha1(path: PathLike, expected: str) -> None:
    """CirError unless the file's SHA1 equals `expected` (case and surrounding spaces ignored)."""
    want = expected.strip().lower()
    got = sha1_file(path)
    if got != want:
        raise CirError(
            f"{path}: SHA1 mismatch: expected {want}, got {got} "
            "(the download is damaged or is a different release)"
        )
