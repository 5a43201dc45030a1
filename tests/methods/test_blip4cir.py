"""Bi-BLIP4CIR: direction prompts, the reversed losses, published layouts, both stages end to end.

Spec clip4cir_blip4cir.md 3.3 (prompts, stage I), 4.3 (stage II), 7 (checkpoint layouts).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cir_cli.backbones.blip import ARCHS, build_tokenizer
from cir_cli.checkpoints import save_seed_checkpoint
from cir_cli.data.base import Triplet
from cir_cli.errors import CirError
from cir_cli.methods.blip4cir import reversed_combiner_logits, reversed_sum_logits
from cir_cli.methods.prompts import compat_prepend, directed_text
from cir_cli.modules import Combiner
from cir_cli.recipes import load_recipe
from tests.conftest import bert_vocab_file

# --------------------------------------------------------------------------------------------
# Direction prompts (spec 3.3): the published strings, byte for byte, and their BERT ids

COMPAT_CASES = [
    # (raw caption, forward text, BERT-uncased ids with [CLS]/[SEP])
    (
        "is red and has long sleeves",
        " [FORWARD] is red and [FORWARD]  has long sleeves",
        [101, 1031, 2830, 1033, 2003, 2417, 1998, 1031, 2830, 1033, 2038, 2146, 15114, 102],
    ),
    (  # "and" inside a word
        "is a handbag",
        " [FORWARD] is a hand [FORWARD] bag",
        [101, 1031, 2830, 1033, 2003, 1037, 2192, 1031, 2830, 1033, 4524, 102],
    ),
    (  # no "and"
        "has no conjunction",
        " [FORWARD] has no conjunction",
        [101, 1031, 2830, 1033, 2038, 2053, 9595, 102],
    ),
    (  # several "and"s
        "red and blue and green",
        " [FORWARD] red and [FORWARD]  blue and [FORWARD]  green",
        [101, 1031, 2830, 1033, 2417, 1998, 1031, 2830, 1033, 2630, 1998, 1031, 2830, 1033, 2665]
        + [102],
    ),
    (  # inside words and as a word, in one caption
        "brand new and standing",
        " [FORWARD] brand [FORWARD]  new and [FORWARD]  stand [FORWARD] ing",
        [101, 1031, 2830, 1033, 4435, 1031, 2830, 1033, 2047, 1998, 1031, 2830, 1033, 3233]
        + [1031, 2830, 1033, 13749, 102],
    ),
    (  # the split is case-sensitive
        "And uppercase AND kept",
        " [FORWARD] And uppercase AND kept",
        [101, 1031, 2830, 1033, 1998, 3356, 18382, 1998, 2921, 102],
    ),
]

FIQ = Triplet("dress-0", "ref", "tgt", ("is red and shiny.", "has a handbag"))
FIQ_CASES = [
    # (policy, direction, mode, variant, text): markers go in before FashionIQ's join (spec 1.4)
    (
        "fiq_eval",
        "forward",
        "compat",
        None,
        "[forward] is red and [forward]  shiny and [FORWARD] has a hand [FORWARD] bag",
    ),
    (
        "fiq_random",
        "backward",
        "compat",
        1,
        "[backward] has a hand [backward] bag and [BACKWARD] is red and [BACKWARD]  shiny",
    ),
    ("fiq_random", "backward", "compat", 3, "[backward] has a hand [backward] bag"),
    ("fiq_eval", "forward", "token", None, "[FORWARD] Is red and shiny and has a handbag"),
    ("fiq_random", "backward", "token", 2, "[BACKWARD] Is red and shiny"),
    ("fiq_eval", "forward", "none", None, "Is red and shiny and has a handbag"),
]
FIQ_EVAL_IDS = [101, 1031, 2830, 1033, 2003, 2417, 1998, 1031, 2830, 1033, 12538, 1998, 1031]
FIQ_EVAL_IDS += [2830, 1033, 2038, 1037, 2192, 1031, 2830, 1033, 4524, 102]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return build_tokenizer(str(bert_vocab_file()), ARCHS["blip-base"])


@pytest.mark.parametrize(("raw", "forward", "_ids"), COMPAT_CASES)
def test_compat_prepend_strings(raw: str, forward: str, _ids: list[int]) -> None:
    assert compat_prepend(raw, "forward") == forward
    assert compat_prepend(raw, "backward") == forward.replace("[FORWARD]", "[BACKWARD]")
    single = Triplet("q", "r", "t", (raw,))
    assert directed_text(single, "verbatim", "forward", "compat") == forward


@pytest.mark.parametrize(("policy", "direction", "mode", "variant", "text"), FIQ_CASES)
def test_fashioniq_directed_texts(policy, direction, mode, variant, text) -> None:
    assert directed_text(FIQ, policy, direction, mode, variant) == text


def test_compat_ids_with_real_bert_vocab(bert_tokenizer) -> None:
    assert len(bert_tokenizer) == 30524
    assert bert_tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    for _, forward, ids in COMPAT_CASES:
        assert bert_tokenizer(forward)["input_ids"] == ids
    fiq = directed_text(FIQ, "fiq_eval", "forward", "compat")
    assert bert_tokenizer(fiq)["input_ids"] == FIQ_EVAL_IDS


def test_token_mode_adds_real_tokens(bert_tokenizer) -> None:
    from cir_cli.backbones.blip import BlipBackbone

    backbone = BlipBackbone.build("cir-tiny-blip", tokenizer=copy.deepcopy(bert_tokenizer))
    before = backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    backbone.add_special_tokens(("[FORWARD]", "[BACKWARD]"), {})
    tok = backbone.tokenizer
    assert len(tok) == 30526 and backbone.text_encoder.config.vocab_size == 30526
    ids = tok("[FORWARD] Is red and shiny [BACKWARD]")["input_ids"]
    assert ids == [101, 30524, 2003, 2417, 1998, 12538, 30525, 102]
    # New rows start at the mean of the compat pieces "[", "forward", "]".
    weight = backbone.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(weight[30524], before[[1031, 2830, 1033]].mean(0))
    assert torch.equal(weight[:30524], before)


# --------------------------------------------------------------------------------------------
# Reversed losses == the seeds' direct B x B x D computation (spec 3.3, 4.3)


def _direct_sum_logits(ref, targets_norm, backward, scale):
    """The seeds' stage I construction: B x B x D pair tensors, normalised, dot r̂_i."""
    b, n = ref.shape[0], targets_norm.shape[0]
    tij = targets_norm.unsqueeze(0).expand(b, n, -1)  # [i, j] = τ_j
    ui = backward.unsqueeze(1).expand(b, n, -1)  # [i, j] = u_i
    ri = F.normalize(ref, dim=-1).unsqueeze(1).expand(b, n, -1)
    return scale * (F.normalize(tij + ui, dim=-1) * ri).sum(-1)


