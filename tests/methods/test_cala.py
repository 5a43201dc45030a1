"""CaLa: TAC / HCA / ARTEMIS against direct formulas, the loss, the RN50x4 hooks, CaLa's saved
layouts, and the toy pipelines (BLIP-2 sum and ARTEMIS, CLIP) through finetune / validate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cir_cli.errors import CirError
from cir_cli.modules.cala_heads import (
    Artemis,
    HingeCrossAttention,
    TwinAttentionCompositor,
    spatial_tokens,
)
from cir_cli.recipes import load_recipe
from tests.backbones.test_blip2 import lavis_layout
from tests.conftest import toy_overrides

CLIP_TINY = ['backbone.arch="cir-tiny-rn"', 'backbone.pretrained=""', "data.image_size=64"]


def _build(recipe: str, sets: list[str] | None = None):
    from cir_cli.methods import build_method

    torch.manual_seed(0)
    return build_method(load_recipe(recipe, sets or [])).eval()


@pytest.fixture(scope="module")
def blip2_model():
    return _build("toy_cala")


# -- the heads, against the spec's formulas ----------------------------------------------------


def _attention(module: torch.nn.MultiheadAttention, query, kv) -> torch.Tensor:
    """One-head attention written out: softmax(q k^T / sqrt(d)) v, then the output map."""
    d = query.shape[-1]
    wq, wk, wv = module.in_proj_weight.chunk(3)
    bq, bk, bv = module.in_proj_bias.chunk(3)
    q, k, v = query @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return (weights @ v) @ module.out_proj.weight.T + module.out_proj.bias


def _direct_gap(tac: TwinAttentionCompositor, ref, tgt) -> torch.Tensor:
    out1 = _attention(tac.reference_as_query_attention, ref, tgt)
    out2 = _attention(tac.target_as_query_attention, tgt, ref)
    for _ in range(3):
        out1 = _attention(tac.reference_as_query_attention, ref, out1)
        out2 = _attention(tac.target_as_query_attention, tgt, out2)
    return (out1[:, 0] + out2[:, 0]) / 2


def test_tac_equals_four_plus_four_shared_attentions() -> None:
    gen = torch.Generator().manual_seed(0)
    tac = TwinAttentionCompositor(16).double().eval()
    ref = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)
    tgt = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tac(ref, tgt), _direct_gap(tac, ref, tgt))
    # The CLIP version: ReLU(fc) on C-wide map tokens and a fresh N(0, 1) token 0 shared by both.
    tac = TwinAttentionCompositor(16, map_channels=40).double().eval()
    ref = torch.randn(3, 4, 40, generator=gen, dtype=torch.float64)
    tgt = torch.randn(3, 4, 40, generator=gen, dtype=torch.float64)
    torch.manual_seed(7)
    got = tac(ref, tgt)
    torch.manual_seed(7)
    cls = torch.randn(3, 1, 16, dtype=torch.float64)
    r = torch.cat([cls, F.relu(ref @ tac.fc.weight.T + tac.fc.bias)], 1)
    t = torch.cat([cls, F.relu(tgt @ tac.fc.weight.T + tac.fc.bias)], 1)
    torch.testing.assert_close(got, _direct_gap(tac, r, t))


def _direct_hca(hca: HingeCrossAttention, ref, cap, tgt) -> torch.Tensor:
    """Per sample, per element: A = (R Wq)(C Wk)^T/sqrt(d), H = (C Wk)(T Wg)^T/sqrt(d)."""
    out = []
    lin = {n: (m.weight, m.bias) for n, m in hca.named_children() if hasattr(m, "weight")}

    def apply(name, x):
        w, b = lin[name]
        return x @ w.T + b

    for r, c, t in zip(ref, cap, tgt, strict=True):
        d = r.shape[-1]
        qr, kc, kt, vt = (
            apply("query_ref1", r),
            apply("key_text1", c),
            apply("key_tar1", t),
            (apply("value1", t)),
        )
        a = torch.stack(
            [torch.stack([qr[i] @ kc[j] for j in range(len(c))]) for i in range(len(r))]
        )
        h = torch.stack(
            [torch.stack([kc[j] @ kt[k] for k in range(len(t))]) for j in range(len(c))]
        )
        p = torch.softmax((a / math.sqrt(d)) @ (h / math.sqrt(d)), dim=-1)
        out.append((p @ vt)[0])
    return torch.stack(out)


def test_hca_equals_the_hinge_formula_and_its_mask_drops_padding() -> None:
    gen = torch.Generator().manual_seed(1)
    hca = HingeCrossAttention(12).double().eval()  # eval: dropout off
    ref = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
    cap = torch.randn(3, 7, 12, generator=gen, dtype=torch.float64)
    tgt = torch.randn(3, 6, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(hca(ref, cap, tgt), _direct_hca(hca, ref, cap, tgt))
    # With a padding mask each sample equals the unmasked formula on its real tokens only.
    lengths = [7, 4, 2]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    masked = hca(ref, cap, tgt, mask)
    for i, n in enumerate(lengths):
        alone = _direct_hca(hca, ref[i : i + 1], cap[i : i + 1, :n], tgt[i : i + 1])
        torch.testing.assert_close(masked[i : i + 1], alone)
    assert torch.equal(masked[0], hca(ref, cap, tgt)[0])  # no padding, nothing changes
    assert not torch.allclose(masked[1:], hca(ref, cap, tgt)[1:])  # CaLa's unmasked result
    # CLIP: ReLU(fc1) on the map tokens first; the scale is 1/sqrt(d) after the reduction.
    hca = HingeCrossAttention(12, map_channels=30).double().eval()
    ref = torch.randn(2, 4, 30, generator=gen, dtype=torch.float64)
    tgt = torch.randn(2, 4, 30, generator=gen, dtype=torch.float64)
    cap = torch.randn(2, 9, 12, generator=gen, dtype=torch.float64)
    reduce = lambda x: F.relu(x @ hca.fc1.weight.T + hca.fc1.bias)  # noqa: E731
    torch.testing.assert_close(hca(ref, cap, tgt), _direct_hca(hca, reduce(ref), cap, reduce(tgt)))


def test_artemis_factored_scores_equal_em_plus_is_per_pair() -> None:
    gen = torch.Generator().manual_seed(2)
    artemis = Artemis(10).double()
    r = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    m = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    t = F.normalize(torch.randn(6, 10, generator=gen, dtype=torch.float64), dim=-1)

    def l2(x):
        return x / x.square().sum().sqrt()

    def mlp(att, x):
        lin1, lin2 = att.attention[0], att.attention[2]
        return torch.softmax(
            (torch.relu(x @ lin1.weight.T + lin1.bias)) @ lin2.weight.T + lin2.bias, 0
        )

    direct = torch.empty(4, 6, dtype=torch.float64)
    for i in range(4):
        tr = l2(m[i] @ artemis.Transform_m[0].weight.T + artemis.Transform_m[0].bias)
        a_em, a_is = mlp(artemis.Attention_EM, m[i]), mlp(artemis.Attention_IS, m[i])
        for j in range(6):
            em = tr @ l2(a_em * t[j])
            is_ = l2(a_is * r[i]) @ l2(a_is * t[j])
            direct[i, j] = em + is_
    torch.testing.assert_close(artemis(r, m, t), direct)
    assert float(direct.detach().abs().max()) <= 2.0


# -- spatial tokens and the RN50x4 hooks -------------------------------------------------------


def test_spatial_tokens_permute_and_compat_view() -> None:
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    tokens = spatial_tokens(fmap)
    for b in range(2):
        for h in range(2):
            for w in range(2):
                assert torch.equal(tokens[b, h * 2 + w], fmap[b, :, h, w])
    scrambled = spatial_tokens(fmap, compat=True)
    assert torch.equal(scrambled, fmap.reshape(2, 4, 3))  # CaLa's .view: memory order
    assert not torch.equal(scrambled, tokens)


def test_rn50x4_hooks_equal_open_clip_and_a_manual_forward() -> None:
    """RN50x4 (random weights): the hooked map is layer4's output, (B, 2560, 9, 9) at 288 px,
    the globals are encode_image / encode_text's, the text sequence is ln_final's output."""
    from cir_cli.backbones.open_clip_towers import OpenClipBackbone
    from cir_cli.config import BackboneConfig

    torch.manual_seed(0)
    bb = OpenClipBackbone.from_config(BackboneConfig(arch="RN50x4", pretrained=None))
    model = bb.model
    pixels = torch.randn(2, 3, 288, 288)
    with torch.no_grad():
        features, fmap = bb.encode_image_with_map(pixels)
        visual = model.visual
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        assert torch.equal(features, model.encode_image(pixels))
        assert fmap.shape == (2, 2560, 9, 9) and bb.map_shape() == (2560, 81)
        torch.testing.assert_close(fmap, x)
        tokens = spatial_tokens(fmap)
        assert tokens.shape == (2, 81, 2560)
        assert torch.equal(tokens[1, 4 * 9 + 7], fmap[1, :, 4, 7])

        ids = bb.tokenize(["a red dress with sleeves", "same but blue"])
        text, sequence = bb.encode_text_with_sequence(ids)
        seq = model.token_embedding(ids) + model.positional_embedding
        seq = model.ln_final(model.transformer(seq, attn_mask=model.attn_mask))
        assert sequence.shape == (2, 77, 640)
        torch.testing.assert_close(sequence, seq)
        eot = ids.argmax(-1)
        torch.testing.assert_close(text, seq[torch.arange(2), eot] @ model.text_projection)
        assert torch.equal(text, model.encode_text(ids))
    # The hooks are gone afterwards.
    assert not visual.attnpool._forward_pre_hooks and not model.ln_final._forward_hooks


# -- the method: features, loss, groups --------------------------------------------------------


def test_eval_queries_are_norm_r_plus_m_of_the_two_qformer_copies(blip2_model) -> None:
    model = blip2_model
    bb = model.backbone
    reps = model.image_representation(torch.randn(3, 3, 64, 64))
    texts = ["make it red", "move it one step left", "a large blue star in the centre and bigger"]
    with torch.no_grad():
        got = model.queries_from_representation(reps, texts)
        ids, mask = model.tokenize(texts)
        assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest caption
        image = bb.image_embeds(reps)
        r = model.multimodal_qformer.multimodal_outputs(image, ids, mask)[:, 0]
        m = model.text_qformer.text_outputs(ids, mask)[:, 0]
        torch.testing.assert_close(got, F.normalize(r + m, dim=-1))
        targets = model.targets_from_representation(reps)
        torch.testing.assert_close(targets, F.normalize(bb.query_outputs(image)[:, 0], dim=-1))
    # The copies start equal to the backbone's Q-Former and are separate tensors.
    assert torch.equal(model.text_qformer.query_tokens, bb.query_tokens)
    assert model.text_qformer.query_tokens.data_ptr() != bb.query_tokens.data_ptr()


def test_loss_with_tau_h_zero_is_the_plain_sum_loss(blip2_model) -> None:
    """tau = h = 0: the training loss equals CE(100 q t^T) with q and t from the evaluation
    path (queries_from_representation / targets_from_representation)."""
    from cir_cli.methods.cala import cala_loss

    model = blip2_model
    reps = model.image_representation(torch.randn(6, 3, 64, 64))
    refs, tgts = reps[:3], reps[3:]
    texts = ["make it red", "bigger", "move it left and make it green"]
    model.cfg.tac_weight, model.cfg.hca_weight = 0.0, 0.0
    try:
        with torch.no_grad():
            loss, _ = cala_loss(model, model.training_features(refs, tgts, texts))
            q = model.queries_from_representation(refs, texts)
            t = model.targets_from_representation(tgts)
        torch.testing.assert_close(loss, F.cross_entropy(100 * q @ t.T, torch.arange(3)))
    finally:
        model.cfg.tac_weight, model.cfg.hca_weight = 0.45, 0.1
    # tau, h > 0: h CE(10 p r^T) + (1 - h) CE(tau 10 m g^T + (1 - tau) 100 q t^T).
    with torch.no_grad():
        f = model.training_features(refs, tgts, texts)
        loss, parts = cala_loss(model, f)
        g = model.tac(f["tac_reference"], f["tac_target"])
        p = model.hca(f["reference_tokens"], f["caption"], f["target_tokens"], f["mask"])
        labels = torch.arange(3)
        main = 100 * F.normalize(f["r"] + f["m"], dim=-1) @ f["t"].T
        expected = 0.1 * F.cross_entropy(10 * p @ f["r"].T, labels) + 0.9 * F.cross_entropy(
            0.45 * 10 * f["m"] @ g.T + 0.55 * main, labels
        )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"loss_main", "loss_hca"}


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("encoder", ["multi", "both"])
def test_param_groups_follow_the_spec_table(
    toy_root: Path, tmp_path: Path, encoder: str, fixed: bool
) -> None:
    model = _build(
        "toy_cala",
        toy_overrides(
            toy_root,
            tmp_path,
            method__encoder=encoder,
            method__frame="artemis",
            fixes__schedule_query_tokens=fixed,
        ),
    )
    task = model.finetune_task(torch.device("cpu"))
    groups = task.param_groups()
    lr = model.recipe.finetune.lr
    ids = [{id(p) for p in g["params"]} for g in groups]
    mm_tokens = {id(model.multimodal_qformer.query_tokens)}
    multimodal = {id(p) for p in model.multimodal_qformer.parameters()}
    visual = {id(p) for p in model.backbone.query_path_parameters()}
    vis_tokens = {id(model.backbone.query_tokens)}
    text_ids = {id(p) for p in model.text_qformer.text_path_parameters()}
    # CaLa src/blip_fine_tune.py: [multimodal bert, its query_tokens, textual bert, (visual bert,
    # its query_tokens), TAC, HCA, ARTEMIS]; group 0 alone follows onlyGroup0's schedule.
    if fixed:  # the query tokens in their Q-Former's group
        expect = [multimodal, text_ids] + ([visual] if encoder == "both" else [])
    else:
        expect = [multimodal - mm_tokens, mm_tokens, text_ids]
        expect += [visual - vis_tokens, vis_tokens] if encoder == "both" else []
    assert ids[: len(expect)] == expect
    assert len(groups) == len(expect) + 3
    named = dict(model.text_qformer.named_parameters())
    assert id(named["query_tokens"]) not in text_ids
    assert not any(id(p) in text_ids for n, p in named.items() if "crossattention" in n)
    assert (visual <= set().union(*ids)) == (encoder == "both")
    heads = {
        "tac": (model.tac, 2 * lr),
        "hca": (model.hca, 2 * lr),
        "artemis": (model.artemis, 10 * lr),
    }
    for name, (module, want) in heads.items():
        group = next(
            g
            for g in groups
            if {id(p) for p in g["params"]} == {id(p) for p in module.parameters()}
        )
        assert group["lr"] == pytest.approx(want) and group["weight_decay"] == 0.05, name
    vit = {id(p) for p in model.backbone.vision_model.parameters()}
    assert not any(vit & g for g in ids)
    # Every grouped tensor takes part in the loss's graph (DDP without find_unused_parameters
    # needs it): the groups leave out what a role's path never reads.
    from cir_cli.methods.cala import cala_loss

    model.train()
    reps = model.image_representation(torch.randn(6, 3, 64, 64))
    loss, _ = cala_loss(model, model.training_features(reps[:3], reps[3:], ["red", "big", "a"]))
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for g in groups for p in g["params"] if p.grad is None] == []


def test_encoder_choices_are_checked() -> None:
    with pytest.raises(CirError, match="'multi'.*'both'"):
        _build("toy_cala", ['method.encoder="text"'])
    with pytest.raises(CirError, match="text tower only"):
        _build("cala_clip_cirr", [*CLIP_TINY, 'method.encoder="both"'])


# -- CaLa's saved layouts ----------------------------------------------------------------------


def _head_state(names_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in names_shapes.items()}


def _cala_tac(d: int, channels: int | None = None) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in ("reference_as_query_attention", "target_as_query_attention"):
        out |= {
            f"{name}.in_proj_weight": (3 * d, d),
            f"{name}.in_proj_bias": (3 * d,),
            f"{name}.out_proj.weight": (d, d),
            f"{name}.out_proj.bias": (d,),
        }
    if channels:
        out |= {"fc.weight": (d, channels), "fc.bias": (d,)}
    return out


def _cala_hca(d: int, channels: int | None = None) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in (1, 2):
        for name in ("query_ref", "key_text", "key_tar", "value"):
            out |= {f"{name}{i}.weight": (d, d), f"{name}{i}.bias": (d,)}
    if channels:
        out |= {"fc1.weight": (d, channels), "fc1.bias": (d,)}
    return out


def _cala_artemis(d: int) -> dict[str, tuple[int, ...]]:
    out = {"Transform_m.0.weight": (d, d), "Transform_m.0.bias": (d,), "temperature": (1,)}
    for att in ("Attention_EM", "Attention_IS"):
        for layer in (0, 2):
            out |= {
                f"{att}.attention.{layer}.weight": (d, d),
                f"{att}.attention.{layer}.bias": (d,),
            }
    return out


def test_cala_blip2_run_folder_loads_strictly_after_mapping(tmp_path: Path, capsys) -> None:
    """tuned_blip_{visual,text,multi}_arithmetic.pt ({"Blip2Qformer"}: full LAVIS state dicts,
    ViT included, shared frozen parts equal), tuned_tac.pt, tuned_hca.pt and
    tuned_artemis_arithmetic.pt, real key names, random values: every tensor lands."""
    model = _build("toy_cala", ['method.frame="artemis"'])
    vocab = model.backbone.embeddings.word_embeddings.num_embeddings
    d = model.dim
    visual = lavis_layout("blip2-tiny-vitl", vocab, prompt_tokens=False, seed=1)
    files = {"visual": visual}
    for role, seed in (("text", 2), ("multi", 3)):
        own = lavis_layout("blip2-tiny-vitl", vocab, prompt_tokens=False, seed=seed)
        qformer = {k for k in own if k.startswith("Qformer.bert.") or k == "query_tokens"}
        files[role] = {k: (own[k] if k in qformer else v) for k, v in visual.items()}
    folder = tmp_path / "saved_models"
    folder.mkdir()
    for role, sd in files.items():
        torch.save({"epoch": 3, "Blip2Qformer": sd}, folder / f"tuned_blip_{role}_arithmetic.pt")
    heads = {
        "tuned_tac.pt": ("TwinAttentionCompositorBLIP2", _head_state(_cala_tac(d), 4)),
        "tuned_hca.pt": ("HingebasedCrossAttentionBLIP2", _head_state(_cala_hca(d), 5)),
        "tuned_artemis_arithmetic.pt": ("Artemis", _head_state(_cala_artemis(d), 6)),
    }
    for name, (key, sd) in heads.items():
        torch.save({"epoch": 3, key: sd}, folder / name)

    model.load_checkpoint(str(folder))
    err = capsys.readouterr().err
    assert "8 key(s) HCA's second parameter set" in err
    assert "1 key(s) ARTEMIS's temperature" in err
    assert "BERT LM head" in err
    own = model.state_dict()
    layer = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    lavis_layer = "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"
    checks = {
        f"backbone.{layer}": files["visual"][lavis_layer],
        f"text_qformer.{layer}": files["text"][lavis_layer],
        f"multimodal_qformer.{layer}": files["multi"][lavis_layer],
        "multimodal_qformer.query_tokens": files["multi"]["query_tokens"],
        "text_qformer.embeddings.word_embeddings.weight": files["text"][
            "Qformer.bert.embeddings.word_embeddings.weight"
        ],
        "backbone.ln_vision.weight": visual["ln_vision.weight"],
        "backbone.vision_model.encoder.layers.1.mlp.fc1.weight": visual[
            "visual_encoder.transformer.resblocks.1.mlp.c_fc.weight"
        ],
        "tac.target_as_query_attention.in_proj_weight": heads["tuned_tac.pt"][1][
            "target_as_query_attention.in_proj_weight"
        ],
        "hca.key_tar1.bias": heads["tuned_hca.pt"][1]["key_tar1.bias"],
        "artemis.Attention_IS.attention.2.weight": heads["tuned_artemis_arithmetic.pt"][1][
            "Attention_IS.attention.2.weight"
        ],
    }
    for ours, theirs in checks.items():
        assert torch.equal(own[ours], theirs), ours

    # A text file from another run (different frozen parts) is refused, naming the tensor.
    files["text"]["ln_vision.bias"] = files["text"]["ln_vision.bias"] + 1
    torch.save({"Blip2Qformer": files["text"]}, folder / "tuned_blip_text_arithmetic.pt")
    with pytest.raises(CirError, match="differ from the visual Q-Former file's.*ln_vision.bias"):
        model.load_checkpoint(str(folder))
    # A renamed head key is an error, not a silent miss.
    sd = heads["tuned_tac.pt"][1]
    sd["reference_attention.in_proj_bias"] = sd.pop("reference_as_query_attention.in_proj_bias")
    torch.save({"TwinAttentionCompositorBLIP2": sd}, tmp_path / "tuned_tac.pt")
    with pytest.raises(CirError, match="reference_as_query_attention.in_proj_bias"):
        model.load_checkpoint(str(tmp_path / "tuned_tac.pt"))


def test_cala_clip_files_load_strictly(tmp_path: Path) -> None:
    """tuned_clip_arithmetic.pt ({"CLIP"}: OpenAI key names), tuned_tac.pt / tuned_hca.pt with
    the CLIP heads' fc / fc1 reductions (cir-tiny-rn: 256 map channels, d = 32)."""
    model = _build("cala_clip_cirr", CLIP_TINY)
    channels, _ = model.backbone.map_shape()
    clip_sd = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.backbone.model.state_dict().items()
    }
    torch.save({"epoch": 1, "CLIP": clip_sd}, tmp_path / "tuned_clip_arithmetic.pt")
    tac = _head_state(_cala_tac(model.dim, channels), 1)
    hca = _head_state(_cala_hca(model.dim, channels), 2)
    torch.save({"TwinAttentionCompositorCLIP": tac}, tmp_path / "tuned_tac.pt")
    torch.save({"HingebasedCrossAttentionCLIP": hca}, tmp_path / "tuned_hca.pt")
    model.load_checkpoint(str(tmp_path))
    assert torch.equal(model.backbone.model.ln_final.weight, clip_sd["ln_final.weight"])
    assert torch.equal(model.tac.fc.weight, tac["fc.weight"])
    assert torch.equal(model.hca.fc1.bias, hca["fc1.bias"])
    (tmp_path / "tuned_clip_arithmetic.pt").unlink()
    with pytest.raises(CirError, match="no tuned_clip"):
        model.load_checkpoint(str(tmp_path))


