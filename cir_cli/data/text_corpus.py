"""Text-only training data for LinCIR (spec lincir_searle_circo.md 1.6): loading, cleaning, masking.

Sources (mixed, in the recipe's order): local files (`.txt` one text per line, `.jsonl` one
JSON object per line with a `text` column or one JSON string per line, `.csv` / `.parquet`
with a `text` column) and Hugging Face dataset ids (split `train`, needs the `datasets`
package; offline they must be in the local datasets cache).

Keyword masking (spec 1.6 step 2-3, with the quirks of spec 6.8 fixed):
1. Keyword phrases: with spaCy (`keywords = "spacy"`, or `"auto"` when spaCy and the pipeline
   `spacy_model` are installed), maximal runs of tokens tagged NOUN, PROPN, ADJ or DET joined with
   single spaces, as LinCIR. Without spaCy (`"heuristic"`, or `"auto"` when it is missing), the
   documented fallback: maximal runs of words that are not in a closed list of function words
   (prepositions, conjunctions, pronouns, auxiliaries, adverbs of degree) and do not look like
   verb forms (-ing / -ed endings, e.g. "sitting", "parked"); determiners may open a run. Both
   give e.g. "a dog sitting on the sofa" -> ["a dog", "the sofa"].
2. Each phrase found in the caption is replaced, at every whole-word occurrence (LinCIR used a
   raw substring replace that also hit inside words), by the marker `[$]`. If there is no
   phrase, or a phrase is not found in the caption, one word drawn with the sample's seeded
   random stream is replaced instead and the remaining phrases are skipped (LinCIR's fallback).
3. A caption whose placeholders are all cut by the context length is replaced by
   "a photo of [$]" and counted in `preproc_rate` (spec 1.6 step 4).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cir_cli.data.toy import COLOURS, POSITIONS, SHAPES, SIZES
from cir_cli.errors import CirError
from cir_cli.weights import missing_hint

MASK = "[$]"
FALLBACK_MASKED = "a photo of [$]"
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
SPACY_TAGS = frozenset({"NOUN", "PROPN", "ADJ", "DET"})

# Closed-class English words that end a keyword run in the heuristic fallback.
FUNCTION_WORDS = frozenset(
    [
        "about",
        "above",
        "across",
        "after",
        "against",
        "along",
        "amid",
        "among",
        "around",
        "as",
        "at",
        "before",
        "behind",
        "below",
        "beneath",
        "beside",
        "besides",
        "between",
        "beyond",
        "by",
        "despite",
        "down",
        "during",
        "except",
        "for",
        "from",
        "in",
        "inside",
        "into",
        "like",
        "near",
        "of",
        "off",
        "on",
        "onto",
        "opposite",
        "out",
        "outside",
        "over",
        "past",
        "per",
        "round",
        "since",
        "than",
        "through",
        "throughout",
        "till",
        "to",
        "toward",
        "towards",
        "under",
        "underneath",
        "unlike",
        "until",
        "up",
        "upon",
        "via",
        "with",
        "within",
        "without",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "yet",
        "if",
        "because",
        "while",
        "whereas",
        "although",
        "though",
        "unless",
        "whether",
        "then",
        "i",
        "me",
        "my",
        "mine",
        "myself",
        "you",
        "your",
        "yours",
        "yourself",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "her",
        "hers",
        "herself",
        "it",
        "its",
        "itself",
        "we",
        "us",
        "our",
        "ours",
        "ourselves",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "who",
        "whom",
        "whose",
        "which",
        "what",
        "that",
        "this",
        "these",
        "those",
        "there",
        "here",
        "where",
        "when",
        "why",
        "how",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "has",
        "have",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "will",
        "would",
        "shall",
        "should",
        "can",
        "could",
        "may",
        "might",
        "must",
        "not",
        "no",
        "very",
        "too",
        "also",
        "just",
        "only",
        "really",
        "quite",
        "rather",
        "almost",
        "even",
        "still",
        "again",
        "ever",
        "never",
    ]
)
DETERMINERS = frozenset(
    ["a", "an", "the", "some", "any", "each", "every", "another", "this", "that", "these", "those"]
)
_WORD = re.compile(r"[A-Za-z0-9'\-]+")


# ---------------------------------------------------------------------------------------- loading


def _read_txt(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CirError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            if isinstance(record, str):
                texts.append(record)
            elif isinstance(record, dict) and column in record:
                texts.append("" if record[column] is None else str(record[column]))
            else:
                raise CirError(
                    f"{path} line {n}: expected a JSON string or an object with a '{column}' key"
                )
    return texts


def _read_table(path: Path, column: str) -> list[str]:
    import pandas as pd

    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path, usecols=[column], keep_default_na=False)
        else:
            frame = pd.read_parquet(path, columns=[column])
    except ImportError as exc:
        raise CirError(
            f"{path}: reading parquet needs pyarrow or fastparquet ({exc}); "
            "pip install pyarrow, or convert the file to .jsonl/.csv/.txt"
        ) from None
    except ValueError as exc:
        raise CirError(f"{path}: no '{column}' column ({str(exc)[:120]})") from None
    except KeyError:
        raise CirError(f"{path}: no '{column}' column (method.text_column)") from None
    return ["" if v is None else str(v) for v in frame[column].tolist()]


def read_text_file(path: str | Path, column: str = "text") -> list[str]:
    """The texts of one local file (format by suffix, see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CirError(f"method.text_files: {path} not found{missing_hint(str(path))}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, column)
    if suffix in (".csv", ".parquet"):
        return _read_table(path, column)
    raise CirError(
        f"method.text_files: {path} has suffix '{path.suffix}'; expected one of "
        f"{', '.join(TEXT_SUFFIXES)}"
    )


def read_hf_dataset(name: str, column: str = "text", split: str = "train") -> list[str]:
    """One Hugging Face dataset's text column (the `datasets` package must be installed)."""
    try:
        import datasets
    except ImportError:
        raise CirError(
            f"method.hf_datasets: '{name}' needs the `datasets` package (pip install datasets), "
            "or export the text to a local .txt/.jsonl/.csv/.parquet file (method.text_files)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network / cache / format errors come as many types
        raise CirError(
            f"method.hf_datasets: cannot load '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    if column not in ds.column_names:
        raise CirError(
            f"method.hf_datasets: '{name}' has no '{column}' column ({', '.join(ds.column_names)})"
        )
    return ["" if v is None else str(v) for v in ds[column]]


def load_texts(
    files: Sequence[str],
    hf_datasets: Sequence[str] = (),
    column: str = "text",
    max_texts: int | None = None,
) -> list[str]:
    """All training texts of the recipe's sources, concatenated in order (then cut to max)."""
    if not files and not hf_datasets:
        raise CirError(
            "no training text: set method.text_files (local .txt/.jsonl/.csv/.parquet) and/or "
            "method.hf_datasets (Hugging Face ids, needs the `datasets` package)"
        )
    texts: list[str] = []
    for path in files:
        texts.extend(read_text_file(path, column))
    for name in hf_datasets:
        texts.extend(read_hf_dataset(name, column))
    if max_texts is not None:
        texts = texts[:max_texts]
    if not texts:
        raise CirError("the training text sources are empty")
    return texts


def corpus_digest(texts: Iterable[str]) -> str:
    """Content hash of a corpus (keys the cached caption features)."""
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- cleaning


def clean_caption(text: Any, tokenizer: Any = None, max_tokens: int = 75) -> str:
    """LinCIR's cleaning (spec 1.6 step 1): <PERSON> -> person, lower case, no `$`, strip.

    With a tokenizer, a caption longer than `max_tokens` BPE tokens is cut to the decode of its
    first `max_tokens` tokens.
    """
    text = "" if text is None else str(text)
    text = text.replace("<PERSON>", "person").lower().replace("$", "").strip()
    if tokenizer is not None and text:
        ids = tokenizer.encode(text)
        if len(ids) > max_tokens:
            text = tokenizer.decode(ids[:max_tokens]).strip()
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------- masking


def heuristic_keywords(caption: str) -> list[str]:
    """Noun-phrase-like runs without spaCy (the documented fallback of the module docstring)."""
    phrases: list[str] = []
    run: list[str] = []
    for raw in caption.split():
        word = raw.strip('.,;:!?"()[]{}')
        core = word.lower()
        is_det = core in DETERMINERS
        is_function = core in FUNCTION_WORDS and not is_det
        looks_verb = len(core) > 4 and (core.endswith("ing") or core.endswith("ed"))
        if not word or not _WORD.fullmatch(word) or is_function or looks_verb:
            if run:
                phrases.append(" ".join(run))
            run = []
            continue
        if is_det and run and run[-1].lower() not in DETERMINERS:
            # "the car the dog": a determiner opens a new phrase
            phrases.append(" ".join(run))
            run = []
        run.append(word)
        if raw != word and raw.rstrip('.,;:!?"()[]{}') != raw:  # punctuation ends a phrase
            phrases.append(" ".join(run))
            run = []
    if run:
        phrases.append(" ".join(run))
    # A lone determiner is no keyword (it would mask "a" everywhere).
    return [p for p in phrases if p.lower() not in DETERMINERS]


class KeywordExtractor:
    """Keyword phrases of captions with spaCy or the heuristic fallback (module docstring)."""

    def __init__(self, mode: str = "auto", spacy_model: str = "en_core_web_sm") -> None:
        self.nlp = None
        if mode not in ("auto", "spacy", "heuristic"):
            raise CirError(f"method.keywords = {mode!r}; expected auto, spacy or heuristic")
        if mode in ("auto", "spacy"):
            try:
                import spacy

                self.nlp = spacy.load(spacy_model, disable=["ner", "lemmatizer", "parser"])
            except (ImportError, OSError) as exc:
                if mode == "spacy":
                    raise CirError(
                        f"method.keywords = 'spacy' but spaCy pipeline '{spacy_model}' is not "
                        f"available ({type(exc).__name__}); install spacy and the pipeline, or "
                        "use keywords = 'heuristic'"
                    ) from None
        self.mode = "spacy" if self.nlp is not None else "heuristic"

    def __call__(self, captions: Sequence[str], batch_size: int = 1000) -> list[list[str]]:
        if self.nlp is None:
            return [heuristic_keywords(c) for c in captions]
        out = []
        for doc in self.nlp.pipe(captions, batch_size=batch_size):
            phrases, run = [], []
            for token in doc:
                if token.pos_ in SPACY_TAGS:
                    run.append(token.text)
                elif run:
                    phrases.append(" ".join(run))
                    run = []
            if run:
                phrases.append(" ".join(run))
            out.append(phrases)
        return out


def _replace_words(text: str, phrase: str) -> str:
    pattern = r"(?<![\w$\[])" + re.escape(phrase) + r"(?![\w\]])"
    return re.sub(pattern, MASK, text)


def _found(text: str, phrase: str) -> bool:
    return re.search(r"(?<![\w$\[])" + re.escape(phrase) + r"(?![\w\]])", text) is not None


def _mask_random_word(caption: str, masked: str, rng: random.Random) -> str:
    words = caption.split()
    if not words:
        return masked
    return _replace_words(masked, rng.choice(words))


def mask_caption(caption: str, phrases: Sequence[str], rng: random.Random) -> str:
    """Replace keyword phrases by `[$]` (spec 1.6 step 3, whole words only).

    A phrase found in the caption is masked everywhere; an empty keyword list, or a phrase not
    found (spaCy split "dog's"), masks one random word instead and stops (LinCIR's order).
    """
    masked = caption
    if not phrases:
        return _mask_random_word(caption, masked, rng)
    for phrase in phrases:
        if not phrase or not _found(caption, phrase):
            return _mask_random_word(caption, masked, rng)
        masked = _replace_words(masked, phrase)
    return masked


def masked_pieces(masked: str) -> list[str]:
    return masked.split(MASK)


# ----------------------------------------------------------------------------------- toy corpus


def toy_text_lines(n: int, seed: int = 0) -> list[str]:
    """Captions in the toy dataset's vocabulary (shapes, colours, sizes, positions).

    For the `toy_lincir` recipe: LinCIR trains Phi on text only, so its toy corpus describes
    toy-like scenes in words, e.g. "a small red circle in the top left corner".
    """
    rng = random.Random(f"cir-toy-lincir-text/{seed}")
    positions = list(POSITIONS.values())
    lines = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        size, pos = rng.choice(SIZES), rng.choice(positions)
        template = rng.choice(TOY_TEMPLATES)
        lines.append(template.format(shape=shape, colour=colour, size=size, pos=pos))
    return lines


TOY_TEMPLATES = (
    "a {size} {colour} {shape} in the {pos}",
    "a {colour} {shape} in the {pos}",
    "a {size} {shape} in the {pos}",
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "the {colour} {shape} is {size}",
    "a picture of a {size} {colour} {shape} in the {pos}",
    "a {shape} in the {pos} that is {colour}",
    "a {size} {shape} that is {colour} in the {pos}",
)