def test_reversed_sum_loss_matches_direct() -> None:
    torch.manual_seed(0)
    ref = torch.randn(7, 16, dtype=torch.float64)
    tgt = F.normalize(torch.randn(9, 16, dtype=torch.float64), dim=-1)
    u1 = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    u2 = u1.detach().clone().requires_grad_(True)
    ours = reversed_sum_logits(ref, tgt, u1, 100.0)
    direct = _direct_sum_logits(ref, tgt, u2, 100.0)
    assert ours.shape == (7, 9)
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-10)
    labels = torch.arange(7)
    F.cross_entropy(ours, labels).backward()
    F.cross_entropy(direct, labels).backward()
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-9, atol=1e-12)
    # A zero pair norm (τ_j = -u_i) stays finite, like F.normalize's eps.
    zero = reversed_sum_logits(ref[:1], tgt[:1], -tgt[:1], 100.0)
    assert torch.isfinite(zero).all()


@pytest.mark.parametrize(("chunk", "checkpointed"), [(3, True), (64, False)])
def test_reversed_combiner_loss_matches_direct(monkeypatch, chunk: int, checkpointed: bool) -> None:
    from cir_cli.methods import blip4cir

    if checkpointed:  # the memory-bounded path real batch sizes take
        monkeypatch.setattr(blip4cir, "CHECKPOINT_PAIRS", 0)
    torch.manual_seed(0)
    combiner = Combiner(16, 24, 32, dropout=0.0).double()
    ref = torch.randn(7, 16, dtype=torch.float64)
    tgt = torch.randn(7, 16, dtype=torch.float64)
    back = torch.randn(7, 16, dtype=torch.float64)
    # Direct: the Combiner on the B x B grid of (T_j raw, u_i) pairs, as the seeds run it.
    grid_img = tgt.unsqueeze(0).expand(7, 7, -1)
    grid_txt = back.unsqueeze(1).expand(7, 7, -1)
    r_hat = F.normalize(ref, dim=-1).unsqueeze(1)
    for mode in ("eval", "train"):  # train: dropout layers active (p = 0), checkpointing
        getattr(combiner, mode)()
        combiner.zero_grad()
        direct = 100.0 * (combiner.combine_features(grid_img, grid_txt) * r_hat).sum(-1)
        F.cross_entropy(direct, torch.arange(7)).backward()
        expected = {n: p.grad.clone() for n, p in combiner.named_parameters()}
        combiner.zero_grad()
        ours = reversed_combiner_logits(combiner, ref, tgt, back, 100.0, chunk=chunk)
        torch.testing.assert_close(ours, direct, rtol=1e-9, atol=1e-9)
        F.cross_entropy(ours, torch.arange(7)).backward()
        for name, p in combiner.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Published layouts (spec 7)