# -- the toy pipelines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="blip2-sum"),
        pytest.param(['method.frame="artemis"', 'method.encoder="multi"'], id="blip2-artemis"),
        pytest.param(CLIP_TINY, id="clip-sum"),
    ],
)
def test_toy_finetune_checkpoint_validate(toy_root: Path, tmp_path: Path, extra) -> None:
    """`cir finetune` -> trained tensors only in the checkpoint -> `cir validate` gives the
    numbers the run selected (by CaLa's CIRR choice, the mean of the 7 recalls), reusing the
    cached frozen image features."""
    from cir_cli.checkpoints import load_weights
    from cir_cli.workflows import run_training, run_validation

    sets = toy_overrides(
        toy_root,
        tmp_path / "runs",
        finetune__epochs=1,
        finetune__max_steps=4,
        finetune__batch_size=32,
        eval__batch_size=256,
        eval__selection_metric="arithmetic_mean",
    )
    recipe_name = "cala_clip_cirr" if extra == CLIP_TINY else "toy_cala"
    if recipe_name == "cala_clip_cirr":
        sets += ['finetune.amp="fp32"', "finetune.lr=1e-4"]
    recipe = load_recipe(recipe_name, sets + extra)
    run = run_training(recipe, "finetune")
    assert run.steps == 4 and [row["step"] for row in run.history] == [0, 4]
    # The validation before training is logged but never `best` (no reference selects it).
    best = max(run.history[1:], key=lambda row: row["arithmetic_mean"])
    assert run.best["arithmetic_mean"] == best["arithmetic_mean"]
    weights, _ = load_weights(run.run_dir / "checkpoints" / "last" / "weights.safetensors")
    assert not any("vision_model" in k or k.startswith("backbone.model.visual") for k in weights)
    assert any(k.startswith("tac.") for k in weights) and any(k.startswith("hca.") for k in weights)
    if recipe_name == "toy_cala":
        assert not any("text_qformer" in k and "crossattention" in k for k in weights)
        visual_trained = any(k.startswith("backbone.qformer.") for k in weights)
        assert visual_trained == ('method.encoder="multi"' not in extra)
        assert any(k.startswith("artemis.") for k in weights) == ("artemis" in str(extra))
    validation = run_validation(recipe, checkpoint=str(run.run_dir))
    for key in ("recall_at1", "recall_at5", "mean_r5_rs1"):
        assert validation.metrics[key] == pytest.approx(run.best[key])
    if not extra:
        from cir_cli.workflows import run_submission

        paths = run_submission(recipe, "cirr", checkpoint=str(run.run_dir))
        assert sorted(p.name.split("_submission")[0] for p in paths) == [
            "recall",
            "recall_subset",
        ]


