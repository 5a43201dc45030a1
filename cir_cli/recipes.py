"""TOML recipes: built-in lookup, `extends`, `--set` overrides, one-line errors, TOML output.

A recipe picks the method, backbone and dataset and holds every hyper-parameter of a run. It is
the single source of truth: every run writes the resolved recipe into its manifest. The schema
(the sections and their keys) is `cir_cli.config`.

It imports only the standard library, pydantic and light cir_cli modules (no torch), so `cir
recipes list`, `show` and dry runs stay fast.
"""

from __future__ import annotations

import difflib
import shutil
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from cir_cli.config import BACKBONE_CONFIGS, BackboneConfig, MethodSection, Recipe
from cir_cli.errors import CirError
from cir_cli.io import read_toml
from cir_cli.registry import method_config

# --------------------------------------------------------------------------------------------
# Built-in recipes


def builtin_dir() -> Path:
    """Where the shipped recipes are: inside the installed wheel, or the checkout's recipes/."""
    package_copy = Path(__file__).resolve().parent / "recipes"
    if package_copy.is_dir():
        return package_copy
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def header_comment(path: Path) -> str:
    """The leading comment block of a recipe file (what it reproduces and how to run it)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def find_recipe(name_or_path: str) -> Path:
    """Resolve a built-in recipe name or a path to a TOML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or candidate.is_file() or "/" in name_or_path:
        if not candidate.is_file():
            raise CirError(f"recipe file not found: {candidate}")
        return candidate
    builtin = builtin_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    close = difflib.get_close_matches(name_or_path, builtin_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CirError(
        f"unknown recipe '{name_or_path}'{hint} (`cir recipes list` shows the built-in ones; "
        "a path to a .toml file also works)"
    )


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and, recursively, the recipe it `extends`; the child's keys win."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise CirError(f"{path}: 'extends' forms a cycle: {cycle}")
    raw = read_toml(path, "recipe")
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str):
        raise CirError(f"{path}: 'extends' must be a recipe name or path (a string)")
    if not Path(parent_name).is_absolute() and (path.parent / f"{parent_name}.toml").is_file():
        parent = path.parent / f"{parent_name}.toml"
    else:
        parent = find_recipe(parent_name)
    return _deep_merge(_load_raw(parent, (*chain, resolved)), raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`finetune.lr=1e-5` -> (['finetune', 'lr'], 1e-05).

    Values are TOML literals; bare words (paths, model names) are strings.
    """
    if "=" not in item:
        raise CirError(f"--set {item!r}: expected key.path=value, e.g. --set finetune.lr=1e-5")
    key, value_text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CirError(f"--set {item!r}: empty key; expected key.path=value")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text  # a bare string such as a path or a model name
    return key.split("."), value


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`--set key.path=value` items (TOML literals), then `values` ({'output.dir': path}) that
    are already typed: a CLI option's value is set as given, never re-parsed as TOML."""
    result = _deep_merge({}, raw)
    parsed = [(item, *parse_override(item)) for item in overrides]
    parsed += [(f"{key}={value}", key.split("."), value) for key, value in (values or {}).items()]
    for item, path, value in parsed:
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CirError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation can hold (unwraps Annotated / Union / Optional)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _members(args[0])
    if args:
        return [m for a in args for m in _members(a)]
    return (
        [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    )


def _resolve_loc(loc: tuple[Any, ...], raw: Any) -> tuple[list[str], list[type[BaseModel]]]:
    """(key path without union tags, the section classes the last key can sit in)."""
    current: list[type[BaseModel]] = [Recipe]
    path: list[str] = []
    for i, part in enumerate(loc):
        fields = {f: m.model_fields[f] for m in current for f in m.model_fields}
        if part not in fields:
            # A discriminated union puts the member's tag in the location: pick that member.
            tagged = [
                m
                for m in current
                if m.model_fields.get("name") is not None
                and typing.get_args(m.model_fields["name"].annotation) == (part,)
            ]
            if tagged:
                current = tagged
                continue
            return path + [str(p) for p in loc[i:]], current
        path.append(str(part))
        raw = raw.get(part) if isinstance(raw, dict) else None
        if i < len(loc) - 1:
            current = _members(fields[part].annotation) or current
            if current == [MethodSection] and isinstance(raw, dict):
                # [method] is validated by the class registered for its name.
                current = [method_config(raw.get("name"))]
    return path, current


def _field_names(sections: list[type[BaseModel]]) -> list[str]:
    return list(dict.fromkeys(f for m in sections for f in m.model_fields))


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a table (section)",
    "dict_type": "a table (section)",
}


# Keys that moved when the engine took over optimisation (issue 13): a one-line pointer.
_MOVED = {
    "finetune.cosine_epochs": "finetune.schedule_epochs",
    "method.schedule": 'finetune.scheduler = "onecycle" (or another schedule)',
    "method.schedule_epochs": "finetune.schedule_epochs",
    "method.pct_start": "finetune.pct_start",
    "method.div_factor": "finetune.div_factor",
    "method.final_div_factor": "finetune.final_div_factor",
    "method.cycle_momentum": "finetune.cycle_momentum",
    "method.schedule_text_proj": 'finetune.schedule_groups = "all"',
    "method.schedule_all_groups": 'finetune.schedule_groups = "all"',
    "method.finetune_max_epoch": 'finetune.schedule_epochs (finetune.scheduler = "epoch_cosine")',
    "method.rerank_max_epoch": 'combiner.schedule_epochs (combiner.scheduler = "epoch_cosine")',
    "method.periodic_cosine": "fixes.step_cosine (true: per step, held at 0 past the span)",
    "method.rerank_weight_decay": "combiner.weight_decay",
}


def _describe_error(err: dict[str, Any], source: str, raw: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        path, sections = _resolve_loc(loc, raw)
        options = _field_names(sections)
        key = ".".join(path)
        if key in _MOVED:
            return f"{source}: '{key}' has moved: use {_MOVED[key]}"
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(options)}"
        return f"{source}: unknown key '{key}'{hint}"
    path, sections = _resolve_loc(loc, raw)
    key = ".".join(path)
    if kind == "none_required" and len(sections) == 1 and issubclass(sections[0], BackboneConfig):
        # A key of another backbone family (e.g. blip's image_size under open_clip).
        owners = [
            family
            for family, cls in BACKBONE_CONFIGS.items()
            if cls.model_fields[path[-1]].annotation is not type(None)
        ]
        family = sections[0].model_fields["name"].default
        return (
            f"{source}: {key} applies only to backbone.name = "
            f"{' or '.join(repr(o) for o in owners)} (this recipe's is {family!r})"
        )
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        if not isinstance(err.get("input"), dict):
            return f"{source}: {key} must be {_TYPE_WORDS['model_type']}, got {err.get('input')!r}"
        expected = err.get("ctx", {}).get("expected_tags", "")
        given = err["input"].get("name")
        return f"{source}: {key}.name = {given!r} is not known; expected one of {expected}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{source}: {key} = {err.get('input')!r} is not allowed; expected one of {expected}"
    if kind in _TYPE_WORDS:
        return f"{source}: {key} must be {_TYPE_WORDS[kind]}, got {err.get('input')!r}"
    return f"{source}: {key}: {err['msg']} (got {err.get('input')!r})"


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        # One line: the first problem is reported; fixing it reveals the next.
        raise CirError(_describe_error(exc.errors()[0], source, raw)) from None


def load_recipe(
    name_or_path: str, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Recipe:
    """Load a built-in name or a TOML path, apply `extends` and `--set` overrides, validate.

    `values` are typed overrides from CLI options ({'output.dir': 'runs/it's'}), applied last.
    """
    path = find_recipe(name_or_path)
    raw = _load_raw(path)
    if not raw:
        # An empty file (or one of only comments) would validate as all defaults and then fail
        # far from its cause.
        raise CirError(
            f"{path}: the recipe is empty; expected at least [method], [backbone] and [data] "
            "(or extends = \"<recipe>\"); `cir recipes cp` gives a starting point"
        )
    raw.setdefault("name", path.stem)
    source = str(path) if not overrides else f"{path} (with --set overrides)"
    return validate_recipe(apply_overrides(raw, overrides or [], values), source)


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Copy a recipe file verbatim (comments included) to edit it locally, as `tune cp` does."""
    src = find_recipe(name)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise CirError(f"{dest} already exists; pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


# --------------------------------------------------------------------------------------------
# TOML output (tomllib reads only); the recipes hold scalars, lists and nested tables.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "", unset_as_comments: bool = False) -> str:
    """Serialise a nested dict; None values are left out (TOML has no null: absent = default),
    or, with `unset_as_comments`, written as `# key = (unset)` so every settable key shows."""
    lines = []
    for k, v in data.items():
        if isinstance(v, dict):
            continue
        if v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
        elif unset_as_comments:
            lines.append(f"# {k} = (unset)")
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    out = "\n".join(lines)
    for key, table in tables:
        name = f"{prefix}{key}"
        body = to_toml(table, prefix=f"{name}.", unset_as_comments=unset_as_comments)
        out += f"\n\n[{name}]\n{body}" if out or lines else f"[{name}]\n{body}"
    return out.strip() + "\n"


# The public surface (README "Python API"); tests/test_public_api.py imports each name.
__all__ = [
    "apply_overrides",
    "builtin_names",
    "copy_recipe",
    "find_recipe",
    "load_recipe",
    "validate_recipe",
]
