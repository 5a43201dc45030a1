"""`cir finetune --recipe toy_lincir` end to end at tiny scale: text-only steps, cache, EMA, resume.

The real toy figures (aligned tiny CLIP, 1,500 steps) are in the recipe's header and the issue
notes; here a random tiny CLIP and a few steps check the mechanics only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cir_cli.checkpoints import load_weights
from cir_cli.data.text_corpus import toy_text_lines
from cir_cli.recipes import load_recipe
from cir_cli.workflows import run_training, run_validation


@pytest.fixture()
def recipe_for(toy_root: Path, tmp_path: Path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(toy_text_lines(96, seed=1)) + "\n")

    def make(**extra: object):
        items = [
            f'data.root="{toy_root}"', f'output.dir="{tmp_path / "runs"}"',
            'backbone.pretrained=""', f'method.text_files=["{texts}"]', "data.num_workers=0",
            "finetune.batch_size=32", "finetune.max_steps=4", "finetune.validate_every_steps=2",
            "eval.batch_size=256",
        ]
        items += [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in extra.items()]
        return load_recipe("toy_lincir", items)

    return make


def test_steps_only_training_resumes_and_keeps_an_ema(recipe_for, tmp_path: Path) -> None:
    recipe = recipe_for()
    assert recipe.finetune.epochs == 0  # steps, not epochs
    first = run_training(recipe, "finetune", stop_after_steps=3)
    assert first.stopped_early and first.steps == 3
    # 96 texts / 32 = 3 steps per epoch: the resumed run crosses an epoch boundary
    done = run_training(None, "finetune", resume=str(first.run_dir))
    assert done.steps == 4
    steps = [row["step"] for row in done.history]
    assert steps == [0, 2, 4]
    state, meta = load_weights(first.run_dir / "checkpoints" / "last" / "weights.safetensors")
    assert {k.split(".")[0] for k in state} == {"phi", "phi_ema"}
    assert int(state["phi_ema.num_updates"]) == 4
    assert meta["keywords"] == "heuristic" and meta["texts"] == 96
    # The unmasked-caption features were encoded once, into the on-disk store.
    stores = list((tmp_path / "runs" / ".cache" / "lincir-captions").glob("*/progress.json"))
    assert len(stores) == 1 and json.loads(stores[0].read_text())["done"] == 96

    run = run_validation(recipe_for(method__use_ema=True), checkpoint=str(done.run_dir))
    assert "recall_at1" in run.metrics
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert "ema" in json.dumps(manifest)  # evaluated with the EMA copy of Phi


def test_only_phi_trains(recipe_for) -> None:
    from cir_cli.methods import build_method

    recipe = recipe_for()
    model = build_method(recipe)
    task = model.finetune_task(torch.device("cpu"))
    params = {id(p) for g in task.param_groups() for p in g["params"]}
    assert params == {id(p) for p in model.phi.parameters()}
    batch = task.gather(list(range(8)))
    captions, ids, mask, indicator = batch
    assert captions.shape == (8, model.backbone.feature_dim) and bool(indicator.all())
    assert (mask.sum(dim=1) >= 1).all()  # every masked caption keeps a pseudo token
    loss, parts = task.compute_loss(batch)
    loss.backward()
    assert model.phi.layers[0].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    assert parts["preproc_rate"] == 1.0