def test_unknown_selection_metric_is_one_clear_error(toy_root: Path, tmp_path: Path) -> None:
    from cir_cli.workflows import run_training

    sets = toy_overrides(toy_root, tmp_path / "runs", finetune__max_steps=1)
    recipe = load_recipe("toy_cala", [*sets, 'eval.selection_metric="mean_recall"'])
    with pytest.raises(CirError, match="'mean_recall' is not among the validation metrics: .*"):
        run_training(recipe, "finetune")


def test_training_is_the_same_with_a_cold_or_a_warm_feature_cache(
    toy_root: Path, tmp_path: Path
) -> None:
    """HCA's dropout draws from the seeded RNG; encoding images (cold cache: DataLoader seeds
    drawn) or not (warm) before and during training must not change a single weight."""
    from cir_cli.checkpoints import load_weights
    from cir_cli.workflows import run_training

    sets = toy_overrides(
        toy_root,
        tmp_path / "runs",
        finetune__epochs=1,
        finetune__max_steps=3,
        finetune__batch_size=32,
        eval__batch_size=256,
        data__num_workers=1,
    )
    recipe = load_recipe("toy_cala", sets)
    runs = [run_training(recipe, "finetune") for _ in range(2)]  # cold, then warm cache
    weights = [
        load_weights(r.run_dir / "checkpoints" / "last" / "weights.safetensors")[0] for r in runs
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_toy_fashioniq_layout_trains_with_random_caption_joins(tmp_path: Path) -> None:
    """The FashionIQ path: the 4 random caption joins in training, per-category metrics and the
    average recall as selection metric (cala_blip2_fiq's settings on the toy FashionIQ layout)."""
    import json

    from cir_cli.data.toy import generate_toy
    from cir_cli.workflows import run_training

    root = tmp_path / "toy_fiq"
    generate_toy(root, fmt="fashioniq", n_train_triplets=120, n_val_queries=40, n_test_queries=8)
    shapes = ["circle", "square", "triangle", "star"]
    sets = toy_overrides(
        root,
        tmp_path / "runs",
        finetune__epochs=1,
        finetune__max_steps=2,
        finetune__batch_size=16,
        eval__batch_size=256,
    ) + [
        'data.dataset="fashioniq"',
        f"data.categories={json.dumps(shapes)}",
        'data.test_split="test"',
    ]
    recipe = load_recipe("toy_cala", sets)
    task = _build("toy_cala", sets).finetune_task(torch.device("cpu"))
    assert task.policy == "fiq_random" and task.selection_metric == "average_recall"
    run = run_training(recipe, "finetune")
    assert run.steps == 2
    assert {f"{s}_recall_at10" for s in shapes} <= set(run.best)
    assert run.best["average_recall"] == max(r["average_recall"] for r in run.history[1:])
