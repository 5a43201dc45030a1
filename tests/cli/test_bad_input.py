"""The bad-input corpus: every command, every kind of input a user can get wrong.

Each case runs the CLI in-process and must end with exit code 2, exactly one stderr line that
starts with `error:` and names the culprit (file, key or value), no traceback, and no partial
file: no temporary file left anywhere in the case's folder and nothing written in its output
folder. Hostile inputs (a pickle that would run code, paths leaving the dataset root) are
refused the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli.cli import app

runner = CliRunner()


@dataclass
class Ctx:
    tmp: Path  # this case's folder
    toy: Path  # the shared small toy dataset (read only)
    index: Path  # a valid index built once (copy it before changing it)
    weights: Path  # a valid run checkpoint folder of the toy model

    @property
    def out(self) -> Path:
        return self.tmp / "runs"

    def sets(self, root: Path | None = None, *extra: str) -> list[str]:
        items = [f'data.root="{root or self.toy}"', "data.num_workers=0",
                 f'output.cache_dir="{self.tmp / "cache"}"', *extra]
        return [arg for item in items for arg in ("--set", item)]

    def toy_copy(self) -> Path:
        """The toy dataset with its own annotation files (images linked, not copied)."""
        root = self.tmp / "toy"
        root.mkdir()
        for child in self.toy.iterdir():
            if child.name == "cirr":
                shutil.copytree(child, root / "cirr")
            else:
                (root / child.name).symlink_to(child)
        return root

    def validate(self, root: Path | None = None, *extra: str) -> list[str]:
        return ["validate", "--recipe", "toy_clip4cir", "-o", str(self.out),
                *self.sets(root, *extra)]

    def recipe(self, text: str | bytes, name: str = "mine.toml") -> Path:
        path = self.tmp / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path


Case = Callable[[Ctx], tuple[list[str], str]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------ recipes

VALID = '[method]\nname = "clip4cir"\n[backbone]\nname = "open_clip"\narch = "cir-tiny"\n'


@case("recipe-latin1-byte")
def _(c):
    p = c.recipe(VALID.encode() + b'description = "caf\xe9"\n')
    return ["recipes", "validate", str(p)], f"{p}: not UTF-8"


@case("recipe-random-bytes")
def _(c):
    p = c.recipe(bytes(range(256)) * 4)
    return ["recipes", "validate", str(p)], str(p)


@case("recipe-empty")
def _(c):
    p = c.recipe("")
    return ["recipes", "validate", str(p)], f"{p}: the recipe is empty"


@case("recipe-only-comments")
def _(c):
    p = c.recipe("# nothing here yet\n\n# really\n")
    return ["recipes", "validate", str(p)], "the recipe is empty"


@case("recipe-bad-toml")
def _(c):
    p = c.recipe("[method\nname = 1\n")
    return ["recipes", "show", str(p)], f"{p}: invalid TOML"


@case("recipe-unknown-key")
def _(c):
    p = c.recipe(VALID + "[data]\nrooot = 'x'\n")
    return ["recipes", "validate", str(p)], "unknown key 'data.rooot'"


@case("recipe-wrong-type")
def _(c):
    p = c.recipe(VALID + "[eval]\nbatch_size = 'big'\n")
    return ["recipes", "validate", str(p)], "eval.batch_size must be an integer"


@case("recipe-unknown-method")
def _(c):
    p = c.recipe('[method]\nname = "clip5cir"\n')
    return ["recipes", "validate", str(p)], "clip5cir"


@case("recipe-extends-itself")
def _(c):
    p = c.recipe('extends = "mine"\n' + VALID)
    return ["recipes", "validate", str(p)], "'extends' forms a cycle"


@case("recipe-extends-cycle")
def _(c):
    c.recipe('extends = "b"\n' + VALID, "a.toml")
    b = c.recipe('extends = "a"\n', "b.toml")
    return ["recipes", "validate", str(b)], "'extends' forms a cycle"


@case("recipe-extends-not-a-string")
def _(c):
    p = c.recipe("extends = 3\n" + VALID)
    return ["recipes", "validate", str(p)], "'extends' must be a recipe name"


@case("recipe-extends-unknown")
def _(c):
    p = c.recipe('extends = "toy_clip4cri"\n')
    return ["recipes", "validate", str(p)], "unknown recipe 'toy_clip4cri'"


@case("recipe-unknown-name")
def _(c):
    return ["validate", "--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"


@case("recipe-file-missing")
def _(c):
    return ["recipes", "show", str(c.tmp / "gone.toml")], f"recipe file not found: {c.tmp}"


# ---------------------------------------------------------------------------------- overrides


@case("set-without-equals")
def _(c):
    return ["recipes", "show", "toy_clip4cir", "--set", "finetune.lr"], "--set 'finetune.lr'"


@case("set-empty-key")
def _(c):
    return ["recipes", "show", "toy_clip4cir", "--set", "finetune..lr=1"], "empty key"


@case("set-into-a-value")
def _(c):
    return (["recipes", "show", "toy_clip4cir", "--set", "data.root.x=1"],
            "'root' is a value, not a section")


@case("set-wrong-type")
def _(c):
    return (["validate", "--recipe", "toy_clip4cir", "--set", "finetune.lr=fast"],
            "finetune.lr must be a number")


@case("set-unknown-section")
def _(c):
    return ["recipes", "validate", "toy_clip4cir", "--set", "trainer.lr=1"], "'trainer"


@case("set-bad-literal")
def _(c):
    return (["recipes", "validate", "toy_clip4cir", "--set", "eval.batch_size=[1,"],
            "eval.batch_size")


# -------------------------------------------------------------------------------- annotations


def _captions(root: Path) -> Path:
    return root / "cirr" / "captions" / "cap.rc2.val.json"


def _split(root: Path) -> Path:
    return root / "cirr" / "image_splits" / "split.rc2.val.json"


@case("captions-malformed-json")
def _(c):
    root = c.toy_copy()
    _captions(root).write_text('[{"pairid": 1,')
    return c.validate(root), f"{_captions(root)}: not valid JSON"


@case("captions-not-utf8")
def _(c):
    root = c.toy_copy()
    _captions(root).write_bytes(b'[{"caption": "\xff\xfe"}]')
    return c.validate(root), f"{_captions(root)}: not UTF-8"


@case("captions-wrong-shape")
def _(c):
    root = c.toy_copy()
    _captions(root).write_text('{"pairid": 1}')
    return c.validate(root), f"{_captions(root)}: expected a list of query objects"


@case("captions-missing-key")
def _(c):
    root = c.toy_copy()
    records = json.loads(_captions(root).read_text())
    del records[2]["caption"]
    _captions(root).write_text(json.dumps(records))
    return c.validate(root), "caption"


@case("captions-reference-not-in-split")
def _(c):
    root = c.toy_copy()
    records = json.loads(_captions(root).read_text())
    records[0]["reference"] = "no-such-image"
    _captions(root).write_text(json.dumps(records))
    return c.validate(root), "'no-such-image' is not listed"


@case("split-absolute-image-path")
def _(c):
    root = c.toy_copy()
    names = json.loads(_split(root).read_text())
    first = next(iter(names))
    names[first] = str(c.toy / "dev" / "x.png")
    _split(root).write_text(json.dumps(names))
    return c.validate(root), "must be relative to the dataset root"


@case("split-dotdot-image-path")
def _(c):
    root = c.toy_copy()
    names = json.loads(_split(root).read_text())
    names[next(iter(names))] = "./dev/../../../etc/passwd"
    _split(root).write_text(json.dumps(names))
    return c.validate(root), "without '..'"


@case("split-wrong-shape")
def _(c):
    root = c.toy_copy()
    _split(root).write_text('["a", "b"]')
    return c.validate(root), f"{_split(root)}: expected an object mapping"


@case("data-root-missing")
def _(c):
    return c.validate(c.tmp / "nowhere"), str(c.tmp / "nowhere")


# ------------------------------------------------------------------------------------- images


def _val_image(root: Path, k: int) -> Path:
    names = json.loads(_split(root).read_text())
    rel = sorted(names.values())[k]
    return root / rel


@case("image-missing")
def _(c):
    root = c.toy_copy()
    (root / "dev").unlink()
    shutil.copytree(c.toy / "dev", root / "dev")
    victim = _val_image(root, 3)
    victim.unlink()
    return c.validate(root), victim.stem


@case("image-garbage")
def _(c):
    root = c.toy_copy()
    (root / "dev").unlink()
    shutil.copytree(c.toy / "dev", root / "dev")
    victim = _val_image(root, 5)
    victim.write_bytes(b"not a png at all")
    return c.validate(root), victim.name


@case("image-empty")
def _(c):
    root = c.toy_copy()
    (root / "dev").unlink()
    shutil.copytree(c.toy / "dev", root / "dev")
    victim = _val_image(root, 6)
    victim.write_bytes(b"")
    return c.validate(root), victim.name


@case("search-query-image-missing")
def _(c):
    return (["search", str(c.index), "--image", str(c.tmp / "q.png"), "--text", "red"],
            str(c.tmp / "q.png"))


# -------------------------------------------------------------------------------- checkpoints


def _sidecar_weights(c: Ctx, name: str, meta: dict) -> Path:
    from cir_cli.checkpoints import load_weights, save_weights

    state, _ = load_weights(c.weights / "weights.safetensors")
    folder = c.tmp / name
    save_weights(folder / "weights.safetensors", state, meta)
    return folder


@case("checkpoint-missing")
def _(c):
    return [*c.validate(), "--checkpoint", str(c.tmp / "nope")], str(c.tmp / "nope")


@case("checkpoint-empty-folder")
def _(c):
    (c.tmp / "empty").mkdir()
    return [*c.validate(), "--checkpoint", str(c.tmp / "empty")], "no checkpoint found"


@case("checkpoint-random-bytes")
def _(c):
    p = c.tmp / "w.pt"
    p.write_bytes(os.urandom(4096))
    return [*c.validate(), "--checkpoint", str(p)], str(p)


@case("checkpoint-truncated-safetensors")
def _(c):
    p = c.tmp / "w.safetensors"
    p.write_bytes((c.weights / "weights.safetensors").read_bytes()[:300])
    return [*c.validate(), "--checkpoint", str(p)], str(p)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@case("checkpoint-malicious-pickle")
def _(c):
    import torch

    p = c.tmp / "evil.pt"
    torch.save({"epoch": 1, "CLIP": _Evil()}, p)
    return [*c.validate(), "--checkpoint", str(p)], "refused for safety"


@case("checkpoint-base-names-itself")
def _(c):
    folder = c.tmp / "selfish"
    folder = _sidecar_weights(
        c, "selfish", {"base_checkpoint": str(folder / "weights.safetensors")}
    )
    return [*c.validate(), "--checkpoint", str(folder)], "base_checkpoint forms a cycle"


@case("checkpoint-base-cycle")
def _(c):
    a = _sidecar_weights(c, "a", {"base_checkpoint": str(c.tmp / "b")})
    _sidecar_weights(c, "b", {"base_checkpoint": str(a)})
    return [*c.validate(), "--checkpoint", str(a)], "base_checkpoint forms a cycle"


@case("checkpoint-base-not-a-path")
def _(c):
    folder = _sidecar_weights(c, "odd", {"base_checkpoint": 42})
    return [*c.validate(), "--checkpoint", str(folder)], "base_checkpoint must be a path"


@case("checkpoint-wrong-keys")
def _(c):
    import torch

    from cir_cli.checkpoints import save_weights

    p = c.tmp / "other.safetensors"
    save_weights(p, {"not.a.clip.weight": torch.zeros(2)})
    return [*c.validate(), "--checkpoint", str(p)], "not.a.clip.weight"


# ------------------------------------------------------------------------------------ indexes


def _index_copy(c: Ctx, edit: Callable[[dict], object] | None = None, raw: bytes | None = None):
    copy = c.tmp / "copy.cirindex"
    shutil.copytree(c.index, copy)
    manifest = copy / "manifest.json"
    if raw is not None:
        manifest.write_bytes(raw)
    elif edit is not None:
        data = json.loads(manifest.read_text())
        data = edit(data) or data
        manifest.write_text(json.dumps(data))
    return copy


def _search(c: Ctx, index: Path) -> list[str]:
    image = next(iter(sorted((c.toy / "dev").glob("*.png"))))
    return ["search", str(index), "--image", str(image), "--text", "is red"]


@case("index-not-an-index")
def _(c):
    (c.tmp / "folder").mkdir()
    return _search(c, c.tmp / "folder"), "not a cir index"


@case("index-manifest-not-utf8")
def _(c):
    copy = _index_copy(c, raw=b'{"format": "cir-index\xff"}')
    return _search(c, copy), "not UTF-8"


@case("index-manifest-array")
def _(c):
    copy = _index_copy(c, raw=b"[1, 2, 3]")
    return _search(c, copy), "manifest.json is not a cir-index manifest"


@case("index-manifest-recipe-wrong-shape")
def _(c):
    copy = _index_copy(c, lambda m: m.update(recipe=["not", "a", "table"]))
    return _search(c, copy), "'recipe' must be a object"


@case("index-manifest-root-wrong-shape")
def _(c):
    copy = _index_copy(c, lambda m: m.update(root=7))
    return _search(c, copy), "'root' must be a string"


@case("index-features-missing")
def _(c):
    copy = _index_copy(c)
    for f in copy.glob("features-*.npy"):
        f.unlink()
    return _search(c, copy), "is missing"


@case("search-queries-not-utf8")
def _(c):
    q = c.tmp / "q.csv"
    q.write_bytes(b"image,text\nx.png,caf\xe9\n")
    return ["search", str(c.index), "--queries", str(q)], f"{q}: not UTF-8"


@case("index-folder-missing")
def _(c):
    return (["index", str(c.tmp / "photos"), "--recipe", "toy_clip4cir", "--out",
             str(c.tmp / "p.cirindex")], str(c.tmp / "photos"))


# -------------------------------------------------------------------------------- run folders


def _run_folder(c: Ctx, manifest: bytes | None) -> Path:
    run = c.tmp / "run"
    run.mkdir()
    if manifest is not None:
        (run / "manifest.json").write_bytes(manifest)
    return run


@case("resume-not-a-run")
def _(c):
    run = _run_folder(c, None)
    return ["finetune", "--resume", str(run)], "not a run folder"


@case("resume-manifest-not-utf8")
def _(c):
    run = _run_folder(c, b'{"recipe": "\xe9"}')
    return ["finetune", "--resume", str(run)], f"{run / 'manifest.json'}: not UTF-8"


@case("resume-manifest-array")
def _(c):
    run = _run_folder(c, b"[]")
    return ["finetune", "--resume", str(run)], "expected a JSON object"


@case("resume-manifest-recipe-string")
def _(c):
    run = _run_folder(c, b'{"recipe": "toy_clip4cir"}')
    return ["train-combiner", "--resume", str(run)], "'recipe' must be a object"


@case("resume-manifest-bad-json")
def _(c):
    run = _run_folder(c, b'{"recipe": ')
    return ["finetune", "--resume", str(run)], "invalid JSON"


# ------------------------------------------------------------------------------ write targets


@case("output-dir-under-a-file")
def _(c):
    blocker = c.tmp / "blocker"
    blocker.write_text("a file")
    args = ["validate", "--recipe", "toy_clip4cir", "-o", str(blocker / "runs"),
            "--set", f'data.root="{c.toy}"', "--set", "data.num_workers=0"]
    return args, f"{blocker} is a file, not a folder"


@case("recipes-cp-onto-existing")
def _(c):
    target = c.recipe("# mine\n")
    return ["recipes", "cp", "toy_clip4cir", str(target)], "already exists"


@case("prepare-toy-out-under-a-file")
def _(c):
    blocker = c.tmp / "blocker"
    blocker.write_text("a file")
    return ["prepare", "toy", "--out", str(blocker / "toy")], f"{blocker} is a file"


@case("search-html-under-a-file")
def _(c):
    blocker = c.tmp / "blocker"
    blocker.write_text("a file")
    return [*_search(c, c.index), "--html", str(blocker / "x.html")], "is a file, not a folder"


# ------------------------------------------------------------------------- devices / commands


@case("device-unknown")
def _(c):
    return [*c.validate(), "--device", "gpu"], "--device 'gpu'"


@case("device-cuda-out-of-range")
def _(c):
    return [*c.validate(), "--device", "cuda:77"], "--device cuda:77"


@case("prepare-unknown-dataset")
def _(c):
    return ["prepare", "cifar", "--root", str(c.tmp)], "unknown dataset 'cifar'"


@case("prepare-require-unknown-split")
def _(c):
    return ["prepare", "cirr", "--root", str(c.toy), "--require", "dev"], "--require 'dev'"


@case("submit-unknown-benchmark")
def _(c):
    return ["submit", "coco", "--recipe", "toy_clip4cir", *c.sets()], "unknown benchmark 'coco'"


@case("finetune-no-recipe")
def _(c):
    return ["finetune"], "--recipe is required"


# -------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cir_cli.data.toy import generate_toy

    root = tmp_path_factory.mktemp("small_toy")
    generate_toy(root, fmt="cirr", seed=0, n_train_triplets=64, n_val_queries=24,
                 n_test_queries=12)
    return root


@pytest.fixture(scope="module")
def toy_weights(small_toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run-style checkpoint folder of the toy model's weights (untrained)."""
    from cir_cli import api
    from cir_cli.checkpoints import save_weights
    from cir_cli.recipes import load_recipe

    recipe = load_recipe("toy_clip4cir", [f'data.root="{small_toy}"'])
    model = api.load_model(recipe, device="cpu")
    folder = tmp_path_factory.mktemp("weights") / "best"
    state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    save_weights(folder / "weights.safetensors", state, {"stage": "finetune"})
    return folder


