"""Every weight file a recipe needs: where the authors publish it, how to verify it, whether it
is here, and the `--set` line that uses it (`cir weights list|check|get`, `--dry-run`).

`WEIGHTS` is data: one row per published file (URL and hashes exactly as the authors' READMEs /
configs give them, `/work/shared/seeds` and the specs). What a recipe needs comes from its own
keys (backbone.pretrained, backbone.tokenizer, backbone.vision_pretrained, finetune.checkpoint,
method.text_files); a row is matched to a key by file name, hub id or open_clip tag, and the
rows listing the recipe under `recipes` add its published checkpoints.

Standard library only at import time (`cir weights check` answers in well under 2 s);
huggingface_hub is imported to look into its cache or to download.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir_cli.errors import CirError

# Where published checkpoints are looked for and `cir weights get --dir` puts them by default.
WEIGHTS_DIR_ENV = "CIR_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "models"

_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
_BB = "Cuberick-Orion/Bi-Blip4CIR README, 'Checkpoints' table"
_SPRC = "chunmeifeng/SPRC README, 'Checkpoints'"
_C4C_DRIVE = "https://drive.google.com/drive/folders/1ny2hhzP8HZBnXhjvDEni8P8G4_inCNTv?usp=sharing"
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class WeightFile:
    """One published file (or hub repository)."""

    id: str
    what: str
    # How a recipe uses it: a recipe key (`backbone.pretrained`, ...) or `--checkpoint`.
    use: str
    # Path under the weights folder (`models/` or $CIR_WEIGHTS_DIR) for files fetched by hand.
    local: str | None = None
    url: str | None = None
    # Where the URL / hash is published.
    published_in: str = ""
    sha1: str | None = None
    sha256: str | None = None
    size: int | None = None
    # Hugging Face hub: repo id and the files to fetch (empty: the whole repo, a model folder).
    hub: str | None = None
    hub_files: tuple[str, ...] = ()
    # open_clip (arch, tag) this row describes (its weights come from the hub or the URL).
    open_clip: tuple[str, str] | None = None
    # Recipes (fnmatch patterns) that list it as a published checkpoint.
    recipes: tuple[str, ...] = ()
    # A command that makes the file here (toy data), instead of a download.
    make: str | None = None
    note: str = ""
    # The published archive (a row's `local`) this file comes in: no hash of its own; unzip
    # the archive into the weights folder.
    in_archive: str | None = None

    @property
    def hub_ref(self) -> str | None:
        """`hf://org/repo/file` for a one-file hub row (what --checkpoint accepts)."""
        if self.hub and len(self.hub_files) == 1:
            return f"hf://{self.hub}/{self.hub_files[0]}"
        return None


_RR = "Cuberick-Orion/Candidate-Reranking-CIR DOWNLOAD.md"
_RR_URL = "https://1drv.ms/u/s!AgLqyV5O53gxuMoaukdjb9FA46bymQ?e=XQKUbh"
_RR_ZIP = "candidate_rerank_ckpts.zip"


def _rr_file(local: str, use: str, size: int, what: str, recipes: tuple[str, ...]) -> WeightFile:
    """A file inside the re-ranking zip: the zip listing's size, no published hash."""
    return WeightFile(
        "rerank/" + local,
        "Candidate re-ranking " + what,
        use,
        local=local,
        url=_RR_URL,
        published_in=_RR + " (the zip's listing)",
        size=size,
        recipes=recipes,
        in_archive=_RR_ZIP,
    )


