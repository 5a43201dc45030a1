"""Candidate re-ranking (spec reranking.md): the dual multi-modal encoder against the spec's
equations written out independently, its initialisation from a model_base.pth-layout file, the
published BLIP_Retrieval / BLIP_NLVR layouts, the reference's top-K files (numpy string arrays,
loaded with weights_only=True), candidate lists, and re-ranking in validate / submit on the toy.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir_cli.errors import CirError
from cir_cli.modules.dual_encoder import (
    DualEncoderConfig,
    DualEncoderScorer,
    twin_state_from_bert,
)
from tests.conftest import toy_overrides

TINY = DualEncoderConfig(
    vocab_size=30,
    hidden_size=16,
    num_layers=3,
    num_heads=2,
    intermediate_size=24,
    encoder_width=12,
    max_position_embeddings=20,
    merge_from_layer=1,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor random (LayerNorm gains too), so no term of the equations is hidden."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------------------------
# The spec's equations, written directly on the state dict (no module of ours)


def _ln(x, sd, name, eps=1e-12):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _mha(x, kv, sd, name, heads, additive):
    """softmax(Q K^T / sqrt(d) + mask) V per head, heads concatenated, one explicit loop."""
    q, k, v = (
        _lin(x, sd, f"{name}.query"),
        _lin(kv, sd, f"{name}.key"),
        _lin(kv, sd, f"{name}.value"),
    )
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        logits = q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(d)
        if additive is not None:
            logits = logits + additive[:, None, :]
        outs.append(torch.softmax(logits, -1) @ v[..., part])
    return torch.cat(outs, -1)


def spec_scores(sd, cfg, ids, mask, z_t, image):
    """spec reranking.md 5, term by term (eval mode: every dropout is the identity)."""
    additive = (1.0 - mask.float()) * -10000.0
    pos = torch.arange(ids.shape[1])
    x1 = sd["text_encoder.embeddings.word_embeddings.weight"][ids]
    x1 = x1 + sd["text_encoder.embeddings.position_embeddings.weight"][pos][None]
    x1 = _ln(x1, sd, "text_encoder.embeddings.LayerNorm")
    x = [z_t, x1]
    for layer in range(cfg.num_layers):
        p = f"text_encoder.encoder.layer.{layer}"
        a = []
        for b, norm in ((0, "LayerNormA"), (1, "LayerNormB")):
            s = _mha(x[b], x[b], sd, f"{p}.attention.self{b}", cfg.num_heads, additive)
            a.append(
                _ln(
                    x[b] + _lin(s, sd, f"{p}.attention.output.dense{b}"),
                    sd,
                    f"{p}.attention.output.{norm}",
                )
            )
        c = [
            _lin(
                _mha(a[b], image, sd, f"{p}.crossattention.self{b}", cfg.num_heads, None),
                sd,
                f"{p}.crossattention.output.dense{b}",
            )
            for b in (0, 1)
        ]
        if layer < cfg.merge_from_layer:
            m = (c[0] + c[1]) / 2
        else:
            m = _lin(torch.cat(c, -1), sd, f"{p}.crossattention.output.merge_layer")
        y = [
            _ln(a[0] + m, sd, f"{p}.crossattention.output.LayerNormA"),
            _ln(a[1] + m, sd, f"{p}.crossattention.output.LayerNormB"),
        ]
        x = [
            _ln(
                yb + _lin(F.gelu(_lin(yb, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense"),
                sd,
                f"{p}.output.LayerNorm",
            )
            for yb in y
        ]
    pooled = torch.cat([x[0][:, 0], x[1][:, 0]], -1)
    hidden = torch.relu(_lin(pooled, sd, "cls_head.0"))
    return _lin(hidden, sd, "cls_head.2")[:, 0]


def test_dual_encoder_forward_matches_spec_equations() -> None:
    torch.manual_seed(0)
    scorer = DualEncoderScorer(TINY)
    _randomise(scorer)
    scorer.eval()
    sd = {k: v.detach() for k, v in scorer.state_dict().items()}
    # Both merge kinds exist: layer 0 averages, layers 1-2 have a merge Linear.
    assert "text_encoder.encoder.layer.0.crossattention.output.merge_layer.weight" not in sd
    assert "text_encoder.encoder.layer.2.crossattention.output.merge_layer.weight" in sd
    ids = torch.randint(1, TINY.vocab_size, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    z_t = torch.randn(4, 7, TINY.hidden_size)
    image = torch.randn(4, 9, TINY.encoder_width)
    with torch.no_grad():
        ours = scorer(ids, mask, z_t, image)
        want = spec_scores(sd, TINY, ids, mask, z_t, image)
    assert torch.allclose(ours, want, atol=1e-5, rtol=1e-5), (ours - want).abs().max()
    # Each branch matters: changing z_t (branch 0) or the token ids (branch 1) moves the score.
    with torch.no_grad():
        assert not torch.allclose(scorer(ids, mask, z_t + 1, image), ours)
        assert not torch.allclose(scorer((ids + 1) % TINY.vocab_size, mask, z_t, image), ours)


def test_batched_scores_equal_one_at_a_time_and_padding_is_inert() -> None:
    torch.manual_seed(1)
    scorer = DualEncoderScorer(TINY).eval()
    ids = torch.randint(1, TINY.vocab_size, (5, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    z_t = torch.randn(5, 6, TINY.hidden_size)
    image = torch.randn(5, 9, TINY.encoder_width)
    with torch.no_grad():
        batched = scorer(ids, mask, z_t, image)
        single = torch.cat(
            [
                scorer(ids[i : i + 1], mask[i : i + 1], z_t[i : i + 1], image[i : i + 1])
                for i in range(5)
            ]
        )
        # Row 2 with its padding cut off entirely scores the same.
        cut = scorer(ids[2:3, :4], mask[2:3, :4], z_t[2:3, :4], image[2:3])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(cut, batched[2:3], atol=1e-5)


def test_twin_state_copies_each_tensor_where_the_spec_says() -> None:
    bert = {
        "embeddings.word_embeddings.weight": torch.randn(3, 2),
        "embeddings.position_ids": torch.arange(3)[None],
        "encoder.layer.0.attention.self.query.weight": torch.randn(2, 2),
        "encoder.layer.0.attention.output.dense.bias": torch.randn(2),
        "encoder.layer.0.attention.output.LayerNorm.weight": torch.randn(2),
        "encoder.layer.0.crossattention.self.value.bias": torch.randn(2),
        "encoder.layer.0.crossattention.output.dense.weight": torch.randn(2, 2),
        "encoder.layer.0.crossattention.output.LayerNorm.bias": torch.randn(2),
        "encoder.layer.0.intermediate.dense.weight": torch.randn(4, 2),
        "encoder.layer.0.output.dense.weight": torch.randn(2, 4),
        "encoder.layer.0.output.LayerNorm.weight": torch.randn(2),
    }
    twin = twin_state_from_bert(bert)
    p = "encoder.layer.0."
    expected = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        p + "attention.self0.query.weight": p + "attention.self.query.weight",
        p + "attention.self1.query.weight": p + "attention.self.query.weight",
        p + "attention.output.dense0.bias": p + "attention.output.dense.bias",
        p + "attention.output.dense1.bias": p + "attention.output.dense.bias",
        p + "attention.output.LayerNormA.weight": p + "attention.output.LayerNorm.weight",
        p + "attention.output.LayerNormB.weight": p + "attention.output.LayerNorm.weight",
        p + "crossattention.self0.value.bias": p + "crossattention.self.value.bias",
        p + "crossattention.self1.value.bias": p + "crossattention.self.value.bias",
        p + "crossattention.output.dense0.weight": p + "crossattention.output.dense.weight",
        p + "crossattention.output.dense1.weight": p + "crossattention.output.dense.weight",
        p + "crossattention.output.LayerNormA.bias": p + "crossattention.output.LayerNorm.bias",
        p + "crossattention.output.LayerNormB.bias": p + "crossattention.output.LayerNorm.bias",
        p + "intermediate.dense.weight": p + "intermediate.dense.weight",
        p + "output.dense.weight": p + "output.dense.weight",
        p + "output.LayerNorm.weight": p + "output.LayerNorm.weight",
    }
    assert set(twin) == set(expected)
    for new, old in expected.items():
        assert twin[new] is bert[old], new


# --------------------------------------------------------------------------------------------
# model_base.pth layout and the published checkpoints (tiny random tensors in those layouts)


def _original_layout(backbone) -> dict[str, torch.Tensor]:
    """A tiny BLIP backbone's tensors under BLIP's own (model_base.pth) names."""
    from cir_cli.backbones.blip import original_key

    return {
        original_key(k): v.clone()
        for k, v in backbone.state_dict().items()
        if not k.endswith("position_ids")
    }


@pytest.fixture(scope="module")
def tiny_model_base(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from cir_cli.backbones.blip import BlipBackbone

    torch.manual_seed(3)
    backbone = BlipBackbone.build("cir-tiny-blip")
    _randomise(backbone, seed=3)
    state = _original_layout(backbone)
    state["temp"] = torch.tensor(0.0543)
    # model_base.pth also holds modules neither stage uses (momentum encoders, queues, ITM).
    state["text_encoder_m.embeddings.word_embeddings.weight"] = torch.randn(4, 4)
    state["itm_head.weight"] = torch.randn(2, 64)
    state["image_queue"] = torch.randn(64, 8)
    path = tmp_path_factory.mktemp("mb") / "model_base.pth"
    torch.save({"model": state}, path)
    return path, state


def _recipe(tmp_path: Path, *extra: str, toy_root: Path | None = None):
    from cir_cli.recipes import load_recipe

    items = [f'output.dir="{tmp_path}"', "data.num_workers=0", *extra]
    if toy_root is not None:
        items.append(f'data.root="{toy_root}"')
    return load_recipe("toy_rerank", items)


def test_init_from_model_base_layout_copies_each_tensor(tiny_model_base, tmp_path) -> None:
    from cir_cli.methods import build_method

    path, state = tiny_model_base
    model = build_method(_recipe(tmp_path, f'backbone.pretrained="{path}"'))
    sd = model.scorer.state_dict()
    n_layers = model.scorer.text_encoder.config.num_layers
    checked = 0
    for key, value in sd.items():
        if key.startswith("cls_head.") or ".merge_layer." in key:
            continue
        src = "text_encoder." + key.removeprefix("text_encoder.")
        for a, b in (
            ("self0", "self"),
            ("self1", "self"),
            ("dense0", "dense"),
            ("dense1", "dense"),
            ("LayerNormA", "LayerNorm"),
            ("LayerNormB", "LayerNorm"),
        ):
            src = src.replace(f".{a}.", f".{b}.")
        assert torch.equal(value, state[src]), key
        checked += 1
    # 2 layers x (2 x (2 x 6 q/k/v + 2 x 2 dense + 2 x 2 LN) + 6 FFN) + 4 embedding tensors
    assert checked == n_layers * (2 * (12 + 4 + 4) + 6) + 4
    # merge_layer: N(0, 0.02), bias 0 (layer 1 of 2 at merge_from_layer = 1); head default.
    merge = model.scorer.text_encoder.encoder.layer[1].crossattention.output.merge_layer
    assert torch.count_nonzero(merge.bias) == 0 and 0.01 < float(merge.weight.detach().std()) < 0.03
    assert not hasattr(
        model.scorer.text_encoder.encoder.layer[0].crossattention.output, "merge_layer"
    )
    # Stage I: the towers and temp come from the same file.
    assert float(model.temp.detach()) == pytest.approx(0.0543)
    te = model.backbone.text_encoder.state_dict()
    assert torch.equal(
        te["encoder.layer.0.crossattention.self.key.weight"],
        state["text_encoder.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(model.backbone.text_proj.weight, state["text_proj.weight"])


def test_published_layouts_load_strictly_and_mismatch_is_one_error(tiny_model_base, tmp_path):
    from cir_cli.methods import build_method

    _, base = tiny_model_base
    torch.manual_seed(5)
    model = build_method(_recipe(tmp_path))
    # stage1/.../blip_mean.pt: {'epoch', 'BLIP_Retrieval', 'optimizer_state_dict'}
    stage1 = {
        k: torch.randn_like(v)
        for k, v in base.items()
        if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))
    }
    stage1["temp"] = torch.tensor(0.031)
    s1 = tmp_path / "stage1_blip_mean.pt"
    torch.save({"epoch": 3, "BLIP_Retrieval": stage1, "optimizer_state_dict": {"state": {}}}, s1)
    # stage2/.../blip_mean.pt: {'epoch', 'BLIP_NLVR', ...}: the dual encoder + cls_head + ViT.
    nlvr = {f"{k}": torch.randn_like(v) for k, v in model.scorer.state_dict().items()}
    nlvr["text_encoder.embeddings.position_ids"] = torch.arange(80)[None]
    nlvr.update(
        {k: torch.randn_like(v) for k, v in stage1.items() if k.startswith("visual_encoder.")}
    )
    s2 = tmp_path / "stage2_blip_mean.pt"
    torch.save({"epoch": 7, "BLIP_NLVR": nlvr, "optimizer_state_dict": {}}, s2)

    model.load_checkpoint(str(s1))
    assert float(model.temp.detach()) == pytest.approx(0.031)
    assert torch.equal(
        model.backbone.text_encoder.state_dict()[
            "encoder.layer.1.crossattention.self.query.weight"
        ],
        stage1["text_encoder.encoder.layer.1.crossattention.self.query.weight"],
    )
    assert not model.scorer_ready
    model.load_checkpoint(str(s2))
    assert model.scorer_ready
    for key, value in model.scorer.state_dict().items():
        assert torch.equal(value, nlvr[key]), key
    assert torch.equal(
        model.backbone.vision_model.embeddings.class_embedding, nlvr["visual_encoder.cls_token"]
    )

    # Each layout under the other's entry: one clear error naming it.
    swapped = tmp_path / "swapped.pt"
    torch.save({"epoch": 1, "BLIP_Retrieval": nlvr}, swapped)
    with pytest.raises(CirError, match="BLIP_NLVR \\(stage II\\)"):
        model.load_checkpoint(str(swapped))
    torch.save({"epoch": 1, "BLIP_NLVR": stage1}, swapped)
    with pytest.raises(CirError, match="BLIP_Retrieval \\(stage I\\)"):
        model.load_checkpoint(str(swapped))
    # A stage-II file of another size (or a missing tensor): strict, one line.
    nlvr_bad = dict(nlvr)
    del nlvr_bad["cls_head.2.bias"]
    torch.save({"BLIP_NLVR": nlvr_bad}, swapped)
    with pytest.raises(CirError, match="missing 1 key\\(s\\): cls_head.2.bias"):
        model.load_checkpoint(str(swapped))
    torch.save({"something": {}}, swapped)
    with pytest.raises(CirError, match="not a re-ranking checkpoint"):
        model.load_checkpoint(str(swapped))


# --------------------------------------------------------------------------------------------
# The reference's top-K files and our candidate lists


def _split(toy_root: Path, name: str = "val"):
    from cir_cli.data import load_split

    return load_split("cirr", toy_root, name)[0]


def _reference_topk(split, k: int, path: Path, numpy1_names: bool = False) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = []
    for t in split.triplets:
        pool = [g for g in split.gallery if g != t.reference]
        rows.append(list(rng.permutation(pool)[:k]))
    names = np.array(rows)  # a numpy string array, as CR's validate.py builds it
    obj = {
        "sorted_index_names": names,
        "index_names": list(split.gallery),
        "target_names": [t.target for t in split.triplets],
        "labels": torch.tensor(names == np.array([[t.target] for t in split.triplets])),
        "group_labels": torch.zeros(len(rows), 5, dtype=torch.bool),
        "split": split.split,
    }
    torch.save(obj, path)
    if numpy1_names:
        # CR wrote its files with numpy 1: the pickle names numpy.core.multiarray.
        buf = io.BytesIO()
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                dst.writestr(item, data)
        path.write_bytes(buf.getvalue())
    return names


@pytest.mark.parametrize("numpy1", [False, True])
def test_reference_topk_file_loads_safely(toy_root: Path, tmp_path: Path, numpy1: bool) -> None:
    from cir_cli.candidates import load_candidates

    split = _split(toy_root)
    path = tmp_path / "cirr_top_20_val.pt"
    names = _reference_topk(split, 20, path, numpy1)
    if numpy1:
        assert b"numpy.core.multiarray" in zipfile.ZipFile(path).read(
            next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl"))
        )
    cands = load_candidates(tmp_path, split)  # the folder: found by the reference's name
    assert cands.names == names.tolist() and cands.scores is None
    assert cands.query_ids == [t.query_id for t in split.triplets]


def test_reference_topk_rejects_unsafe_and_mismatched(toy_root: Path, tmp_path: Path) -> None:
    from cir_cli.candidates import load_candidates

    split = _split(toy_root)
    path = tmp_path / "cirr_top_20_val.pt"
    _reference_topk(split, 20, path)
    obj = torch.load(path, weights_only=False)  # our own file, written just above
    obj["target_names"] = obj["target_names"][::-1]
    torch.save(obj, path)
    with pytest.raises(CirError, match="target_names"):
        load_candidates(path, split)
    obj["target_names"] = obj["target_names"][::-1]
    obj["split"] = "test1"
    torch.save(obj, path)
    with pytest.raises(CirError, match="split 'test1'"):
        load_candidates(path, split)
    # A pickle that needs any other global is refused, never executed.
    torch.save({"sorted_index_names": obj["sorted_index_names"], "x": Path("/")}, path)
    with pytest.raises(CirError, match="refused"):
        load_candidates(path, split)


# --------------------------------------------------------------------------------------------
# Re-ranking on the toy: only the top K move, the subset follows stage II, files round-trip


@pytest.fixture(scope="module")
def trained(toy_root: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    """A few steps of both stages on the toy (numbers are not the point here)."""
    from cir_cli.workflows import run_training

    out = tmp_path_factory.mktemp("rr")
    overrides = toy_overrides(toy_root, out)
    from cir_cli.recipes import load_recipe

    s1 = run_training(
        load_recipe("toy_rerank", [*overrides, "finetune.max_steps=2", "finetune.epochs=1"]),
        "finetune",
    )
    s2 = run_training(
        load_recipe(
            "toy_rerank",
            [
                *overrides,
                f'finetune.checkpoint="{s1.run_dir}"',
                "combiner.max_steps=2",
                "combiner.epochs=1",
            ],
        ),
        "combiner",
    )
    return s2.run_dir, [*overrides, f'finetune.checkpoint="{s1.run_dir}"']


@pytest.mark.slow
def test_rerank_permutes_only_top_k_and_subset_follows_stage2(trained) -> None:
    from cir_cli import api
    from cir_cli.recipes import load_recipe

    run, overrides = trained
    recipe = load_recipe("toy_rerank", [*overrides, "rerank.k=7"])
    model = api.load_model(recipe, checkpoint=str(run))
    assert model.scorer_ready
    result = api.validate(model, recipe).splits[0]
    first = result.first_stage
    split = result.split
    assert len(result.top[0]) == 50
    moved = 0
    for q, (new, old) in enumerate(zip(result.top, first.top, strict=True)):
        assert sorted(new[:7]) == sorted(old[:7]) and new[7:50] == old[7:50]
        moved += new[:7] != old[:7]
        # Scores of the head are descending (stable sort of the stage-II scores).
        assert all(
            a >= b for a, b in zip(result.top_scores[q][:6], result.top_scores[q][1:7], strict=True)
        )
    assert moved > 0
    # R@50 with K = 7 < 50: ranks past K are the first stage's.
    assert result.recall[50] == first.recall[50]
    # The subset order agrees with the global stage-II order on shared members.
    agree = total = 0
    for q in range(len(split.triplets)):
        head = result.top[q][:7]
        shared = [m for m in result.subset_top[q] if m in head]
        total += 1
        agree += shared == [m for m in head if m in shared]
    assert agree == total


@pytest.mark.slow
def test_save_candidates_round_trip_and_rerank_from_file(trained, tmp_path: Path) -> None:
    from cir_cli import api
    from cir_cli.candidates import load_candidates
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_validation

    run, overrides = trained
    recipe = load_recipe("toy_rerank", [*overrides, 'rerank.candidates=""'])
    stage1 = run_validation(recipe, save_candidates=60)
    files = sorted(stage1.run_dir.glob("candidates_*.json"))
    assert [f.name for f in files] == ["candidates_cirr_val.json"]
    saved = json.loads(files[0].read_text())
    assert saved["k"] == 60 and saved["source"]["recipe"] == "toy_rerank"
    assert len(saved["scores"][0]) == 60
    split = stage1.evaluation.splits[0].split
    cands = load_candidates(files[0], split)
    assert cands.names == [row[:60] for row in stage1.evaluation.splits[0].top]
    # The same stage I from its file or as "self": the same re-ranked result.
    a = api.validate(
        api.load_model(load_recipe("toy_rerank", [*overrides, "rerank.k=10"]), checkpoint=str(run)),
        load_recipe("toy_rerank", [*overrides, "rerank.k=10"]),
    )
    rfile = load_recipe(
        "toy_rerank", [*overrides, "rerank.k=10", f'rerank.candidates="{stage1.run_dir}"']
    )
    b = api.validate(api.load_model(rfile, checkpoint=str(run)), rfile)
    assert a.splits[0].top == b.splits[0].top
    assert a.metrics["recall_at1"] == b.metrics["recall_at1"]
    assert b.metrics["first_stage_recall_at1"] == stage1.metrics["recall_at1"]
    # Fusion needs scores: the file has them; fusion moves the order.
    fused = load_recipe(
        "toy_rerank",
        [
            *overrides,
            "rerank.k=10",
            'rerank.fusion="sum"',
            "rerank.fusion_weight=1000.0",
            f'rerank.candidates="{stage1.run_dir}"',
        ],
    )
    c = api.validate(api.load_model(fused, checkpoint=str(run)), fused)
    # A huge weight on the first-stage score restores the first-stage order.
    assert [r[:10] for r in c.splits[0].top] == [r[:10] for r in stage1.evaluation.splits[0].top]


@pytest.mark.slow
def test_submission_keeps_50_and_needs_stage2(trained, tmp_path: Path) -> None:
    from cir_cli import api
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_submission

    run, overrides = trained
    recipe = load_recipe("toy_rerank", [*overrides, "rerank.k=20"])
    paths = run_submission(recipe, "cirr", checkpoint=str(run), save_candidates=50)
    recall = json.loads(next(p for p in paths if "recall_submission" in p.name).read_text())
    lists = [v for k, v in recall.items() if k not in ("version", "metric")]
    assert lists and all(len(v) == 50 for v in lists)
    assert any(p.name == "candidates_cirr_test1.json" for p in paths)
    # Without stage-II weights, a recipe that asks to re-rank is one clear error.
    with pytest.raises(CirError, match="no stage-II weights"):
        api.validate(api.load_model(recipe), recipe)


def test_stage2_loss_is_the_pair_loop_and_cosine_is_periodic() -> None:
    from cir_cli.engine.optim import ScheduleContext, schedule_factor
    from cir_cli.methods.rerank import pair_logits
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import train_settings

    class Toy:
        scorer = DualEncoderScorer(TINY).eval()

        def pair_scores(self, ids, mask, z, cands):
            return self.scorer(ids, mask, z, cands)

    model = Toy()
    ids = torch.randint(1, TINY.vocab_size, (3, 5))
    mask = torch.ones_like(ids)
    z = torch.randn(3, 5, TINY.hidden_size)
    tgt = torch.randn(3, 9, TINY.encoder_width)
    with torch.no_grad():
        logits = pair_logits(model, ids, mask, z, tgt)
        loop = torch.tensor(
            [
                [
                    float(
                        model.scorer(ids[i : i + 1], mask[i : i + 1], z[i : i + 1], tgt[j : j + 1])
                    )
                    for j in range(3)
                ]
                for i in range(3)
            ]
        )
    assert torch.allclose(logits, loop, atol=1e-5)
    # The engine's schedule of the paper recipe (what the trainer applies), per epoch.
    cirr = load_recipe("rerank_cirr")
    stage1, stage2 = train_settings(cirr, "finetune"), train_settings(cirr, "combiner")

    def factor(settings, epoch: int) -> float:
        ctx = ScheduleContext(epoch * 7 + 3, epoch, 7, 7 * settings.epochs, 2e-5)
        return schedule_factor(settings.schedule, ctx)[0]

    # CIRR stage I: period 10, 40 epochs: back to lr at epoch 20, ~0.976 lr at 39 (spec 7).
    assert factor(stage1, 0) == 1.0 and factor(stage1, 10) == pytest.approx(0, abs=1e-12)
    assert factor(stage1, 20) == pytest.approx(1.0)
    assert factor(stage1, 39) == pytest.approx(1.95e-5 / 2e-5, abs=2e-3)
    assert factor(stage2, 99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 80)))
    assert stage2.optimizer.name == "adamw" and stage2.optimizer.weight_decay == 0.05
    # fixes.step_cosine: per step, held at 0 past the span.
    fixed = load_recipe("rerank_cirr", ["fixes.step_cosine=true"])
    assert factor(train_settings(fixed, "finetune"), 39) == pytest.approx(0.0, abs=1e-12)


def test_init_seed_fixes_the_random_towers_across_run_seeds(tmp_path: Path) -> None:
    """backbone.init_seed: the random (frozen) ViT and the towers' starting weights depend on it
    alone, while stage II's fresh layers still follow the run seed; unset, the towers follow the
    run seed exactly as before (same stream, same draws)."""
    from cir_cli.api import seed_everything
    from cir_cli.methods import build_method

    def build(seed: int, *extra: str):
        seed_everything(seed)
        return build_method(_recipe(tmp_path, *extra))

    def merge(model) -> torch.Tensor:  # layer 1: a fresh N(0, 0.02) Linear (merge_from_layer 1)
        return model.scorer.text_encoder.encoder.layer[1].crossattention.output.merge_layer.weight

    fixed0, fixed1 = build(0, "backbone.init_seed=0"), build(1, "backbone.init_seed=0")
    plain0, plain1 = build(0), build(1)
    for a, b in ((fixed0, fixed1), (fixed0, plain0)):
        sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    vision = "vision_model.embeddings.patch_embedding.weight"
    p0, p1 = plain0.backbone.state_dict(), plain1.backbone.state_dict()
    assert not torch.equal(p0[vision], p1[vision])
    assert not torch.equal(merge(fixed0), merge(fixed1))
    # The run's stream is not advanced by the towers: fixed1's fresh layers differ from plain1's.
    assert not torch.equal(merge(fixed1), merge(plain1))


def test_paper_recipes_carry_the_published_settings() -> None:
    """spec reranking.md 7 (Instructions_CIRR.md / Instructions_FashionIQ.md, nlvr.yaml)."""
    from cir_cli.recipes import load_recipe

    cirr, fiq, sprc = (load_recipe(n) for n in ("rerank_cirr", "rerank_fiq", "rerank_sprc_cirr"))
    for r, (e1, m1, e2, m2, k) in ((cirr, (40, 10, 100, 80, 50)), (fiq, (20, 20, 50, 50, 100))):
        assert (r.finetune.epochs, r.finetune.schedule_epochs) == (e1, m1)
        assert (r.combiner.epochs, r.combiner.schedule_epochs) == (e2, m2)
        assert r.finetune.scheduler == r.combiner.scheduler == "epoch_cosine"
        assert (r.finetune.batch_size, r.combiner.batch_size) == (512, 16)
        assert r.finetune.lr == r.combiner.lr == 2e-5
        assert r.finetune.weight_decay == r.combiner.weight_decay == 0.05
        assert r.rerank.k == k and r.rerank.fusion == "none" and r.rerank.candidates == "self"
        assert r.method.merge_from_layer == 6 and not r.fixes.step_cosine
        assert r.backbone.image_size == 384 and r.data.target_ratio == 1.25
    assert fiq.data.dataset == "fashioniq" and cirr.data.dataset == "cirr"
    assert sprc.rerank.candidates == "candidates/sprc_cirr" and sprc.rerank.k == 50


# --------------------------------------------------------------------------------------------
# Against the reference's own encoder file (read from a checkout, never copied here)


@pytest.mark.lavis
def test_dual_encoder_matches_the_reference_module() -> None:
    """CR's `src/nlvr_encoder.py` (a checkout named by CIR_RERANK_REFERENCE, e.g.
    Candidate-Reranking-CIR/src) imports under transformers <= 4.55 (`tox -e lavis`). Loaded
    with our state dict (same key names), it gives the same scores: 8 layers so that layers
    0-5 average and 6-7 merge (CR hard-codes 6), padded captions, eval mode."""
    import importlib.util
    import os

    folder = os.environ.get("CIR_RERANK_REFERENCE")
    if not folder or not (Path(folder) / "nlvr_encoder.py").is_file():
        pytest.skip("set CIR_RERANK_REFERENCE to Candidate-Reranking-CIR/src (nlvr_encoder.py)")
    transformers = pytest.importorskip("transformers")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) > (4, 55):
        pytest.skip(f"CR's encoder needs transformers <= 4.55 (have {transformers.__version__})")
    spec = importlib.util.spec_from_file_location(
        "cr_nlvr_encoder", Path(folder) / "nlvr_encoder.py"
    )
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    from transformers.models.bert.configuration_bert import BertConfig

    # 8 layers, so both averaged (0-5) and merged (6-7) cross-attention layers run.
    cfg = dataclasses.replace(TINY, num_layers=8, merge_from_layer=6)
    bert = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=8,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=20,
        add_cross_attention=True,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    bert.encoder_width = 12
    theirs = ref.BertModel(bert, add_pooling_layer=False).eval()
    ours = DualEncoderScorer(cfg).eval()
    _randomise(ours, seed=7)
    state = {
        k.removeprefix("text_encoder."): v
        for k, v in ours.state_dict().items()
        if k.startswith("text_encoder.")
    }
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    torch.manual_seed(8)
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    z_t = torch.randn(3, 6, 16)
    image = torch.randn(3, 9, 12)
    atts = torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        pooled = theirs(
            ids,
            attention_mask=mask,
            z_t=z_t,
            encoder_hidden_states=[image, image],
            encoder_attention_mask=[atts, atts],
            return_dict=True,
        )
        want = ours.cls_head(pooled)[:, 0]
        got = ours(ids, mask, z_t, image)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert float(want.std()) > 1e-3  # distinct scores: the comparison is not vacuous
    print(f"reference parity: max |diff| {float((got - want).abs().max()):.2e}, {want.tolist()}")


def test_cli_save_candidates_and_rerank_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cir_cli.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["validate", "--recipe", "toy_rerank", "--save-candidates", "0"])
    assert bad.exit_code == 2 and "--save-candidates 0" in bad.output
    assert "Traceback" not in bad.output
    typo = runner.invoke(
        app, ["recipes", "validate", "toy_rerank", "--set", 'rerank.fusion="product"']
    )
    assert typo.exit_code == 2 and "rerank.fusion" in typo.output


@pytest.mark.slow
def test_fashioniq_layout_reranks_each_category_past_50(tmp_path: Path) -> None:
    """FashionIQ protocol (toy layout): one candidate list per category, the reference kept,
    K = 60 > 50 so R@50 comes from the re-ordered list too (rerank_fiq uses K = 100)."""
    from cir_cli import api
    from cir_cli.data.toy import generate_toy
    from cir_cli.recipes import load_recipe
    from cir_cli.workflows import run_training, run_validation

    root = tmp_path / "toy_fiq"
    generate_toy(root, fmt="fashioniq", n_train_triplets=64, n_val_queries=24, n_test_queries=8)
    shapes = ["circle", "square", "triangle", "star"]
    sets = toy_overrides(root, tmp_path / "runs") + [
        'data.dataset="fashioniq"',
        f"data.categories={json.dumps(shapes)}",
        'data.test_split="test"',
        "finetune.max_steps=1",
        "finetune.epochs=1",
        "finetune.batch_size=16",
        "combiner.max_steps=1",
        "combiner.epochs=1",
        "combiner.validate_every=1",
        "rerank.k=60",
    ]
    s1 = run_training(load_recipe("toy_rerank", sets), "finetune")
    sets.append(f'finetune.checkpoint="{s1.run_dir}"')
    s2 = run_training(load_recipe("toy_rerank", sets), "combiner")
    assert "average_recall" in s2.best and "first_stage_average_recall" in s2.best
    recipe = load_recipe("toy_rerank", sets)
    run = run_validation(recipe, checkpoint=str(s2.run_dir), save_candidates=60)
    names = sorted(p.name for p in run.run_dir.glob("candidates_*.json"))
    assert names == sorted(f"candidates_fashioniq_val_{s}.json" for s in shapes)
    for result in run.evaluation.splits:
        first = result.first_stage
        for new, old in zip(result.top, first.top, strict=True):
            assert sorted(new[:60]) == sorted(old[:60])
    model = api.load_model(recipe, checkpoint=str(s2.run_dir))
    assert model.describe()["stage2_loaded"]
