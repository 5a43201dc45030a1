"""LinCIR: pseudo-token injection on both tower libraries, method contract, text data, training.

Spec lincir_searle_circo.md 1.4-1.7. Tiny random CLIPs only (open_clip `cir-tiny`, the HF
config `cir-tiny-hf` saved with save_pretrained and loaded back through the real code).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from cir_cli.backbones import build_backbone
from cir_cli.backbones.pseudo_tokens import (
    PLACEHOLDER_ID,
    check_placeholder_id,
    encode_with_pseudo_tokens,
    prompt_pieces,
    token_embedding_of,
    tokenize_pieces,
)
from cir_cli.config import BackboneConfig
from cir_cli.data import text_corpus
from cir_cli.errors import CirError
from cir_cli.recipes import load_recipe

PROMPT = "a photo of $ that {caption}"


@pytest.fixture(scope="module")
def open_clip_tiny():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="open_clip", arch="cir-tiny", pretrained=None))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel written with save_pretrained (the real on-disk layout)."""
    from transformers import CLIPConfig, CLIPModel

    from cir_cli.backbones.hf_clip import BUILTIN

    torch.manual_seed(0)
    config = CLIPConfig(**json.loads(BUILTIN["cir-tiny-hf"].read_text()))
    folder = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_tiny(hf_dir: Path):
    config = BackboneConfig(name="hf_clip", arch="cir-tiny-hf", pretrained=str(hf_dir))
    return build_backbone(config)


def _hand_set(backbone, vector: torch.Tensor, caption: str) -> torch.Tensor:
    """Encode the plain prompt with the `$` (259) embedding row set to `vector` by hand."""
    clone = copy.deepcopy(backbone)
    with torch.no_grad():
        token_embedding_of(clone).weight[PLACEHOLDER_ID] = vector
        return clone.encode_text(clone.tokenize([PROMPT.replace("{caption}", caption)]))