WEIGHTS: tuple[WeightFile, ...] = (
    # --- BLIP4CIR (Bi-BLIP4CIR) ---------------------------------------------------------------
    WeightFile(
        "blip/model_base.pth",
        "BLIP ViT-B/16 pre-trained checkpoint (image tower + BERT text encoder)",
        "backbone.pretrained",
        local="model_base.pth",
        url="https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base.pth",
        published_in=_BB + " ('BLIP pre-trained checkpoint', SHA1)",
        sha1="5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50",
    ),
    WeightFile(
        "bert-base-uncased",
        "BERT uncased WordPiece vocabulary (BLIP / BLIP-2 tokenizer)",
        "backbone.tokenizer",
        hub="bert-base-uncased",
        hub_files=("vocab.txt",),
        url="https://huggingface.co/bert-base-uncased/blob/main/vocab.txt",
        published_in="Hugging Face hub (LAVIS / BLIP load it by this id)",
    ),
    WeightFile(
        "blip4cir/fiq/tuned_blip_best.pt",
        "Bi-BLIP4CIR FashionIQ stage I (BLIP text encoder)",
        "finetune.checkpoint",
        local="blip4cir/fiq/tuned_blip_best.pt",
        url="https://1drv.ms/u/s!AgLqyV5O53gxt8oo0AF4kSHKWmJgtg?e=c793Sg",
        published_in=_BB,
        sha1="80f0db536f588253fca416af83cb50fab709edda",
        recipes=("blip4cir_fiq",),
    ),
    WeightFile(
        "blip4cir/fiq/combiner.pt",
        "Bi-BLIP4CIR FashionIQ stage II Combiner",
        "--checkpoint",
        local="blip4cir/fiq/combiner.pt",
        url="https://1drv.ms/u/s!AgLqyV5O53gxt8onMBM4dP_yezpcNQ?e=jTu9Gu",
        published_in=_BB,
        sha1="4a1ba45bf52033c245c420b30873f68bc8e60732",
        recipes=("blip4cir_fiq",),
    ),
    WeightFile(
        "blip4cir/cirr/tuned_blip_mean.pt",
        "Bi-BLIP4CIR CIRR stage I (BLIP text encoder, best (R@5+Rs@1)/2)",
        "finetune.checkpoint",
        local="blip4cir/cirr/tuned_blip_mean.pt",
        url="https://1drv.ms/u/s!AgLqyV5O53gxt8orEuV7r87WkyU5Jg?e=Up9aGw",
        published_in=_BB,
        sha1="67dca8a1905802cfd4cd02f640abb0579f1f88fd",
        recipes=("blip4cir_cirr",),
    ),
    WeightFile(
        "blip4cir/cirr/combiner_mean.pt",
        "Bi-BLIP4CIR CIRR stage II Combiner (best (R@5+Rs@1)/2)",
        "--checkpoint",
        local="blip4cir/cirr/combiner_mean.pt",
        url="https://1drv.ms/u/s!AgLqyV5O53gxt8oqSfGkANa0U-pW-A?e=ohCgln",
        published_in=_BB,
        sha1="327703361117400de83936674d5c3032af37bd7a",
        recipes=("blip4cir_cirr",),
    ),
    # --- Candidate re-ranking (Liu et al., TMLR'24) ------------------------------------------
    # One published zip (its SHA1 is in DOWNLOAD.md); the files inside have no published hash,
    # so they are checked by the byte sizes of the zip's listing (spec reranking.md 8).
    WeightFile(
        _RR_ZIP,
        "Candidate re-ranking archive: stage I + stage II checkpoints and top-200 files, CIRR "
        "and FashionIQ (unzips to stage1/ and stage2/ in the weights folder)",
        "archive",
        local=_RR_ZIP,
        url=_RR_URL,
        published_in=_RR + " (7.637 GiB, sha1sum)",
        sha1="a5e29b35ceae4fcb3782b8fd9228121090ddef64",
        recipes=("rerank_cirr", "rerank_fiq", "rerank_sprc_cirr"),
    ),
    _rr_file(
        "stage1/CIRR/saved_models/blip_mean.pt",
        "finetune.checkpoint",
        1_995_000_835,
        "CIRR stage I ({'BLIP_Retrieval': ...}, best (R@5+Rs@1)/2)",
        ("rerank_cirr", "rerank_sprc_cirr"),
    ),
    _rr_file(
        "stage2/CIRR/saved_models/blip_mean.pt",
        "--checkpoint",
        2_772_083_982,
        "CIRR stage II dual encoder ({'BLIP_NLVR': ...}, best (R@5+Rs@1)/2)",
        ("rerank_cirr", "rerank_sprc_cirr"),
    ),
    _rr_file(
        "stage1/CIRR/cirr_top_200_val.pt",
        "rerank.candidates",
        59_948_455,
        "CIRR val stage-I top-200 names (or pass the folder stage1/CIRR)",
        ("rerank_cirr",),
    ),
    _rr_file(
        "stage1/CIRR/cirr_top_200_test1.pt",
        "rerank.candidates",
        56_473_007,
        "CIRR test1 stage-I top-200 names (`cir submit cirr`; or the folder stage1/CIRR)",
        ("rerank_cirr",),
    ),
    _rr_file(
        "stage1/fashionIQ/saved_models/blip.pt",
        "finetune.checkpoint",
        1_995_000_835,
        "FashionIQ stage I ({'BLIP_Retrieval': ...}, best average recall)",
        ("rerank_fiq",),
    ),
    _rr_file(
        "stage2/fashionIQ/saved_models/blip.pt",
        "--checkpoint",
        2_772_082_830,
        "FashionIQ stage II dual encoder ({'BLIP_NLVR': ...})",
        ("rerank_fiq",),
    ),
    *(
        _rr_file(
            f"stage1/fashionIQ/fiq_top_200_val_{cat}.pt",
            "rerank.candidates",
            size,
            f"FashionIQ val {cat} stage-I top-200 names (pass the folder "
            "stage1/fashionIQ: one file per category)",
            ("rerank_fiq",),
        )
        for cat, size in (("dress", 23_952_043), ("shirt", 29_405_291), ("toptee", 26_371_563))
    ),
    # --- CLIP4Cir -----------------------------------------------------------------------------
    WeightFile(
        "clip4cir/fiq/tuned_clip_best.pt",
        "CLIP4Cir FashionIQ fine-tuned RN50x4 CLIP ({'CLIP': state_dict})",
        "finetune.checkpoint",
        local="clip4cir/fiq/tuned_clip_best.pt",
        url=_C4C_DRIVE,
        published_in="ABaldrati/CLIP4Cir README, 'Pre-trained models' (a Drive folder, no hashes)",
        recipes=("clip4cir_fiq",),
        note="name as CLIP4Cir saves it; the Drive folder's file names may differ",
    ),
    WeightFile(
        "clip4cir/fiq/combiner.pt",
        "CLIP4Cir FashionIQ Combiner ({'Combiner': state_dict})",
        "--checkpoint",
        local="clip4cir/fiq/combiner.pt",
        url=_C4C_DRIVE,
        published_in="ABaldrati/CLIP4Cir README, 'Pre-trained models' (a Drive folder, no hashes)",
        recipes=("clip4cir_fiq",),
        note="name as CLIP4Cir saves it; the Drive folder's file names may differ",
    ),
    WeightFile(
        "clip4cir/cirr/tuned_clip_arithmetic.pt",
        "CLIP4Cir CIRR fine-tuned RN50x4 CLIP ({'CLIP': state_dict})",
        "finetune.checkpoint",
        local="clip4cir/cirr/tuned_clip_arithmetic.pt",
        url=_C4C_DRIVE,
        published_in="ABaldrati/CLIP4Cir README, 'Pre-trained models' (a Drive folder, no hashes)",
        recipes=("clip4cir_cirr",),
        note="name as CLIP4Cir saves it; the Drive folder's file names may differ",
    ),
    WeightFile(
        "clip4cir/cirr/combiner_arithmetic.pt",
        "CLIP4Cir CIRR Combiner ({'Combiner': state_dict})",
        "--checkpoint",
        local="clip4cir/cirr/combiner_arithmetic.pt",
        url=_C4C_DRIVE,
        published_in="ABaldrati/CLIP4Cir README, 'Pre-trained models' (a Drive folder, no hashes)",
        recipes=("clip4cir_cirr",),
        note="name as CLIP4Cir saves it; the Drive folder's file names may differ",
    ),
    # --- open_clip / transformers CLIP towers -------------------------------------------------
    WeightFile(
        "open_clip/RN50x4/openai",
        "OpenAI CLIP RN50x4 (open_clip tag 'openai')",
        "backbone.pretrained",
        url=f"{_OPENAI}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
        published_in="OpenAI CLIP / open_clip pretrained table (SHA-256 in the URL)",
        sha256="7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
        hub="timm/resnet50x4_clip.openai",
        hub_files=_OPEN_CLIP_FILES,
        open_clip=("RN50x4", "openai"),
    ),
    WeightFile(
        "open_clip/ViT-L-14/openai",
        "OpenAI CLIP ViT-L/14 (open_clip tag 'openai'; BLIP-2 ViT-L's vision tower as 'openai')",
        "backbone.vision_pretrained",
        url=f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        published_in="OpenAI CLIP / open_clip pretrained table (SHA-256 in the URL)",
        sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        hub="timm/vit_large_patch14_clip_224.openai",
        hub_files=_OPEN_CLIP_FILES,
        open_clip=("ViT-L-14", "openai"),
    ),
    WeightFile(
        "open_clip/ViT-H-14/laion2b_s32b_b79k",
        "LAION CLIP ViT-H/14 (LinCIR huge)",
        "backbone.pretrained",
        url="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        published_in="open_clip pretrained table",
        hub="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        hub_files=_OPEN_CLIP_FILES,
        open_clip=("ViT-H-14", "laion2b_s32b_b79k"),
    ),
    WeightFile(
        "open_clip/ViT-bigG-14/laion2b_s39b_b160k",
        "LAION CLIP ViT-bigG/14 (LinCIR giga)",
        "backbone.pretrained",
        url="https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
        published_in="open_clip pretrained table",
        hub="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
        hub_files=_OPEN_CLIP_FILES,
        open_clip=("ViT-bigG-14", "laion2b_s39b_b160k"),
    ),
    WeightFile(
        "openai/clip-vit-large-patch14",
        "OpenAI CLIP ViT-L/14, transformers layout (LinCIR large)",
        "backbone.pretrained",
        url="https://huggingface.co/openai/clip-vit-large-patch14",
        published_in="navervision/lincir (loads it by this hub id)",
        hub="openai/clip-vit-large-patch14",
    ),
    # --- BLIP-2 (SPRC, CaLa) ------------------------------------------------------------------
    WeightFile(
        "Salesforce/blip2-itm-vit-g",
        "BLIP-2 ViT-g Q-Former + EVA ViT-g, transformers conversion of blip2_pretrained.pth",
        "backbone.pretrained",
        url="https://huggingface.co/Salesforce/blip2-itm-vit-g",
        published_in="Hugging Face hub (spec sprc_cala.md 4.3)",
        hub="Salesforce/blip2-itm-vit-g",
    ),
    WeightFile(
        "lavis/blip2_pretrained.pth",
        "LAVIS BLIP-2 ViT-g stage-1 checkpoint (Q-Former; no ViT)",
        "backbone.pretrained",
        local="blip2_pretrained.pth",
        url=f"{_LAVIS}/blip2_pretrained.pth",
        published_in="LAVIS config blip2_pretrain.yaml (as vendored by SPRC)",
        note="with backbone.vision_pretrained = eva_vit_g.pth instead of the hub conversion",
    ),
    WeightFile(
        "lavis/eva_vit_g.pth",
        "EVA ViT-g/14 (BLIP-2's frozen image tower)",
        "backbone.vision_pretrained",
        local="eva_vit_g.pth",
        url=f"{_LAVIS}/eva_vit_g.pth",
        published_in="LAVIS eva_vit.py (as vendored by SPRC)",
    ),
    WeightFile(
        "lavis/blip2_pretrained_vitL.pth",
        "LAVIS BLIP-2 ViT-L stage-1 checkpoint (Q-Former; no ViT)",
        "backbone.pretrained",
        local="blip2_pretrained_vitL.pth",
        url=f"{_LAVIS}/blip2_pretrained_vitL.pth",
        published_in="LAVIS config blip2_pretrain_vitL.yaml (as vendored by SPRC)",
    ),
    WeightFile(
        "lavis/clip_vit_L.pth",
        "CLIP ViT-L/14 in LAVIS's layout (BLIP-2 ViT-L's frozen image tower)",
        "backbone.vision_pretrained",
        local="clip_vit_L.pth",
        url=f"{_LAVIS}/clip_vit_L.pth",
        published_in="LAVIS clip_vit.py (as vendored by SPRC)",
    ),
    WeightFile(
        "sprc/sprc_cirr.pt",
        "SPRC CIRR model ({'Blip2QformerCirAlignPrompt': state_dict}, ViT included)",
        "--checkpoint",
        local="sprc/sprc_cirr.pt",
        url="https://1drv.ms/u/s!Aj0q22vyiZbabxR_hjpQ_DmYX3s?e=k9fmt1",
        published_in=_SPRC + " (also BaiduCloud 18196NRV0Cdbn5uPc3LIgwg, password t1at)",
        recipes=("sprc_cirr",),
    ),
    WeightFile(
        "sprc/sprc_fiq.pt",
        "SPRC FashionIQ model ({'Blip2QformerCirAlignPrompt': state_dict}, ViT included)",
        "--checkpoint",
        local="sprc/sprc_fiq.pt",
        url="https://1drv.ms/u/s!Aj0q22vyiZbabnUya4mnufIBtYI?e=n4ZVKj",
        published_in=_SPRC + " (also BaiduCloud 18196NRV0Cdbn5uPc3LIgwg, password t1at)",
        recipes=("sprc_fiq",),
    ),
    WeightFile(
        "sprc/sprc_cirr_vitl.pt",
        "SPRC CIRR model with the BLIP-2 ViT-L first stage",
        "--checkpoint",
        local="sprc/sprc_cirr_vitl.pt",
        url="https://drive.google.com/file/d/1217sOHWtvBG3Roq2AoNvVDH6eCfmYBRs/view?usp=sharing",
        published_in=_SPRC + " ('models based on vit-l')",
        recipes=("sprc_vitl_cirr",),
    ),
    # --- LinCIR -------------------------------------------------------------------------------
    WeightFile(
        "lincir/lincir_large.pt",
        "LinCIR Phi for CLIP ViT-L/14 (the authors' public checkpoint)",
        "--checkpoint",
        url="https://huggingface.co/navervision/zeroshot-cir-models/blob/main/lincir_large.pt",
        published_in="navervision/lincir README ('Model file is here'); size and SHA-256 as "
        "reported for hub revision 5118df4 (spec lincir_searle_circo.md 1.1)",
        sha256="5ba98d52db7a5e9a78f9ba7436991235477b89544caf246e4659642bf9b409bd",
        size=56_653_151,
        hub="navervision/zeroshot-cir-models",
        hub_files=("lincir_large.pt",),
        recipes=("lincir_large",),
    ),
    # --- toy files made locally ---------------------------------------------------------------
    WeightFile(
        "toy/tiny_clip.safetensors",
        "tiny aligned CLIP of the LinCIR toy",
        "backbone.pretrained",
        local="tiny_clip.safetensors",
        make="cir prepare toy-lincir --root data/toy",
    ),
    WeightFile(
        "toy/texts.txt",
        "LinCIR toy training texts",
        "method.text_files",
        local="texts.txt",
        make="cir prepare toy-lincir --root data/toy",
    ),
)