@pytest.fixture(scope="module")
def tiny_model():
    from cir_cli.methods import build_method

    return build_method(load_recipe("toy_blip4cir")).eval()


def test_published_text_encoder_layout_loads_strictly(tiny_model, tmp_path: Path) -> None:
    module = tiny_model.backbone.text_module()
    state = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    # BB's files keep BLIP's persistent position_ids buffer and the optimizer state.
    state["text_encoder.embeddings.position_ids"] = torch.arange(80)[None]
    assert any(".crossattention." in k for k in state)
    path = tmp_path / "tuned_blip_best.pt"
    save_seed_checkpoint(path, "BLIPTextEncoder", state, epoch=3, optimizer_state_dict={"a": [1]})
    texts = tiny_model.forward_texts(["make it red and small"])
    before = tiny_model.encode_texts(texts).detach()
    tiny_model.load_checkpoint(str(path))
    got = tiny_model.backbone.text_module().state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if "position_ids" not in k)
    assert not torch.allclose(tiny_model.encode_texts(texts).detach(), before)

    wrong = dict(state)
    wrong["text_proj.wieght"] = wrong.pop("text_proj.weight")
    save_seed_checkpoint(path, "BLIPTextEncoder", wrong, epoch=3)
    with pytest.raises(CirError) as err:
        tiny_model.load_checkpoint(str(path))
    msg = str(err.value)
    assert "missing 1 key(s): text_proj.weight" in msg
    assert "unexpected 1 key(s): text_proj.wieght" in msg


