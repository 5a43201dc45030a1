"""Reference-exact training rows of issue 13 that are not the lr schedule: LinCIR's EMA warm-up,
validation cadence and `best` selection, AMP mode of the paper recipes, CaLa's HCA mask, and
the CLIP checkpoints of lincir_huge / lincir_giga. Each against the reference's own rule."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cir_cli.engine.trainer import Trainer, TrainSettings, _amp
from cir_cli.methods.lincir import LinCirFinetune
from cir_cli.recipes import builtin_names, load_recipe
from cir_cli.workflows import stage_amp

PAPER_RECIPES = [
    n for n in builtin_names() if not n.startswith(("toy_", "clip_sum")) and "_fixed" not in n
]


# --- LinCIR EMA -------------------------------------------------------------------------------


class ReferenceEMA:
    """navervision/lincir models.py EMAModel, re-derived: the counter is incremented before the
    decay min(decay, (1 + n) / (10 + n)) is computed; s <- s - (1 - decay) (s - p)."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.shadow = [p.clone() for p in params]
        self.decay = decay
        self.n = 0

    def step(self, params: list[torch.Tensor]) -> None:
        self.n += 1
        one_minus = 1 - min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, params, strict=True):
            s.sub_(one_minus * (s - p))


def _ema_stub(from_zero: bool, decay: float) -> SimpleNamespace:
    torch.manual_seed(0)
    phi = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).double()
    ema = copy.deepcopy(phi)
    ema.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
    recipe = load_recipe("lincir_large", [f"fixes.ema_warmup_from_zero={str(from_zero).lower()}"])
    return SimpleNamespace(
        ema=ema,
        mcfg=SimpleNamespace(ema_decay=decay),
        recipe=recipe,
        model=SimpleNamespace(phi=phi),
    )


@pytest.mark.parametrize("decay", [0.9999, 0.6])
def test_lincir_ema_equals_the_reference_ema_model(decay: float) -> None:
    stub = _ema_stub(False, decay)
    reference = ReferenceEMA([p.detach() for p in stub.model.phi.parameters()], decay)
    for step in range(25):
        with torch.no_grad():
            for p in stub.model.phi.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        LinCirFinetune._update_ema(stub)
        reference.step([p.detach() for p in stub.model.phi.parameters()])
        for mine, ref in zip(stub.ema.parameters(), reference.shadow, strict=True):
            assert torch.allclose(mine, ref, rtol=0, atol=1e-12), step


def test_ema_warmup_switch_counts_from_zero() -> None:
    """First update: reference decay 2/11; fixes.ema_warmup_from_zero: 1/10."""
    for from_zero, first_decay in ((False, 2 / 11), (True, 1 / 10)):
        stub = _ema_stub(from_zero, 0.9999)
        before = [p.detach().clone() for p in stub.ema.parameters()]
        with torch.no_grad():
            for p in stub.model.phi.parameters():
                p.add_(1.0)
        LinCirFinetune._update_ema(stub)
        for e, b, p in zip(stub.ema.parameters(), before, stub.model.phi.parameters(), strict=True):
            expected = first_decay * b + (1 - first_decay) * p.detach()
            assert torch.allclose(e, expected, rtol=0, atol=1e-12)


# --- validation cadence and `best` --------------------------------------------------------------


class ScriptedTask:
    """A one-weight task whose validation returns scripted metrics (the trainer's bookkeeping
    alone is under test)."""

    stage = "finetune"
    selection_metric = "recall_at1"

    def __init__(self, values: list[float]) -> None:
        self.model = nn.Linear(1, 1)
        self.values = list(values)
        self.evaluated_at: list[int] = []

    def num_samples(self) -> int:
        return 8

    def set_epoch(self, epoch: int) -> None:
        pass

    def dataset(self):
        return None

    def collate(self, items):
        return items

    def gather(self, indices):
        return torch.tensor(indices, dtype=torch.float32)[:, None]

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 1e-3}]

    def make_optimizer(self, groups):
        return torch.optim.SGD(groups, lr=1e-3)

    def set_train_mode(self) -> None:
        self.model.train()

    def compute_loss(self, batch):
        return self.model(batch).pow(2).mean(), {}

    def evaluate(self):
        return {"recall_at1": self.values.pop(0)}

    def trainable_state(self):
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, state) -> None:
        self.model.load_state_dict(state)

    def checkpoint_metadata(self):
        return {"stage": self.stage}


