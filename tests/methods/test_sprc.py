"""SPRC on the tiny BLIP-2: the two passes, the losses, the schedule, max-over-tokens scoring,
published-checkpoint loading, and the toy pipeline through finetune / validate / submit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cir_cli.engine.optim import onecycle
from cir_cli.errors import CirError
from cir_cli.methods.sprc import SPRC_CHECKPOINT_KEY, blip_caption
from cir_cli.recipes import load_recipe
from tests.backbones.test_blip2 import lavis_layout
from tests.conftest import toy_overrides


@pytest.fixture(scope="module")
def model():
    from cir_cli.methods import build_method

    torch.manual_seed(0)
    return build_method(load_recipe("toy_sprc")).eval()


def test_blip_caption_preprocessing() -> None:
    assert blip_caption('Make it "RED"!  (and  bigger).') == "make it red and bigger"
    assert blip_caption("a:b;c~d#e*f") == "a b c d e f"
    assert blip_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


@pytest.mark.parametrize("pct,div", [(0.02, 25.0), (0.05, 100.0)])
def test_onecycle_matches_torch_onecyclelr(pct: float, div: float) -> None:
    total = 120
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-5, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-5, total_steps=total, pct_start=pct, div_factor=div
    )
    for step in range(total):
        factor, beta1 = onecycle(step, total, pct, div, 1e4)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 * factor, rel=1e-9, abs=1e-18)
        assert opt.param_groups[0]["betas"][0] == pytest.approx(beta1, rel=1e-9)
        opt.step()
        sched.step()
    assert onecycle(total + 50, total, pct, div, 1e4) == onecycle(total - 1, total, pct, div, 1e4)


def test_queries_are_pass2_cls_of_the_fusion_prompt(model) -> None:
    bb = model.backbone
    reps = model.image_representation(torch.randn(3, 3, 64, 64))
    texts = ["Make it red!", "move it one step left", "a large blue star in the centre"]
    with torch.no_grad():
        got = model.queries_from_representation(reps, texts)
        ids, mask = model.tokenize(texts)
        image = F.layer_norm(reps, reps.shape[-1:], bb.ln_vision.weight, bb.ln_vision.bias, 1e-5)
        mm = bb.multimodal_outputs(image, ids, mask)
        prompt = mm[:, : bb.num_query_tokens]
        h = bb.prefix_text_outputs(prompt, ids, mask)
        expected = F.normalize(bb.text_projection(h[:, bb.num_query_tokens]), dim=-1)
    assert ids.shape == (3, model.cfg.max_text_length)
    torch.testing.assert_close(got, expected)
    targets = model.targets_from_representation(reps)
    assert targets.shape == (3, bb.num_query_tokens, bb.feature_dim)
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(3, bb.num_query_tokens))


def test_max_over_tokens_score_equals_a_direct_computation(model) -> None:
    gen = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(7, 64, generator=gen), dim=-1)
    targets = F.normalize(torch.randn(11, 8, 64, generator=gen), dim=-1)
    direct = torch.tensor(
        [[max(float(q @ t[k]) for k in range(t.shape[0])) for t in targets] for q in queries]
    )
    torch.testing.assert_close(model.score(queries, targets), direct)


def test_losses_and_where_their_gradients_go(model) -> None:
    """itc + w*rtc + w*align (spec 1.3): the prompt tokens learn only through rtc (align's
    prompt side is detached); the frozen ViT gets nothing."""
    from cir_cli.methods.sprc import SprcFinetune

    task = SprcFinetune.__new__(SprcFinetune)  # no dataset needed for one loss evaluation
    task.model, task.device = model, torch.device("cpu")
    task.method_cfg = model.cfg.model_copy(update={"loss_rtc": 0.0})
    reps = model.image_representation(torch.randn(4, 3, 64, 64))
    batch = (reps, reps.flip(0), ["make it red", "make it blue", "make it small", "a star"])
    model.train()
    model.zero_grad()
    loss, parts = task.compute_loss(batch)
    loss.backward()
    model.eval()
    assert set(parts) == {"loss_itc", "loss_rtc", "loss_align", "temp"}
    assert loss.item() == pytest.approx(parts["loss_itc"] + 0.4 * parts["loss_align"], rel=1e-5)
    assert model.prompt_tokens.grad is None or not model.prompt_tokens.grad.any()
    assert model.backbone.query_tokens.grad.abs().sum() > 0
    assert model.backbone.temp.grad is not None
    assert all(p.grad is None for p in model.backbone.vision_model.parameters())
    model.zero_grad()


def test_published_sprc_checkpoint_converts_and_loads_strictly(model, tmp_path, capsys) -> None:
    """{"epoch", "Blip2QformerCirAlignPrompt": sd} with the real key names (random values):
    every tensor lands, and the only keys left out are the printed LM head / buffer ones."""
    vocab = model.backbone.embeddings.word_embeddings.num_embeddings
    sd = lavis_layout("blip2-tiny", vocab, seed=5)
    path = tmp_path / "sprc_cirr.pt"
    torch.save({"epoch": 42, SPRC_CHECKPOINT_KEY: sd}, path)
    model.load_checkpoint(str(path))
    err = capsys.readouterr().err
    assert "7 key(s) BERT LM head" in err and "Qformer.cls.predictions" in err
    assert "1 key(s) buffer (arange)" in err and "position_ids" in err
    own = model.state_dict()
    pairs = {
        "backbone.qformer.encoder.layer.2.crossattention.attention.key.weight": (
            "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"
        ),
        "backbone.qformer.encoder.layer.3.output_query.LayerNorm.bias": (
            "Qformer.bert.encoder.layer.3.output_query.LayerNorm.bias"
        ),
        "backbone.vision_model.encoder.layers.1.self_attn.projection.weight": (
            "visual_encoder.blocks.1.attn.proj.weight"
        ),
        "backbone.vision_projection.weight": "vision_proj.weight",
        "backbone.ln_vision.bias": "ln_vision.bias",
        "backbone.query_tokens": "query_tokens",
        "backbone.temp": "temp",
        "prompt_tokens": "prompt_tokens",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    # A DataParallel `module.` prefix is accepted; a file without prompt_tokens is refused.
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt")
    model.load_checkpoint(str(tmp_path / "bare.pt"))
    del sd["prompt_tokens"]
    torch.save({"model": sd}, tmp_path / "blip2.pth")
    with pytest.raises(CirError, match="no prompt_tokens"):
        model.load_checkpoint(str(tmp_path / "blip2.pth"))


def test_toy_pipeline_finetune_validate_submit(toy_root: Path, tmp_path: Path) -> None:
    """`cir finetune` -> checkpoint with trainable weights only -> `cir validate` and
    `cir submit cirr` through the shared code, reusing the cached ViT tokens."""
    from cir_cli.checkpoints import load_weights
    from cir_cli.workflows import run_submission, run_training, run_validation

    sets = toy_overrides(
        toy_root,
        tmp_path / "runs",
        finetune__epochs=1,
        finetune__max_steps=6,
        finetune__batch_size=32,
        finetune__validate_every=1,
        eval__batch_size=256,
    )
    recipe = load_recipe("toy_sprc", sets)
    run = run_training(recipe, "finetune")
    assert run.steps == 6 and [row["step"] for row in run.history] == [0, 6]
    weights, meta = load_weights(run.run_dir / "checkpoints" / "last" / "weights.safetensors")
    assert weights and not any(k.startswith("backbone.vision_model.") for k in weights)
    assert "prompt_tokens" in weights and "backbone.itm_head.weight" not in weights
    assert meta["stage"] == "finetune"
    cache_dirs = list((tmp_path / "runs" / ".cache").iterdir())
    assert len(cache_dirs) == 1  # one ViT-token cache, shared by training and validation

    best = run.best
    validation = run_validation(recipe, checkpoint=str(run.run_dir))
    for key in ("recall_at1", "recall_at5", "mean_r5_rs1"):
        assert validation.metrics[key] == pytest.approx(best[key])
    paths = run_submission(recipe, "cirr", checkpoint=str(run.run_dir))
    assert sorted(p.name.split("_submission")[0] for p in paths) == ["recall", "recall_subset"]
    recall = json.loads(next(p for p in paths if p.name.startswith("recall_sub")).read_text())
    assert recall["version"] == "rc2" and len(recall) == 2 + 60