def test_published_combiner_layout_loads_strictly(tiny_model, tmp_path: Path) -> None:
    reference = Combiner(64, 40, 48)
    path = tmp_path / "combiner.pt"
    save_seed_checkpoint(path, "Combiner", reference.state_dict(), epoch=9)
    tiny_model.combiner = None
    tiny_model.load_checkpoint(str(path))
    assert tiny_model.combiner is not None and tiny_model.combiner.projection_dim == 40
    reference.eval()
    x, t = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(
        tiny_model.compose(x, t), reference.combine_features(x, t), rtol=0, atol=0
    )
    # method.combining: "sum" keeps the element-wise sum even with a Combiner loaded.
    tiny_model.recipe.method.combining = "sum"
    try:
        torch.testing.assert_close(tiny_model.compose(x, t), F.normalize(x + t, dim=-1))
        assert tiny_model.describe()["combining"] == "sum"
    finally:
        tiny_model.recipe.method.combining = "auto"
    state = reference.state_dict()
    state["dynamic_scalar.2.weight"] = state.pop("dynamic_scalar.3.weight")
    save_seed_checkpoint(path, "Combiner", state, epoch=9)
    with pytest.raises(CirError, match=r"missing 1 key\(s\): dynamic_scalar.3.weight"):
        tiny_model.load_checkpoint(str(path))
    tiny_model.combiner = None
    bad = tmp_path / "other.pt"
    torch.save({"epoch": 1, "CLIP": {}}, bad)
    with pytest.raises(CirError, match="not a BLIP4CIR checkpoint"):
        tiny_model.load_checkpoint(str(bad))


def test_token_mode_refuses_compat_checkpoint(tiny_model, tmp_path: Path) -> None:
    from cir_cli.methods import build_method

    state = tiny_model.backbone.text_module().state_dict()
    path = tmp_path / "tuned_blip_mean.pt"
    save_seed_checkpoint(path, "BLIPTextEncoder", state, epoch=0)
    token_model = build_method(load_recipe("toy_blip4cir", ["method.prompts=token"]))
    with pytest.raises(CirError, match="prompts = 'token'"):
        token_model.load_checkpoint(str(path))


# --------------------------------------------------------------------------------------------
# Recipes and both stages end to end on tiny toy data


def test_recipes() -> None:
    weights = {
        "blip4cir_fiq": (0.4, 0.5),
        "blip4cir_cirr": (0.1, 0.1),
        "blip4cir_nobi_fiq": (0.0, 0.0),
        "blip4cir_nobi_cirr": (0.0, 0.0),
    }
    for name, (w1, w2) in weights.items():
        r = load_recipe(name)
        assert (r.method.finetune_reverse_weight, r.method.combiner_reverse_weight) == (w1, w2)
        assert r.method.prompts == "compat" and r.backbone.image_size == 384
        assert (r.finetune.lr, r.finetune.epochs, r.finetune.weight_decay) == (5e-5, 20, 0.05)
        ft = r.finetune
        assert (ft.scheduler, ft.schedule_epochs, ft.schedule_groups) == (
            "epoch_cosine",
            10,
            "first",
        )
        assert (r.combiner.epochs, r.combiner.lr, r.combiner.projection_dim) == (300, 2e-5, 2560)
        assert r.data.target_ratio == 1.25 and r.data.transform == "targetpad"
    assert load_recipe("blip4cir_fiq").combiner.batch_size == 512
    with pytest.raises(CirError, match="method.prompts = 'tokens' is not allowed"):
        load_recipe("toy_blip4cir", ["method.prompts=tokens"])


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cir_cli.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy_blip")
    generate_toy(root, "cirr", seed=0, n_train_triplets=96, n_val_queries=24, n_test_queries=8)
    return root


def _overrides(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"output.dir={tmp / 'runs'}",
        f"output.cache_dir={tmp / 'cache'}",
        "data.num_workers=0",
        "finetune.batch_size=16",
        "finetune.max_steps=3",
        "combiner.batch_size=16",
        "combiner.max_steps=3",
        "combiner.projection_dim=32",
        "combiner.hidden_dim=48",
        "method.reverse_chunk=5",
        *extra,
    ]