def _fit(tmp_path: Path, values: list[float], select_initial: bool):
    task = ScriptedTask(values)
    settings = TrainSettings(
        epochs=0, max_steps=7, batch_size=1, seed=0, validate_every_steps=3,
        validate_at_steps=(1,), select_initial=select_initial,
    )
    from cir_cli.engine.run_log import RunLog

    log = RunLog(tmp_path, enabled=False)  # no curves.png: the bookkeeping alone is tested
    return Trainer(task, settings, tmp_path, torch.device("cpu"), run_log=log).fit()


def test_validation_cadence_and_selection_follow_train_phi(tmp_path: Path) -> None:
    # train_phi.py validates at step 50 and every validation_steps (here: 1 and every 3), keeps
    # phi_best on a strictly greater R@1, and never validates before training. cir validates at
    # step 0 too (logged), which must not become `best`.
    values = [99.0, 10.0, 30.0, 30.0, 20.0]
    result = _fit(tmp_path / "a", values, select_initial=False)
    assert [row["step"] for row in result.history] == [0, 1, 3, 6, 7]
    best_value, best_step = -1.0, None
    for row in result.history[1:]:  # the reference's rule, over its validations
        if row["recall_at1"] > best_value:
            best_value, best_step = row["recall_at1"], row["step"]
    assert result.best["step"] == best_step == 3
    # fixes.select_initial_validation: the step-0 validation competes (and wins here).
    again = _fit(tmp_path / "b", values, select_initial=True)
    assert again.best["step"] == 0


def test_lincir_recipes_validate_and_select_as_train_phi() -> None:
    for name in ("lincir_large", "lincir_huge", "lincir_giga"):
        recipe = load_recipe(name)
        assert recipe.finetune.validate_every_steps == 1000
        assert recipe.finetune.validate_at_steps == [50]
        assert recipe.eval.selection_metric == "recall_at1"
        assert recipe.fixes.select_initial_validation is False


# --- AMP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_train_in_fp16_with_a_grad_scaler(name: str) -> None:
    recipe = load_recipe(name)
    stages = [recipe.finetune] + ([recipe.combiner] if name.startswith(("clip4", "blip4")) else [])
    cuda = torch.device("cuda")
    for cfg in stages:
        amp = stage_amp(recipe, cfg.amp)
        assert amp == "fp16", (name, amp)
        settings = TrainSettings(epochs=1, batch_size=1, seed=0, amp=amp)
        assert _amp(settings, cuda) == (True, torch.float16, True)  # autocast fp16 + scaler
        fixed = load_recipe(name, ["fixes.amp_auto=true"])
        assert stage_amp(fixed, cfg.amp) == "auto"