@pytest.fixture(scope="module")
def small_index(small_toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cir_cli import search as lib
    from cir_cli.recipes import load_recipe

    photos = tmp_path_factory.mktemp("photos")
    for image in sorted((small_toy / "dev").glob("*.png"))[:8]:
        shutil.copy(image, photos / image.name)
    out = tmp_path_factory.mktemp("index") / "toy.cirindex"
    recipe = load_recipe("toy_clip4cir", [f'data.root="{small_toy}"', "data.num_workers=0"])
    lib.build_index(photos, recipe, out, num_workers=0)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _temp_leftovers(folder: Path) -> list[str]:
    bad = []
    for p in folder.rglob("*"):
        name = p.name
        if (name.startswith(".") and (name.endswith(".tmp") or p.is_dir())) or name.endswith(
            ".claim"
        ):
            bad.append(str(p))
    return bad


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    name: str, small_toy: Path, small_index: Path, toy_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative default (runs/, data/toy) lands in the case folder
    ctx = Ctx(tmp_path, small_toy, small_index, toy_weights)
    args, culprit = CASES[name](ctx)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert culprit in lines[0], (culprit, lines[0])
    # Nothing half-written: no temporary file anywhere, no output of the failed command, and
    # every file that was there is unchanged.
    assert _temp_leftovers(tmp_path) == []
    assert not ctx.out.exists() or not any(ctx.out.rglob("*")), list(ctx.out.rglob("*"))
    after = _snapshot(tmp_path)
    for path, data in before.items():
        assert after.get(path) == data, f"{path} changed"
    cache_files = {p for p in after if p.startswith("cache/")}
    assert set(after) - set(before) <= {p for p in cache_files if p.endswith("key.txt")}
    assert not (tmp_path / "PWNED").exists()