def test_two_stages_end_to_end(toy_root: Path, tmp_path: Path) -> None:
    from cir_cli.workflows import run_training, run_validation

    overrides = _overrides(toy_root, tmp_path)
    # 96 triplets / batch 48 = 2 steps per epoch: the per-step cosine (fixes.step_cosine) spans
    # steps 0-1, step 2 is clamped.
    schedule = [
        "finetune.batch_size=48",
        "finetune.warmup_steps=0",
        "finetune.schedule_epochs=1",
        "fixes.step_cosine=true",
    ]
    recipe = load_recipe("toy_blip4cir", [*overrides, *schedule])
    stage1 = run_training(recipe, "finetune")
    assert stage1.steps == 3
    state = torch.load(
        stage1.run_dir / "checkpoints" / "last" / "training_state.pt", weights_only=True
    )
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    assert lrs == [0.0, pytest.approx(3e-3)]  # clamped at min_lr; text_proj unscheduled
    steps = (stage1.run_dir / "metrics.csv").read_text()
    assert "recall_at1" in steps
    # The frozen image features were computed once, into the feature cache.
    assert any((tmp_path / "cache").glob("*/shard-*.npy"))

    recipe2 = load_recipe("toy_blip4cir", [*overrides, f"finetune.checkpoint={stage1.run_dir}"])
    stage2 = run_training(recipe2, "combiner")
    assert stage2.steps == 3
    meta = json.loads(
        (stage2.run_dir / "checkpoints" / "last" / "weights.safetensors.json").read_text()
    )
    assert meta["base_checkpoint"].startswith(str(stage1.run_dir))
    run = run_validation(recipe, checkpoint=str(stage2.run_dir))
    assert 0 <= run.metrics["recall_at1"] <= 100
    assert run.evaluation.splits[0].split.dataset == "cirr"


def test_finetune_task_texts_and_groups(toy_root: Path, tmp_path: Path) -> None:
    from cir_cli.methods import build_method

    recipe = load_recipe("toy_blip4cir", _overrides(toy_root, tmp_path))
    model = build_method(recipe)
    task = model.finetune_task(torch.device("cpu"))
    refs, tgts, forward, backward = task.gather([0, 1, 2])
    assert refs.shape == tgts.shape == (3, 64)
    assert all(f.startswith(" [FORWARD] ") for f in forward)
    assert [b.replace("[BACKWARD]", "[FORWARD]") for b in backward] == forward
    groups = task.param_groups()
    assert groups[1]["lr"] == pytest.approx(3 * groups[0]["lr"])
    assert len(groups) == 2 and recipe.finetune.schedule_groups == "first"
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for g in groups for p in g["params"]]
    assert all(n.startswith(("backbone.text_encoder.", "backbone.text_proj.")) for n in trained)
    assert not any(".crossattention." in n for n in trained)
    loss, parts = task.compute_loss(task.gather(list(range(8))))
    assert set(parts) == {"loss_forward", "loss_reversed"}
    assert loss.item() == pytest.approx(parts["loss_forward"] + 0.1 * parts["loss_reversed"], 1e-5)


@pytest.mark.parametrize("prompts", ["compat", "token"])
def test_fashioniq_training_draws(prompts: str) -> None:
    """compat draws the backward join independently (as the seeds); token shares the draw."""
    from types import SimpleNamespace

    from cir_cli.methods.blip4cir import _DirectedTask

    task = SimpleNamespace(
        split=SimpleNamespace(triplets=[FIQ] * 64),
        policy="fiq_random",
        seed=0,
        epoch=0,
        model=SimpleNamespace(
            prompts=prompts,
            direction_text=lambda t, policy, d, v: directed_text(t, policy, d, prompts, v),
        ),
    )
    draws = [_DirectedTask.variants(task, i) for i in range(64)]
    assert all(f in range(4) and b in range(4) for f, b in draws)
    same = sum(f == b for f, b in draws)
    assert same == 64 if prompts == "token" else same < 40
    task.variants = lambda i: _DirectedTask.variants(task, i)
    forward, backward = _DirectedTask.directed_pair(task, 0)
    assert forward == directed_text(FIQ, "fiq_random", "forward", prompts, draws[0][0])
    assert backward == directed_text(FIQ, "fiq_random", "backward", prompts, draws[0][1])
    task.epoch = 1  # a new draw every epoch, like the seeds' per-batch randomisation
    assert [_DirectedTask.variants(task, i) for i in range(64)] != draws