# --- CaLa HCA mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in PAPER_RECIPES if n.startswith("cala_")])
def test_cala_paper_recipes_have_no_hca_padding_mask(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.method.text_padding_mask is False
    if "clip" in name:
        assert recipe.method.compat_reshape is True  # CaLa's `.view` of the layer-4 map


def test_hca_without_mask_attends_to_padding() -> None:
    """With text_padding_mask = false the padded positions change HCA's output (CaLa's
    behaviour); with the mask they do not."""
    from cir_cli.modules.cala_heads import HingeCrossAttention

    torch.manual_seed(0)
    hca = HingeCrossAttention(16).eval()
    ref, tgt = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    text = torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    other = text.clone()
    other[0, 3:] = torch.randn(4, 16)  # change only row 0's padding
    with torch.no_grad():
        masked = hca(ref, text, tgt, mask), hca(ref, other, tgt, mask)
        unmasked = hca(ref, text, tgt, None), hca(ref, other, tgt, None)
    assert torch.allclose(masked[0], masked[1], atol=1e-6)
    assert not torch.allclose(unmasked[0][0], unmasked[1][0], atol=1e-3)
    assert torch.allclose(unmasked[0][1], unmasked[1][1], atol=1e-6)


# --- lincir_huge / lincir_giga: the checkpoints LinCIR loads -------------------------------------

# navervision/lincir models.py build_text_encoder: clip_model_dict.
LINCIR_CLIP_IDS = {
    "lincir_large": "openai/clip-vit-large-patch14",
    "lincir_huge": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "lincir_giga": "Geonmo/CLIP-Giga-config-fixed",
}


@pytest.mark.parametrize(("name", "hf_id"), LINCIR_CLIP_IDS.items())
def test_lincir_recipes_load_lincirs_hugging_face_checkpoints(name: str, hf_id: str) -> None:
    from cir_cli.backbones.hf_clip import ALIASES

    recipe = load_recipe(name)
    assert recipe.backbone.name == "hf_clip"
    assert recipe.backbone.arch == recipe.backbone.pretrained == hf_id
    assert ALIASES[{"lincir_large": "large", "lincir_huge": "huge"}.get(name, "giga")] == hf_id
    assert recipe.data.transform == "clip" and recipe.finetune.amp == "fp16"
    assert math.isclose(recipe.finetune.lr, 1e-4)


# --- `cir recipes show` prints the switches ----------------------------------------------------


def test_recipes_show_prints_every_switch_with_its_value() -> None:
    import tomllib

    from typer.testing import CliRunner

    from cir_cli.cli import app
    from cir_cli.config import FixesConfig

    runner = CliRunner()
    shown = runner.invoke(app, ["recipes", "show", "sprc_cirr", "--set", "fixes.amp_auto=true"])
    assert shown.exit_code == 0, shown.output
    assert "[fixes]" in shown.output
    fixes = tomllib.loads(shown.output)["fixes"]
    expected = {name: False for name in FixesConfig.model_fields}
    expected["amp_auto"] = True
    assert fixes == expected
    bad = runner.invoke(app, ["recipes", "show", "sprc_cirr", "--set", "fixes.amp_autoo=true"])
    assert bad.exit_code == 2 and "did you mean 'amp_auto'" in bad.output


# --- open_clip towers vs transformers' CLIP on the same weights ----------------------------------


def _open_clip_to_hf(state: dict[str, torch.Tensor], layers: int) -> tuple[dict, dict]:
    """open_clip ViT CLIP state dict -> (CLIPTextModelWithProjection, CLIPVisionModelWithProjection)
    state dicts: the key map of transformers' convert_clip_original_pytorch_to_hf, re-derived."""

    def blocks(src: str, dst: str, out: dict) -> None:
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            q, k, v = state[f"{s}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[f"{s}.attn.in_proj_bias"].chunk(3)
            for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[f"{d}.self_attn.{name}_proj.weight"] = w
                out[f"{d}.self_attn.{name}_proj.bias"] = b
            pairs = (
                ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
            )
            for a, b in pairs:
                out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
                out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]

    text = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
    }
    blocks("transformer", "text_model.encoder", text)
    vision = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
    }
    blocks("visual.transformer", "vision_model.encoder", vision)
    return text, vision


