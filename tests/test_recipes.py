"""Recipes: built-ins validate, extends, --set overrides, one-line errors, show/cp."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cir_cli.errors import CirError
from cir_cli.recipes import (
    apply_overrides,
    builtin_names,
    copy_recipe,
    find_recipe,
    header_comment,
    load_recipe,
    parse_override,
    to_toml,
)


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_recipe_validates_and_documents_itself(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description, f"{name} needs a one-line description"
    header = header_comment(find_recipe(name))
    assert "cir " in header, f"{name}'s header comment must say how to run it"


def test_extends_merges_child_over_parent() -> None:
    fiq = load_recipe("clip_sum_fiq")
    assert fiq.data.dataset == "fashioniq"
    assert fiq.backbone.arch == "RN50x4"  # inherited from clip_sum_cirr
    assert fiq.data.test_split == "test"


def test_overrides_are_typed_toml_literals() -> None:
    assert parse_override("finetune.lr=1e-5") == (["finetune", "lr"], 1e-5)
    assert parse_override("data.root=/data/cirr") == (["data", "root"], "/data/cirr")
    assert parse_override('data.categories=["dress"]') == (["data", "categories"], ["dress"])
    recipe = load_recipe("toy_clip4cir", ["finetune.lr=3e-4", "finetune.encoder=text"])
    assert recipe.finetune.lr == pytest.approx(3e-4)
    assert recipe.finetune.encoder == "text"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.trasform=x"], "unknown key 'data.trasform'; did you mean 'transform'?"),
        (["finetune.lr=abc"], "finetune.lr must be a number, got 'abc'"),
        (["finetune.epochs=1.5"], "finetune.epochs must be an integer"),
        (['data.transform="x"'], "data.transform = 'x' is not allowed; expected one of"),
        (["method.name=nope"], "method.name = 'nope' is not known"),
        (["method.combinin=sum"], "unknown key 'method.combinin'; did you mean 'combining'?"),
        (["bogus=1"], "unknown key 'bogus'"),
        (["finetune.batch_size=0"], "finetune.batch_size"),
        (["novalue"], "expected key.path=value"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(CirError) as err:
        load_recipe("toy_clip4cir", overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_recipe_suggests_close_names() -> None:
    with pytest.raises(CirError, match="did you mean toy_clip4cir"):
        load_recipe("toy_clip4ci")


def test_recipe_files_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nroot = 1\n")
    with pytest.raises(CirError, match="bad.toml: invalid TOML"):
        load_recipe(str(bad))
    typed = tmp_path / "typed.toml"
    typed.write_text('extends = "toy_clip4cir"\n[finetune]\nepochs = "many"\n')
    with pytest.raises(CirError, match=r"typed.toml: finetune.epochs must be an integer"):
        load_recipe(str(typed))
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "b"\n')
    b.write_text('extends = "a"\n')
    with pytest.raises(CirError, match="cycle"):
        load_recipe(str(a))
    with pytest.raises(CirError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_show_output_is_valid_toml_equal_to_the_resolved_recipe() -> None:
    recipe = load_recipe("clip_sum_fiq", ["finetune.lr=1e-5"])
    parsed = tomllib.loads(to_toml(recipe.to_dict()))
    from cir_cli.recipes import validate_recipe

    assert validate_recipe(parsed, "roundtrip") == recipe


def test_cp_copies_verbatim_and_the_copy_loads(tmp_path: Path) -> None:
    dest = copy_recipe("toy_clip4cir", tmp_path / "my.toml")
    assert dest.read_text() == find_recipe("toy_clip4cir").read_text()
    assert load_recipe(str(dest)).finetune.lr == load_recipe("toy_clip4cir").finetune.lr
    with pytest.raises(CirError, match="already exists"):
        copy_recipe("toy_clip4cir", dest)


def test_apply_overrides_refuses_to_descend_into_a_value() -> None:
    with pytest.raises(CirError, match="'seed' is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_c4c_recipes_carry_the_seeds_hyper_parameters() -> None:
    """Spec 3.2 / 4.2 / 8: the README settings of CLIP4Cir stage I and II."""
    for name in ("clip4cir_fiq", "clip4cir_cirr"):
        r = load_recipe(name)
        assert (r.backbone.arch, r.backbone.pretrained) == ("RN50x4", "openai")
        assert (r.data.transform, r.data.target_ratio) == ("targetpad", 1.25)
        ft = r.finetune
        assert (ft.lr, ft.eps, ft.weight_decay, ft.batch_size, ft.epochs) == (
            2e-6, 1e-7, 0.01, 128, 100)
        assert (ft.encoder, ft.scheduler, ft.validate_every) == ("both", "constant", 1)
        cb = r.combiner
        assert (cb.lr, cb.batch_size, cb.epochs, cb.projection_dim, cb.hidden_dim) == (
            2e-5, 4096, 300, 2560, 5120)
        assert cb.dropout == 0.5
        assert r.method.logit_scale == 100


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backbone.image_size=384"], "backbone.image_size applies only to backbone.name = 'blip' "
         "(this recipe's is 'open_clip')"),
        (["backbone.sha1=abc"], "backbone.sha1 applies only to backbone.name = 'blip'"),
        (['backbone.name="hf_clip"', "backbone.tokenizer=vocab.txt"],
         "backbone.tokenizer applies only to backbone.name = 'blip' or 'blip2' (this recipe's is "
         "'hf_clip')"),
        (['backbone.name="blip"', "backbone.vision_pretrained=x.pth"],
         "backbone.vision_pretrained applies only to backbone.name = 'blip2'"),
        (['backbone.name="blip3"'], "backbone.name = 'blip3' is not known; expected one of "
         "'open_clip', 'hf_clip', 'blip', 'blip2'"),
        (["backbone.precison=fp16"], "unknown key 'backbone.precison'; did you mean 'precision'?"),
        (["backbone=3"], "backbone must be a table (section), got 3"),
    ],
)
def test_backbone_keys_belong_to_their_family(overrides: list[str], expected: str) -> None:
    with pytest.raises(CirError) as err:
        load_recipe("toy_clip4cir", overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_backbone_config_builds_the_class_of_its_family() -> None:
    from cir_cli.config import BackboneConfig, Blip2BackboneConfig, OpenClipBackboneConfig

    blip2 = BackboneConfig(name="blip2", arch="blip2-tiny", vision_pretrained="v.pth")
    assert type(blip2) is Blip2BackboneConfig and blip2.vision_pretrained == "v.pth"
    assert type(BackboneConfig(arch="cir-tiny")) is OpenClipBackboneConfig
    assert load_recipe("toy_blip4cir", ["backbone.image_size=64"]).backbone.image_size == 64


@pytest.mark.parametrize("name", builtin_names())
def test_resolved_recipe_round_trips_through_its_manifest(name: str) -> None:
    """Manifests hold the resolved recipe as JSON, unset keys (other families' too) as null."""
    import json

    from cir_cli.recipes import validate_recipe

    recipe = load_recipe(name)
    manifest = json.loads(json.dumps(recipe.to_dict()))
    assert set(manifest["backbone"]) == {
        "name", "arch", "pretrained", "precision", "init_seed", "image_size", "tokenizer",
        "vision_pretrained", "sha1",
    }
    assert validate_recipe(manifest, "manifest") == recipe