# Tokenizer used when backbone.tokenizer is unset, per architecture (None: built in).
DEFAULT_TOKENIZER: dict[str, str | None] = {
    "blip-base": "bert-base-uncased",
    "blip2-vit-g": "bert-base-uncased",
    "blip2-vit-l": "bert-base-uncased",
}
# Architectures that are random-initialised toys (no weights needed).
TINY_ARCHS = ("cir-tiny", "cir-tiny-blip", "cir-tiny-hf", "blip2-tiny", "blip2-tiny-vitl")


def weights_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override or os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR).expanduser()


# --------------------------------------------------------------------------------------------
# hf:// references


def parse_hf_ref(ref: str) -> tuple[str, str, str | None]:
    """`hf://org/repo/path/in/repo[@revision]` -> (repo id, filename, revision)."""
    body = ref.removeprefix("hf://")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise CirError(
            f"{ref}: expected hf://org/repo/file "
            "(e.g. hf://navervision/zeroshot-cir-models/lincir_large.pt)"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def fetch_hf(ref: str) -> Path:
    """The local path of an `hf://` file: the hub cache, downloaded when online."""
    repo, filename, revision = parse_hf_ref(ref)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # offline / missing repo / network errors come as many types
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: run `cir weights get` where the hub is reachable)"
        raise CirError(
            f"{ref}: not in the local hub cache and could not be downloaded "
            f"({type(exc).__name__}){hint if offline else ''}"
        ) from None