def test_open_clip_towers_equal_hf_clip_on_the_same_weights() -> None:
    """The open_clip path (previously lincir_huge / lincir_giga) and the transformers path LinCIR
    uses give the same image features, text features and pseudo-token queries on the same
    weights: a tiny ViT with the laion models' layout (GELU, class-token pool, ln_pre)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from cir_cli.backbones import build_backbone
    from cir_cli.backbones.hf_clip import HfClipBackbone
    from cir_cli.backbones.pseudo_tokens import encode_with_pseudo_tokens, tokenize_pieces
    from cir_cli.config import BackboneConfig

    torch.manual_seed(0)
    oc = build_backbone(BackboneConfig(name="open_clip", arch="cir-tiny", pretrained=None))
    state = oc.model.state_dict()
    # open_clip initialises the projections and a few vectors with zeros or tiny values; use
    # random weights everywhere so no term can hide.
    state = {k: torch.randn_like(v) * 0.2 if v.is_floating_point() else v for k, v in state.items()}
    oc.model.load_state_dict(state)
    text_sd, vision_sd = _open_clip_to_hf(state, layers=2)
    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="gelu", projection_dim=64)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=32, eos_token_id=2, **common)
    )
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=64, patch_size=8, **common))
    missing = text.load_state_dict(text_sd, strict=False)
    assert not missing.unexpected_keys and all("position_ids" in k for k in missing.missing_keys)
    missing = vision.load_state_dict(vision_sd, strict=False)
    assert not missing.unexpected_keys and all("position_ids" in k for k in missing.missing_keys)
    hf = HfClipBackbone(text.eval(), vision.eval(), "tiny", "converted")
    oc.eval()

    pixels = torch.randn(3, 3, 64, 64)
    texts = ["a red circle", "two small blue squares on the left", "x"]
    tokens = oc.tokenize(texts)
    assert torch.equal(tokens, hf.tokenize(texts))
    with torch.no_grad():
        image_oc, image_hf = oc.encode_image(pixels), hf.encode_image(pixels)
        text_oc, text_hf = oc.encode_text(tokens), hf.encode_text(tokens)
        ids, mask = tokenize_pieces(oc.tokenizer, [["a photo of ", " that is red"]] * 3)
        v = torch.randn(3, 64)
        query_oc = encode_with_pseudo_tokens(oc, ids, mask, v)
        query_hf = encode_with_pseudo_tokens(hf, ids, mask, v)
    for ours, theirs in ((image_oc, image_hf), (text_oc, text_hf), (query_oc, query_hf)):
        assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


# --- `best` selection metric of every paper recipe ---------------------------------------------

# The metric each reference's --save-best keeps (results_dict key compared with `>`):
# CLIP4Cir clip_fine_tune.py / combiner_train.py (FIQ average_recall; CIRR arithmetic_mean,
# also harmonic / geometric files), Bi-Blip4CIR (CIRR 'mean(R@5+R_s@1)'), SPRC
# blip_fine_tune_2.py (CIRR arithmetic_mean), CaLa blip_fine_tune.py (CIRR arithmetic_mean),
# LinCIR train_phi.py (cirr_recall_at1), Candidate-Reranking-CIR (both stages: CIRR
# mean(R@5+R_s@1) as blip_mean.pt, FIQ average_recall as blip.pt).
REFERENCE_SELECTION = {
    "clip4cir_fiq": "average_recall", "clip4cir_cirr": "arithmetic_mean",
    "blip4cir_fiq": "average_recall", "blip4cir_cirr": "mean_r5_rs1",
    "blip4cir_nobi_fiq": "average_recall", "blip4cir_nobi_cirr": "mean_r5_rs1",
    "sprc_cirr": "arithmetic_mean", "sprc_vitl_cirr": "arithmetic_mean",
    "sprc_fiq": "average_recall",
    "cala_blip2_cirr": "arithmetic_mean", "cala_blip2_artemis_cirr": "arithmetic_mean",
    "cala_clip_cirr": "arithmetic_mean", "cala_blip2_fiq": "average_recall",
    "cala_clip_fiq": "average_recall",
    "lincir_large": "recall_at1", "lincir_huge": "recall_at1", "lincir_giga": "recall_at1",
    "rerank_cirr": "mean_r5_rs1", "rerank_fiq": "average_recall",
    "rerank_sprc_cirr": "mean_r5_rs1",
}


def test_every_paper_recipe_selects_best_as_its_reference() -> None:
    from cir_cli.evaluation import selection_metric

    assert set(REFERENCE_SELECTION) == set(PAPER_RECIPES)
    for name, metric in REFERENCE_SELECTION.items():
        assert selection_metric(load_recipe(name)) == metric, name