@pytest.mark.parametrize("which", ["open_clip_tiny", "hf_tiny"])
def test_fixed_vector_equals_hand_set_dollar_embedding(which: str, request) -> None:
    # float64: batched and single forwards reduce in different orders; in float32 the
    # difference depends on the CPU's kernels, in float64 it is far below the tolerance.
    backbone = copy.deepcopy(request.getfixturevalue(which)).double()
    assert check_placeholder_id(backbone.tokenizer) == 259
    captions = ["is red and bigger", "shows two dogs on a beach"]
    width = token_embedding_of(backbone).embedding_dim
    torch.manual_seed(1)
    vectors = torch.randn(2, width, dtype=torch.float64)
    ids, mask = tokenize_pieces(backbone.tokenizer, [prompt_pieces(PROMPT, c) for c in captions])
    assert torch.equal(ids, backbone.tokenize([PROMPT.replace("{caption}", c) for c in captions]))
    assert mask.sum(dim=1).tolist() == [1, 1]
    with torch.no_grad():
        batch = encode_with_pseudo_tokens(backbone, ids, mask, vectors)
        for row, caption in enumerate(captions):
            by_hand = _hand_set(backbone, vectors[row], caption)
            torch.testing.assert_close(batch[row : row + 1], by_hand, rtol=1e-9, atol=1e-10)
            single = encode_with_pseudo_tokens(backbone, ids[row : row + 1], mask[row : row + 1],
                                               vectors[row : row + 1])
            torch.testing.assert_close(batch[row : row + 1], single, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("which", ["open_clip_tiny", "hf_tiny"])
def test_injecting_a_word_embedding_reproduces_the_plain_prompt(which: str, request) -> None:
    """Every occurrence is replaced; causal mask and EOT pooling are the tower's own."""
    backbone = copy.deepcopy(request.getfixturevalue(which)).double()  # float64, as above
    word_id = backbone.tokenizer.encode("dog")[0]
    vector = token_embedding_of(backbone).weight[word_id].detach().clone()
    pieces = [["a photo of ", " next to a ", " on the grass"]]  # two placeholders
    ids, mask = tokenize_pieces(backbone.tokenizer, pieces)
    with torch.no_grad():
        injected = encode_with_pseudo_tokens(backbone, ids, mask, vector[None])
        text = "a photo of dog next to a dog on the grass"
        plain = backbone.encode_text(backbone.tokenize([text]))
    torch.testing.assert_close(injected, plain, rtol=1e-9, atol=1e-10)


def test_a_literal_dollar_in_the_caption_is_not_a_placeholder(open_clip_tiny) -> None:
    ids, mask = tokenize_pieces(open_clip_tiny.tokenizer, [prompt_pieces(PROMPT, "costs $ 5")])
    assert (ids[0] == PLACEHOLDER_ID).sum() == 2 and mask[0].sum() == 1


def test_truncation_keeps_eot_and_drops_cut_placeholders(open_clip_tiny) -> None:
    long = " ".join(["word"] * 60)
    ids, mask = tokenize_pieces(open_clip_tiny.tokenizer, [[long, ""]])
    assert ids.shape[1] == 32 and ids[0, -1] == open_clip_tiny.tokenizer.eot_token_id
    assert not mask.any()


def test_hf_folder_missing_weights_is_one_line_error(tmp_path: Path, hf_dir: Path) -> None:
    with pytest.raises(CirError, match="no config.json"):
        build_backbone(BackboneConfig(name="hf_clip", arch="x", pretrained=str(tmp_path)))


# ------------------------------------------------------------------------------- method level


def _recipe(tmp_path: Path, **overrides: object):
    items = [
        'backbone.name="open_clip"', 'backbone.arch="cir-tiny"', 'backbone.pretrained=""',
        f'output.dir="{tmp_path / "runs"}"', f'data.root="{tmp_path / "none"}"',
        "data.num_workers=0",
    ]
    items += [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in overrides.items()]
    return load_recipe("toy_lincir", items)


def test_queries_average_both_fashioniq_orders(tmp_path: Path) -> None:
    from cir_cli.methods import build_method

    torch.manual_seed(0)
    model = build_method(_recipe(tmp_path)).eval()
    ref = torch.randn(2, model.backbone.feature_dim)
    with torch.no_grad():
        both = model.queries_from_representation(ref, [("is red.", "has sleeves "), "plain"])
        a = model.queries_from_representation(ref[:1], ["is red and has sleeves"])
        b = model.queries_from_representation(ref[:1], ["has sleeves and is red"])
        single = model.queries_from_representation(ref[1:], ["plain"])
    expected = torch.nn.functional.normalize(a + b, dim=-1)
    # The method computes in float32 (differences seen: <= 3e-8 on unit vectors): the
    # tolerance below (2e-6 on entries of ~0.12) leaves a margin of ~70x.
    torch.testing.assert_close(both[:1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1:], single, rtol=1e-5, atol=1e-6)
    assert torch.allclose(both.norm(dim=-1), torch.ones(2))


def test_published_phi_loads_into_the_method(tmp_path: Path) -> None:
    from cir_cli.methods import build_method
    from cir_cli.modules import Phi

    model = build_method(_recipe(tmp_path)).eval()
    published = Phi(64, 256, 64)
    torch.save({"epoch": 1, "Phi": published.state_dict()}, tmp_path / "phi.pt")
    model.load_checkpoint(str(tmp_path / "phi.pt"))
    x = torch.randn(3, 64)
    torch.testing.assert_close(model.phi.eval()(x), published.eval()(x))
    torch.save({"epoch": 1, "Phi": Phi(32, 128, 64).state_dict()}, tmp_path / "wrong.pt")
    with pytest.raises(CirError, match="wrong backbone"):
        model.load_checkpoint(str(tmp_path / "wrong.pt"))
    model.export_phi(tmp_path / "again.pt")
    assert torch.equal(Phi.from_checkpoint(tmp_path / "again.pt").eval()(x), model.phi(x))


def test_prompt_without_placeholder_is_rejected(tmp_path: Path) -> None:
    from cir_cli.methods import build_method

    with pytest.raises(CirError, match="no '\\$' placeholder"):
        build_method(_recipe(tmp_path, method__prompt="a photo that {caption}"))


# --------------------------------------------------------------------------------- text data


def test_heuristic_keywords_and_masking() -> None:
    caption = "a dog sitting on the sofa"
    phrases = text_corpus.heuristic_keywords(caption)
    assert phrases == ["a dog", "the sofa"]
    assert text_corpus.mask_caption(caption, phrases, random.Random(0)) == "[$] sitting on [$]"
    # whole words only: "a" must not hit inside "cat" (LinCIR's substring bug, spec 6.8)
    assert text_corpus.mask_caption("a cat", ["a"], random.Random(0)) == "[$] cat"
    # a phrase not in the caption -> one random word, then stop (LinCIR's fallback order)
    masked = text_corpus.mask_caption("red car", ["dog's"], random.Random(0))
    assert masked.count("[$]") == 1


def test_clean_caption_follows_lincir() -> None:
    assert text_corpus.clean_caption("  <PERSON> pays $5 ") == "person pays 5"
    assert text_corpus.clean_caption(None) == ""


def test_local_text_files_of_every_format(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n"four"\n')
    (tmp_path / "c.csv").write_text("id,text\n1,five\n")
    texts = text_corpus.load_texts([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.csv")])
    assert texts == ["one", "two", "three", "four", "five"]
    with pytest.raises(CirError, match="no training text"):
        text_corpus.load_texts([])
    with pytest.raises(CirError, match="suffix"):
        (tmp_path / "d.xml").write_text("x")
        text_corpus.load_texts([str(tmp_path / "d.xml")])


def test_parquet_and_hf_datasets_need_their_packages(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    try:
        import pyarrow  # noqa: F401

        pd.DataFrame({"text": ["six"]}).to_parquet(tmp_path / "e.parquet")
        assert text_corpus.load_texts([str(tmp_path / "e.parquet")]) == ["six"]
    except ImportError:
        (tmp_path / "e.parquet").write_bytes(b"PAR1")
        with pytest.raises(CirError, match="pyarrow"):
            text_corpus.load_texts([str(tmp_path / "e.parquet")])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CirError, match="needs the `datasets` package"):
            text_corpus.load_texts([], ["dangne/gcc_caption_only"])