def hub_cached(repo: str, filename: str, revision: str | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------------------------
# Hashes (cached by path, size and mtime: a 2 GB file is read once)


def _hash_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cir" / "file_hashes.json"


def file_hash(path: Path, algorithm: str) -> str:
    path = path.resolve()
    stat = path.stat()
    key = f"{algorithm}:{path}"
    cache_file = _hash_cache_path()
    cache: dict[str, Any] = {}
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    known = cache.get(key)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        return known[2]
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    cache[key] = [stat.st_size, stat.st_mtime_ns, value]
    try:
        from cir_cli.io import write_json_atomic

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return value


def verify_file(path: Path, entry: WeightFile | None, sha1: str | None = None) -> str | None:
    """None when the file matches what is published, else what is wrong (one phrase)."""
    size = path.stat().st_size
    if entry is not None and entry.size is not None and size != entry.size:
        return f"size {size:,} B, published {entry.size:,} B"
    expected = [("sha1", sha1 or (entry.sha1 if entry else None))]
    expected.append(("sha256", entry.sha256 if entry else None))
    for algorithm, want in expected:
        if want and file_hash(path, algorithm) != want.lower():
            return f"{algorithm.upper()} {file_hash(path, algorithm)[:12]}, published {want[:12]}"
    return None


# --------------------------------------------------------------------------------------------
# What a recipe needs


@dataclass
class Input:
    """One file a recipe needs (or may use), and its state here."""

    key: str  # recipe key or --checkpoint
    value: str  # as in the recipe / where it is looked for
    entry: WeightFile | None
    required: bool = True
    status: str = ""  # ok | missing | mismatch | builtin | remote
    detail: str = ""
    path: Path | None = None
    set_line: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def problem(self) -> bool:
        return self.status in ("missing", "mismatch")


def _looks_local(value: str) -> bool:
    """A path rather than a hub id / open_clip tag: a suffix, a leading . / ~, or 2+ slashes."""
    path = Path(value).expanduser()
    return (
        path.exists()
        or value.startswith((".", "/", "~"))
        or bool(path.suffix)
        or value.count("/") >= 2
    )


def _entry_by_file(value: str) -> WeightFile | None:
    """The row of a local file, by name: its `local` path or, for a file downloaded from a
    direct URL (OpenAI's RN50x4.pt), the URL's last part. A name that several rows share (the
    re-ranking zip's stage1/.../blip_mean.pt and stage2/.../blip_mean.pt) needs the row's whole
    `local` path at the end of the value."""
    parts = Path(value).parts
    name = Path(value).name
    for entry in WEIGHTS:
        local = Path(entry.local).parts if entry.local else ()
        if len(local) > 1 and parts[-len(local) :] == local:
            return entry
    named = [e for e in WEIGHTS if e.local and Path(e.local).name == name]
    if len(named) == 1:
        return named[0]
    if named:
        return None
    for entry in WEIGHTS:
        if entry.url and entry.url.endswith(".pt") and Path(entry.url).name == name:
            return entry
    return None


def _entry_by_hub(repo: str) -> WeightFile | None:
    return next((e for e in WEIGHTS if e.hub == repo and not e.open_clip), None)


def _entry_by_tag(arch: str, tag: str) -> WeightFile | None:
    return next((e for e in WEIGHTS if e.open_clip == (arch, tag)), None)


def missing_hint(value: str) -> str:
    """ "; make it with `cir prepare ...`" for files the toy commands make, else ""."""
    entry = _entry_by_file(value)
    return f"; make it with `{entry.make}`" if entry is not None and entry.make else ""


def looks_local(value: str) -> bool:
    """Public form of the path-or-hub-id rule (backbones use it for their error messages)."""
    return _looks_local(value)


def _set_line(key: str, value: str) -> str:
    if key == "--checkpoint":
        return f"--checkpoint {value}"
    if key == "archive":  # an archive of published files, unpacked into the weights folder
        return f"unzip {value} -d {Path(value).parent}"
    return f"--set {key}={value}"


def _check_local(item: Input, sha1: str | None = None) -> None:
    path = Path(item.value).expanduser()
    item.path = path
    if not path.exists():
        item.status = "missing"
        how = f"make it with `{item.entry.make}`" if item.entry and item.entry.make else ""
        item.detail = f"not found: {path}" + (f"; {how}" if how else "")
        return
    if path.is_dir():
        item.status, item.detail = "ok", "folder present"
        return
    wrong = verify_file(path, item.entry, sha1)
    if wrong:
        item.status, item.detail = "mismatch", f"{path}: {wrong}"
    else:
        published = sha1 or (item.entry and (item.entry.sha1 or item.entry.sha256))
        item.status = "ok"
        if published:
            item.detail = "present, hash verified"
        elif item.entry and item.entry.size:
            item.detail = "present, size verified (no published hash)"
        else:
            item.detail = "present (no published hash)"


def _check_hub(item: Input, repo: str, files: tuple[str, ...]) -> None:
    wanted = files or ("config.json",)
    for name in wanted:
        found = hub_cached(repo, name)
        if found is not None:
            item.status, item.path = "ok", found
            item.detail = f"in the hub cache ({name})"
            return
    item.status = "missing"
    item.detail = f"not in the local hub cache ({repo}); `cir weights get` fetches it"


def _check_open_clip(item: Input, entry: WeightFile | None, arch: str, tag: str) -> None:
    if entry is None:
        item.status = "remote"
        item.detail = f"open_clip {arch}/{tag}: not in cir's table; open_clip resolves it"
        return
    _check_hub(item, entry.hub or "", entry.hub_files)
    if item.status == "ok":
        return
    if entry.url:
        legacy = Path.home() / ".cache" / "clip" / Path(entry.url).name
        if legacy.is_file():
            item.status, item.path, item.detail = "ok", legacy, f"in open_clip's cache ({legacy})"
            return
    item.detail = (
        f"open_clip {arch}/{tag} not in the local caches; `cir weights get` fetches "
        f"{entry.hub}, or download {entry.url} and set backbone.pretrained to the file"
    )


def _hub_or_local(item: Input, value: str, files: tuple[str, ...] = ()) -> None:
    if _looks_local(value):
        _check_local(item)
    else:
        _check_hub(item, value, files)


def recipe_inputs(
    recipe: Any, checkpoint: str | None = None, directory: str | None = None
) -> list[Input]:
    """Every input of `recipe` (a resolved Recipe) plus its published checkpoints, checked."""
    items: list[Input] = []
    bb = recipe.backbone
    pretrained = bb.pretrained or ""
    key = "backbone.pretrained"
    if not pretrained:
        if bb.arch not in TINY_ARCHS and bb.name != "hf_clip":
            items.append(Input(key, "", None, status="builtin", detail="random initialisation"))
    elif bb.name == "open_clip" and not _looks_local(pretrained):
        entry = _entry_by_tag(bb.arch, pretrained)
        item = Input(key, pretrained, entry, set_line=_set_line(key, pretrained))
        _check_open_clip(item, entry, bb.arch, pretrained)
        items.append(item)
    elif _looks_local(pretrained):
        item = Input(key, pretrained, _entry_by_file(pretrained))
        item.set_line = _set_line(key, pretrained)
        _check_local(item, bb.sha1)
        items.append(item)
    else:
        item = Input(
            key, pretrained, _entry_by_hub(pretrained), set_line=_set_line(key, pretrained)
        )
        _check_hub(item, pretrained, ())
        items.append(item)

    if bb.name in ("blip", "blip2"):
        tok = bb.tokenizer or DEFAULT_TOKENIZER.get(bb.arch)
        if tok and tok != "cir-tiny":
            entry = _entry_by_hub(tok) if not _looks_local(tok) else None
            item = Input(
                "backbone.tokenizer", tok, entry, set_line=_set_line("backbone.tokenizer", tok)
            )
            if _looks_local(tok):
                path = Path(tok).expanduser()
                item.value = str(path / "vocab.txt") if path.is_dir() else tok
                _check_local(item)
            else:
                _check_hub(item, tok, ("vocab.txt",))
            if item.status == "missing":
                item.detail += "; or --set backbone.tokenizer=/path/to/bert-base-uncased/vocab.txt"
            items.append(item)
    if bb.name == "blip2" and bb.vision_pretrained:
        vp = bb.vision_pretrained
        key = "backbone.vision_pretrained"
        if vp == "openai":
            entry = _entry_by_tag("ViT-L-14", "openai")
            item = Input(key, vp, entry, set_line=_set_line(key, vp))
            _check_open_clip(item, entry, "ViT-L-14", "openai")
        else:
            item = Input(key, vp, _entry_by_file(vp), set_line=_set_line(key, vp))
            _check_local(item)
        items.append(item)

    method = recipe.method
    for text_file in getattr(method, "text_files", []) or []:
        item = Input("method.text_files", text_file, _entry_by_file(text_file))
        item.set_line = f'--set method.text_files=["{text_file}"]'
        _check_local(item)
        items.append(item)

    for key, ref in (
        ("finetune.checkpoint", recipe.finetune.checkpoint),
        ("--checkpoint", checkpoint),
    ):
        if ref:
            items.append(_checkpoint_input(key, ref))

    folder = weights_dir(directory)
    given = {i.entry.id for i in items if i.entry is not None}
    for entry in WEIGHTS:
        if not any(fnmatch.fnmatch(recipe.name, p) for p in entry.recipes):
            continue
        if entry.id in given:
            continue  # already a required input of this run
        if entry.hub_ref:
            value = entry.hub_ref
            item = Input(
                entry.use, value, entry, required=False, set_line=_set_line(entry.use, value)
            )
            repo, filename, _ = parse_hf_ref(value)
            _check_hub(item, repo, (filename,))
            if item.status == "ok":
                wrong = verify_file(item.path, entry)
                if wrong:
                    item.status, item.detail = "mismatch", f"{item.path}: {wrong}"
                else:
                    item.detail += ", hash verified" if entry.sha1 or entry.sha256 else ""
        else:
            value = str(folder / (entry.local or entry.id))
            item = Input(
                entry.use, value, entry, required=False, set_line=_set_line(entry.use, value)
            )
            _check_local(item)
        items.append(item)
    return items


def _checkpoint_input(key: str, ref: str) -> Input:
    item = Input(key, ref, None, set_line=_set_line(key, ref))
    if ref == "latest":
        # Callers resolve `latest` first (it reads run folders: a layer above this one).
        item.status, item.detail = "missing", "'latest' was not resolved to a run folder"
        return item
    if ref.startswith("hf://"):
        try:
            repo, filename, revision = parse_hf_ref(ref)
        except CirError as exc:
            item.status, item.detail = "missing", str(exc)
            return item
        item.entry = next((e for e in WEIGHTS if e.hub_ref == f"hf://{repo}/{filename}"), None)
        _check_hub(item, repo, (filename,))
        return item
    item.entry = _entry_by_file(ref)
    _check_local(item)
    return item


def problems(items: list[Input], published: bool = False) -> list[Input]:
    """Inputs that stop a run: required ones missing or wrong (published ones with --published,
    and any published file present with the wrong hash)."""
    return [
        i
        for i in items
        if (i.required and i.problem) or (i.status == "mismatch") or (published and i.problem)
    ]


def describe(item: Input) -> list[str]:
    """Plain lines (no table: they must stay readable in a log file of any width)."""
    status = {
        "ok": "ok",
        "missing": "MISSING",
        "mismatch": "MISMATCH",
        "builtin": "built-in",
        "remote": "remote",
    }.get(item.status, item.status)
    role = "" if item.required else "  (published checkpoint, optional)"
    lines = [f"  [{status}] {item.key} = {item.value or '(none)'}{role}"]
    entry = item.entry
    if entry is not None:
        lines.append(f"      what:   {entry.what}")
        if entry.url:
            lines.append(f"      source: {entry.url}")
        if entry.published_in:
            lines.append(f"      from:   {entry.published_in}")
        hashes = []
        if entry.sha1:
            hashes.append(f"sha1 {entry.sha1}")
        if entry.sha256:
            hashes.append(f"sha256 {entry.sha256}")
        if entry.size:
            hashes.append(f"size {entry.size:,} B")
        if entry.in_archive:
            hashes.append(f"inside {entry.in_archive} (SHA1 not published per file)")
        if hashes:
            lines.append(f"      verify: {', '.join(hashes)}")
        if entry.note:
            lines.append(f"      note:   {entry.note}")
    if item.detail:
        lines.append(f"      here:   {item.detail}")
    if item.set_line:
        lines.append(f"      use:    {item.set_line}")
    return lines


def fetchable(items: list[Input]) -> list[tuple[Input, str, tuple[str, ...]]]:
    """(input, hub repo, files) for every hub-hosted input not yet in the cache."""
    out = []
    for item in items:
        if item.status == "ok":
            continue
        entry = item.entry
        if item.value.startswith("hf://"):
            repo, filename, _ = parse_hf_ref(item.value)
            out.append((item, repo, (filename,)))
        elif entry is not None and entry.hub:
            out.append((item, entry.hub, entry.hub_files))
        elif (
            item.key in ("backbone.pretrained", "backbone.tokenizer")
            and not _looks_local(item.value)
            and item.value
        ):
            files = ("vocab.txt",) if item.key == "backbone.tokenizer" else ()
            out.append((item, item.value, files))
    return out


def download(
    repo: str, files: tuple[str, ...], local_dir: Path | None = None, any_of: bool = False
) -> list[Path]:
    """Fetch hub files (or a whole repo) with huggingface_hub; into its cache by default.

    `any_of`: the files are alternatives (open_clip's safetensors or .bin): the first that
    exists is enough.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if not files:
        try:
            return [Path(snapshot_download(repo, local_dir=local_dir))]
        except Exception as exc:
            raise CirError(f"{repo}: download failed ({type(exc).__name__})") from None
    got, last = [], None
    for name in files:
        try:
            got.append(Path(hf_hub_download(repo, name, local_dir=local_dir)))
            if any_of:
                return got
        except Exception as exc:  # network / missing file errors come as many types
            last = exc
            if not any_of:
                raise CirError(f"{repo}/{name}: download failed ({type(exc).__name__})") from None
    if not got:
        raise CirError(
            f"{repo}: none of {', '.join(files)} could be downloaded ({type(last).__name__})"
        )
    return got


def download_input(item: Input, repo: str, files: tuple[str, ...]) -> list[Path]:
    """Download one input `fetchable` returned and check the files against its registry entry
    (CirError naming the file when one does not match)."""
    any_of = item.entry is not None and item.entry.open_clip is not None
    paths = download(repo, files, any_of=any_of)
    if item.entry is not None and files and not any_of:
        for path in paths:
            wrong = verify_file(path, item.entry)
            if wrong:
                raise CirError(f"{path}: downloaded file does not match: {wrong}")
    return paths


def how_to_get(item: Input) -> str:
    """How to get a missing input the hub does not serve: the command that makes it, the
    archive it comes in, a curl line for a direct URL, the page to save it from, or the key to
    set; an archive adds a second line, the `--set` that uses it once unpacked."""
    entry = item.entry
    if entry is not None and entry.make:
        return f"make {item.value}: {entry.make}"
    if entry is not None and entry.in_archive:
        zipped = Path(item.value).parents[len(Path(entry.local or "").parts) - 1]
        return f"by hand: {item.value} comes in {zipped / entry.in_archive} (above)"
    if entry is not None and entry.url:
        if entry.url.startswith(("https://storage.googleapis.com", "https://openaipublic")):
            line = f"by hand: curl -L --create-dirs -o {item.value} {entry.url}"
        else:
            line = f"by hand: open {entry.url} and save the file as {item.value}"
        if entry.use == "archive":
            line += f"\n  then: {item.set_line}"
        return line
    return f"by hand: {item.key} = {item.value} ({item.detail})"
