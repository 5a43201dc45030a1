"""The one reading path and the one writing path for the files cir reads and writes.

Reading (`read_text`, `read_json`, `read_toml`): a file that is missing, unreadable, not UTF-8
or of the wrong shape (a JSON list where an object is expected) is one `CirError` line naming
the file, never a `UnicodeDecodeError` / `TypeError` traceback.

Writing (`atomic_path` and the helpers on top of it): a reader never sees a half-written
checkpoint, feature file or submission, and a write that the system refuses (read-only folder,
no permission, disk or quota full) is one `CirError` line naming the path (with the free space
for a full disk) while the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cir_cli.errors import CirError

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------
# Reading

_JSON_TYPE_WORDS = {dict: "object", list: "array", str: "string", int: "integer",
                    float: "number", bool: "boolean", type(None): "null"}


def json_type_word(value: Any) -> str:
    return _JSON_TYPE_WORDS.get(type(value), type(value).__name__)


def read_text(path: PathLike, what: str = "file", encoding: str = "utf-8") -> str:
    """The file's text; CirError naming the file if it is missing, unreadable or not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding=encoding)
    except FileNotFoundError:
        raise CirError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise CirError(f"{p}: is a folder, expected a {what}") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start : exc.start + 1].hex()
        raise CirError(
            f"{p}: not UTF-8 text (byte 0x{byte} at offset {exc.start}); expected a UTF-8 {what}"
        ) from None
    except OSError as exc:
        raise CirError(f"{p}: cannot read {what}: {exc.strerror or exc}") from None


def read_json(
    path: PathLike,
    what: str = "JSON file",
    expect: type | tuple[type, ...] | None = None,
    encoding: str = "utf-8",
) -> Any:
    """Parsed JSON; CirError naming the file for bad text, bad JSON or a top level not `expect`."""
    text = read_text(path, what, encoding)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CirError(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if expect is not None and not isinstance(value, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        wanted = " or ".join(f"a JSON {_JSON_TYPE_WORDS.get(k, k.__name__)}" for k in kinds)
        raise CirError(f"{path}: expected {wanted} in this {what}, got {json_type_word(value)}")
    return value


def read_toml(path: PathLike, what: str = "TOML file") -> dict[str, Any]:
    import tomllib

    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CirError(f"{path}: invalid TOML: {exc}") from None


def require_field(
    obj: dict[str, Any], key: str, kinds: type | tuple[type, ...], source: PathLike
) -> Any:
    """`obj[key]` when it has one of the JSON types `kinds`, else CirError naming source and key."""
    if key not in obj:
        raise CirError(f"{source}: no '{key}' entry")
    value = obj[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_JSON_TYPE_WORDS.get(k, k.__name__) for k in kinds)
        raise CirError(f"{source}: '{key}' must be a {wanted}, got {json_type_word(value)}")
    return value


# --------------------------------------------------------------------------------------------
# Writing

# The refusals a user fixes outside cir (another folder, permissions, free space).
WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, one in its cause/context chain, or one that a native
    writer (safetensors, torch) reported only as text ('... (os error 28)')."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = _OS_ERROR_IN_TEXT.search(str(current))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
                if free < 1024 or unit == "TiB":
                    return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
                free /= 1024
    return "unknown"


def _file_in_the_way(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder if not folder.is_dir() else None
    return None


def refuse_blocked_folder(path: PathLike) -> None:
    """CirError when a file stands where `path` or one of its parent folders would be: checked
    before long work (encoding a gallery) whose outputs would then have nowhere to go."""
    p = Path(path)
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise CirError(f"cannot write {p}: {blocker} is a file, not a folder")


def describe_write_error(
    path: PathLike, error: OSError, previous: bool = False, verb: str = "write"
) -> str:
    """One line for a refused write: the path, the reason, and what stays as it was."""
    p = Path(path)
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _file_in_the_way(p if error.errno == errno.EEXIST else p.parent)
        if blocker is not None:
            return f"cannot {verb} {p}: {blocker} is a file, not a folder"
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += f" ({_free_space(p.parent)} free)"
    kept = "; the previous version is kept" if previous and p.exists() else ""
    return f"cannot {verb} {p}: {reason}{kept}"


def write_error(path: PathLike, exc: BaseException, previous: bool = False) -> CirError | None:
    """The CirError for a write of `path` that failed with `exc`, or None for other failures."""
    found = find_os_error(exc)
    if found is None or found.errno not in WRITE_ERRNOS:
        return None
    return CirError(describe_write_error(path, found, previous))


def _umask() -> int:
    # The only portable way to read the umask is to set it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What open() would give a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """What mkdir() would give a new folder: 0777 minus the umask."""
    return 0o777 & ~_umask()


def make_dirs(path: PathLike) -> Path:
    """mkdir -p, a refused creation reported as one CirError line naming the folder."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = write_error(p, exc)
        if error is None:
            raise
        raise error from exc
    return p


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is left untouched; a write the
    system refuses (EROFS, EACCES, ENOSPC, EDQUOT, ...) becomes one CirError line naming `path`.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600 files; outputs get the usual permissions (0666 minus the umask).
        os.chmod(tmp, file_mode())
        yield tmp
        # Again after the write: some writers (safetensors) recreate the file as 0600.
        os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        error = write_error(final, exc, True) if not isinstance(exc, CirError) else None
        if error is not None:
            raise error from exc
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` (kept until then) on success.

    The previous folder is renamed to `<name>.old` for the instant between the two renames, so
    a crash leaves either the old or the new folder complete (readers try `<name>.old` when
    `<name>` is missing). Temporary folders are named `.<name>.*`: `remove_stale_temp` cleans
    the ones a killed process left behind.
    """
    final = Path(path)
    staging: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        # mkdtemp creates 0700 folders; outputs get the usual permissions (0777 minus umask).
        os.chmod(staging, dir_mode())
        yield staging
        old = final.with_name(f"{final.name}.old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        staging.rename(final)
        staging = None
        if old.exists():
            shutil.rmtree(old)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        # A file inside the staging folder was refused: name the folder the user asked for.
        error = write_error(final, exc, True)
        if error is not None:
            raise error from exc
        raise


def remove_stale_temp(folder: PathLike, name: str) -> list[Path]:
    """Remove the `.<name>.*` temporary files/folders a killed writer left in `folder`.

    Call only where no other process writes `name` at the same time (a run's own folder).
    """
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for stale in root.glob(f".{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, obj: Any, **kwargs: Any) -> None:
    kwargs.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(obj, **kwargs) + "\n")
