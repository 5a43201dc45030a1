"""TOML recipes: schema, built-in lookup, `extends`, `--set` overrides and one-line errors.

A recipe picks the method, backbone and dataset and holds every hyper-parameter of a run. It is
the single source of truth: every run writes the resolved recipe into its manifest.

This module imports only the standard library and pydantic, so `cir recipes list` stays fast.
"""

from __future__ import annotations

import difflib
import shutil
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cir_cli.errors import CirError

# --------------------------------------------------------------------------------------------
# Schema


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a recipe must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Method sections: one class per method, discriminated by `name`. A method issue adds its
# class here and to `MethodConfig` (keys a recipe may set under [method]).


class Clip4CirMethod(_Section):
    """CLIP4Cir (spec clip4cir_blip4cir.md 3.2, 4): sum in stage I, Combiner in stage II."""

    name: Literal["clip4cir"] = "clip4cir"
    # How image and text features are fused at evaluation: "sum" (the element-wise sum of
    # stage I and the zero-shot baseline), "combiner" (a trained Combiner is required), or
    # "auto" (the Combiner when a checkpoint brought one, otherwise the sum). Stage I always
    # trains and validates the sum.
    combining: Literal["auto", "sum", "combiner"] = "auto"
    logit_scale: float = 100.0


class LinCirMethod(_Section):
    """LinCIR (spec lincir_searle_circo.md 1): Phi maps a CLIP image feature to a pseudo token.

    Zero-shot: Phi is trained on text only (self-masking projection, `cir finetune`); queries
    are the text feature of `prompt` with `$` replaced by Phi(image feature).
    """

    name: Literal["lincir"] = "lincir"
    # Benchmark prompt (spec 1.5); `$` marks the pseudo token, {caption} the modification text.
    prompt: str = "a photo of $ that {caption}"
    # FashionIQ: average the two caption orders "{c1} and {c2}" / "{c2} and {c1}" (spec 1.5).
    fiq_both_orders: bool = True
    # Text-only baseline: drop `$` from the prompt ("a photo of that {caption}"), ignore the image.
    text_only: bool = False
    phi_dropout: float = Field(0.5, ge=0, lt=1)
    # L2-normalise Phi's input at train and eval (LinCIR's --l2_normalize; off by default).
    l2_normalize: bool = False
    # SMP noise x = t + u * eps * noise_multiplier, u ~ U[0,1) per sample (spec 1.6).
    noise_multiplier: float = Field(1.0, ge=0)
    # EMA of Phi kept beside it during training (None: no EMA); use_ema evaluates with it.
    ema_decay: float | None = Field(0.9999, gt=0, lt=1)
    use_ema: bool = False
    # Training text (spec 1.6): local .txt / .jsonl / .csv / .parquet files (column
    # `text_column`) and Hugging Face dataset ids (needs the `datasets` package), mixed.
    text_files: list[str] = Field(default_factory=list)
    hf_datasets: list[str] = Field(default_factory=list)
    text_column: str = "text"
    max_texts: int | None = Field(None, ge=1)
    # Keyword masking: spaCy when a pipeline is installed ("auto"), or the built-in heuristic.
    keywords: Literal["auto", "spacy", "heuristic"] = "auto"
    spacy_model: str = "en_core_web_sm"
    # Encode each unmasked caption once through the feature cache (the seeds did it per step).
    cache_caption_features: bool = True


class Blip4CirMethod(_Section):
    """Bi-BLIP4CIR (spec clip4cir_blip4cir.md 3.3, 4.3): BLIP towers, sum then Combiner, with
    forward + reversed queries (weight 0 = the BLIP4CIR baseline without bi-directional loss)."""

    name: Literal["blip4cir"] = "blip4cir"
    # As CLIP4Cir's: "auto" (the Combiner when a checkpoint brought one, else the sum), "sum",
    # or "combiner" (trained Combiner weights required). Stage I always trains the sum.
    combining: Literal["auto", "sum", "combiner"] = "auto"
    logit_scale: float = 100.0
    # Direction prompts: `compat` = the published " [FORWARD] " string transform (with its
    # split-on-"and" quirk; the published checkpoints need it), `token` = real added special
    # tokens [FORWARD]/[BACKWARD], `none` = no marker.
    prompts: Literal["compat", "token", "none"] = "compat"
    # w of L = L_f + w L_r in stage I (seeds: 0.4 FashionIQ, 0.1 CIRR) and stage II (0.5 / 0.1).
    finetune_reverse_weight: float = Field(0.4, ge=0)
    combiner_reverse_weight: float = Field(0.5, ge=0)
    # Stage I: text_proj's lr is this multiple of finetune.lr (seeds: 100). Its group is the
    # second one: finetune.schedule_groups = "first" keeps it constant, as the seeds.
    text_proj_lr_scale: float = Field(100.0, gt=0)
    # Stage II reversed loss: reference rows per chunk of the B x B pairing (bounds memory).
    reverse_chunk: int = Field(64, ge=1)


class SprcMethod(_Section):
    """SPRC (spec sprc_cala.md 1): BLIP-2 Q-Former with sentence-level prompts; target = 32
    projected query tokens, score = max over them. Single stage (`cir finetune`)."""

    name: Literal["sprc"] = "sprc"
    # Caption tokens (LAVIS max_txt_len, spec 1.3); the prompt CLS sits at index num_query_tokens.
    max_text_length: int = Field(32, ge=2)
    # loss = itc + w_rtc * rtc + w_align * align (spec 1.4): CIRR 0.4 / 0.4; the FashionIQ
    # script sums them unweighted (1 / 1).
    loss_rtc: float = Field(0.4, ge=0)
    loss_align: float = Field(0.4, ge=0)
    # SPRC leaves temp unclamped; true clamps it to [0.001, 0.5] as upstream BLIP-2 (spec 5).
    clamp_temp: bool = False
    # Weight decay on every parameter as SPRC (true), or none on biases, norms, tokens, temp.
    decay_all: bool = True


class CalaMethod(_Section):
    """CaLa (spec sprc_cala.md 3): the sum or ARTEMIS query frame, trained together with two
    training-only heads, TBIA's twin-attention compositor (TAC) and CTR's hinge-based cross
    attention (HCA). Backbones: BLIP-2 (`blip2`, three Q-Former roles on one frozen ViT) or an
    open_clip ResNet (`open_clip`, RN50x4). Single stage (`cir finetune`)."""

    name: Literal["cala"] = "cala"
    # Query frame (spec 3.2): "sum" = norm(r + m) scored by cosine (logits x logit_scale),
    # "artemis" = EM + IS scores used directly as logits.
    frame: Literal["sum", "artemis"] = "sum"
    # Which encoders train (spec 3.6). BLIP-2: "multi" = the multimodal and textual Q-Formers,
    # "both" = also the visual one. CLIP: "text" (the text tower; CaLa never steps the visual
    # tower, which here stays frozen and cached).
    encoder: Literal["multi", "both", "text"] = "both"
    # tau and h of L = h CE(hca) + (1 - h) CE(tau tac + (1 - tau) main) (spec 3.5); README
    # values 0.45 / 0.1. 0 switches the head off (it is then not trained or saved).
    tac_weight: float = Field(0.45, ge=0, le=1)
    hca_weight: float = Field(0.1, ge=0, le=1)
    # Fixed logit scales of the published code: 100 for the sum frame, 10 for TAC and HCA.
    logit_scale: float = Field(100.0, gt=0)
    head_logit_scale: float = Field(10.0, gt=0)
    # Learning rates relative to finetune.lr (spec 3.6): TAC and HCA 2x, ARTEMIS 10x.
    tac_lr_scale: float = Field(2.0, gt=0)
    hca_lr_scale: float = Field(2.0, gt=0)
    artemis_lr_scale: float = Field(10.0, gt=0)
    # Mask padded caption tokens out of HCA's text hinge: an improvement (README deviations);
    # CaLa has no mask, so false (the default) reproduces it.
    text_padding_mask: bool = False
    # CLIP: CaLa's `.view(B, H*W, C)` of the (B, C, H, W) layer-4 map, which mixes channels and
    # positions; false (default) takes proper spatial tokens (flatten + transpose).
    compat_reshape: bool = False


class RerankMethod(_Section):
    """Candidate re-ranking (Liu et al., TMLR 2024; spec reranking.md): stage I = BLIP's
    image-grounded text encoder cross-attending to the reference's ViT tokens ([ENC] pooling,
    learnable temperature; `cir finetune`), stage II = the dual multi-modal encoder scoring
    (query, candidate) pairs (`cir train-combiner`). Re-ranking at evaluation: [rerank]."""

    name: Literal["rerank"] = "rerank"
    # Layers >= this merge the two branches' cross-attention outputs with a learned Linear;
    # earlier layers average them (CR: 6 of 12).
    merge_from_layer: int = Field(6, ge=0)
    # Stage-II training inputs: z_t from the stage-I encoder in train mode (dropout active) as
    # CR does (true), or in eval mode (false). CR's stage-II ViT also ran with drop-path 0.1;
    # here ViT tokens are cached (frozen, eval), which drops that noise (README deviations).
    noisy_z_t: bool = True
    # Precision of the cached 577 x 768 ViT tokens (CR kept fp32 on the GPU): "fp16" halves
    # the cache (886 KB per image) at ~1e-3 relative rounding of the tokens.
    token_precision: Literal["fp16", "fp32"] = "fp16"


MethodConfig = Annotated[
    Clip4CirMethod | LinCirMethod | Blip4CirMethod | SprcMethod | CalaMethod | RerankMethod,
    Field(discriminator="name"),
]


class BackboneConfig(_Section):
    """The encoder towers: registry key `name`, architecture and weights."""

    name: Literal["open_clip", "hf_clip", "blip", "blip2"] = "open_clip"
    # open_clip: an architecture name. hf_clip: a Hugging Face CLIP id (e.g.
    # "openai/clip-vit-large-patch14") or a built-in tiny config ("cir-tiny-hf").
    arch: str = "RN50x4"
    # A pretrained tag of the architecture (e.g. "openai") or a local checkpoint path; None =
    # random initialisation (tests and the toy recipe). hf_clip: a save_pretrained folder or a
    # Hugging Face id (read from the local hub cache offline).
    pretrained: str | None = "openai"
    # Precision of frozen towers during feature extraction on GPU (training precision is the
    # stage's `amp`).
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # (blip only) input resolution; None = the architecture's (blip-base: 384). Pretrained
    # position grids (model_base.pth: 14x14 at 224 px) are resized bicubically to it.
    image_size: int | None = Field(None, gt=0)
    # (blip, blip2) BERT-uncased vocabulary: a vocab.txt, a tokenizer folder or a hub id; None =
    # bert-base-uncased (hub cache) for blip-base, the built-in vocabulary for cir-tiny-blip.
    # blip2: None = bert-base-uncased for blip2-vit-g/-vit-l, "cir-tiny" for the tiny archs.
    tokenizer: str | None = None
    # (blip2 only) frozen ViT weights when `pretrained` has none (LAVIS saves without them):
    # eva_vit_g.pth / clip_vit_L.pth, an OpenAI / open_clip ViT-L-14 state dict, or "openai".
    vision_pretrained: str | None = None
    # (blip only) expected SHA1 of backbone.pretrained (model_base.pth:
    # 5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50); None = not checked.
    sha1: str | None = None
    # Seed of the towers' random initialisation (pretrained = ""): fixes a random frozen tower
    # across run seeds (toy studies); None = drawn from the run's seed, as before.
    init_seed: int | None = None


class DataConfig(_Section):
    dataset: Literal["cirr", "fashioniq", "circo", "genecis"] = "cirr"
    root: str = "data/cirr_dataset"
    # FashionIQ's "dress types"; ignored for CIRR. The toy FashionIQ layout uses shape names.
    categories: list[str] = Field(default_factory=lambda: ["dress", "shirt", "toptee"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test1"
    transform: Literal["targetpad", "squarepad", "clip"] = "targetpad"
    target_ratio: float = Field(1.25, gt=0)
    # When images become RGB, as the reference code does: "auto" = first for `clip`
    # (CLIPImageProcessor, LinCIR), after the pad, resize and crop for the pad transforms
    # (CLIP4Cir / BLIP4CIR / SPRC data_utils; CaLa's FashionIQ loader converts first: its
    # recipes say "first"). fixes.convert_rgb_first overrides it with "first".
    rgb_conversion: Literal["auto", "first", "after_crop"] = "auto"
    # None = the backbone's own input resolution (RN50x4: 288).
    image_size: int | None = Field(None, gt=0)
    # None = the dataset's training default: FashionIQ draws one of the 4 caption joins per
    # sample (seeded), CIRR uses the caption verbatim.
    train_caption_policy: Literal["verbatim", "fiq_eval", "fiq_random"] | None = None
    num_workers: int = Field(2, ge=0)
    # Keep preprocessed training pixels in the on-disk cache (memory-mapped) when the image
    # tower trains, instead of decoding every image every epoch. Preprocessing is
    # deterministic (no augmentation), so this changes nothing but speed; it costs
    # 3 x S x S x 4 bytes per image on disk (64 px: 48 KB; 288 px: 1 MB).
    cache_pixels: bool = False


class FinetuneConfig(_Section):
    """Stage I: fine-tune the encoders with the method's own query composition."""

    epochs: int = Field(100, ge=0)
    # Stop after this many optimizer steps (across epochs) when set.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-7, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    encoder: Literal["both", "text", "image"] = "both"
    # The optimizer and the lr schedule (engine/optim.py): the methods only declare their
    # parameter groups. "constant"; "cosine" = per optimizer step to min_lr over
    # schedule_epochs, clamped after it; "epoch_cosine" = BLIP's cosine_lr_schedule, set once at
    # the start of each epoch and periodic past schedule_epochs (Bi-BLIP4CIR, CaLa);
    # "onecycle" = torch OneCycleLR over schedule_epochs of steps (SPRC).
    optimizer: Literal["adamw", "adam"] = "adamw"
    scheduler: Literal["constant", "cosine", "epoch_cosine", "onecycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    # The schedule's span in epochs; None = the whole run.
    schedule_epochs: float | None = Field(None, gt=0)
    # Which parameter groups follow the schedule: "all", or "first" (BLIP's onlyGroup0: every
    # other group keeps its lr all run).
    schedule_groups: Literal["all", "first"] = "all"
    # onecycle: torch OneCycleLR's pct_start / div_factor / final_div_factor; cycle_momentum
    # cycles Adam's beta1 0.95 -> 0.85 -> 0.95 (OneCycleLR's default, SPRC ran with it).
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)
    cycle_momentum: bool = True
    validate_every: int = Field(1, ge=1)
    # Validate every N optimizer steps instead of every `validate_every` epochs (0: off); for
    # step-based stages such as LinCIR's (epochs = 0 with max_steps).
    validate_every_steps: int = Field(0, ge=0)
    # Also validate after these optimizer steps (LinCIR's train_phi.py validates at step 50 too).
    validate_at_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    grad_accum: int = Field(1, ge=1)
    amp: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    # Also save the resumable `last` checkpoint every N optimizer steps (0: at validations only).
    save_every_steps: int = Field(0, ge=0)
    # A stage-I checkpoint (run dir, checkpoint dir or seed .pt) that later stages start from;
    # "latest" = the newest finetune run of this recipe under output.dir.
    checkpoint: str | None = None


class CombinerConfig(_Section):
    """Stage II: train the Combiner on cached features of the frozen stage-I encoders."""

    epochs: int = Field(300, ge=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(2e-5, gt=0)
    # Adam(lr) with torch's defaults, no schedule (CLIP4Cir / Bi-BLIP4CIR combiner_train.py).
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    # The stage's lr schedule, as finetune's (engine/optim.py); constant for the Combiners,
    # the re-ranker's stage II uses CR's per-epoch cosine.
    scheduler: Literal["constant", "cosine", "epoch_cosine", "onecycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    schedule_epochs: float | None = Field(None, gt=0)
    schedule_groups: Literal["all", "first"] = "all"
    projection_dim: int = Field(2560, ge=1)
    hidden_dim: int = Field(5120, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    validate_every: int = Field(1, ge=1)
    amp: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_every_steps: int = Field(0, ge=0)


class EvalConfig(_Section):
    split: str = "val"
    # The validation metric that picks the `best` checkpoint; None = the dataset's: CIRR
    # mean_r5_rs1 ((R@5 + Rs@1)/2, what papers report), FashionIQ average_recall, CIRCO
    # map_at10, GeneCIS average_recall_at1. SPRC's and CaLa's CIRR code selected by
    # arithmetic_mean (the mean of the 7 recalls).
    selection_metric: str | None = None
    batch_size: int = Field(32, ge=1)
    save_rankings: bool = False
    # Query chunk for ranking: bounds the (chunk x gallery) score matrix in memory.
    rank_chunk: int = Field(1024, ge=1)


class RerankConfig(_Section):
    """Re-rank each query's first K candidates with a cross-encoder at validate / submit
    (methods that have one: `rerank`). Spec reranking.md 6."""

    # None: no re-ranking. "self": the method's own first stage (stage I). Otherwise a
    # candidate list from any first stage: a file or folder written by `cir validate/submit
    # --save-candidates K`, or the reference's cirr_top_200_*.pt / fiq_top_200_*.pt.
    candidates: str | None = None
    # Candidates re-ordered per query (CR: CIRR 50, FashionIQ 100). Ranks past K keep the
    # first-stage order; CIRR R@50 at K = 50 therefore equals the first stage's.
    k: int = Field(50, ge=1)
    # "none": order by the cross-encoder score alone (CR). "sum": score + fusion_weight x the
    # first-stage score (the candidate list's scores; cosine for `self`).
    fusion: Literal["none", "sum"] = "none"
    fusion_weight: float = 1.0
    # (query, candidate) pairs per cross-encoder forward (memory bound only).
    batch_size: int = Field(64, ge=1)


class LoggingConfig(_Section):
    comet: bool = False
    # Offline Comet writes an archive in the run dir; online needs COMET_API_KEY in the env.
    comet_offline: bool = False
    project: str | None = None
    workspace: str | None = None
    experiment_name: str | None = None
    # Comet's per-step scalars every N optimizer steps.
    log_every: int = Field(10, ge=1)
    # Off a terminal (sbatch, nohup, `| tee`): one plain progress line every N optimizer steps
    # (None = log_every) and at least every `every_seconds`. train_log.csv gets every step.
    every_steps: int | None = Field(None, ge=1)
    every_seconds: float = Field(300.0, gt=0)
    # TensorBoard event files in <run>/tensorboard (needs `pip install 'cir-cli[tensorboard]'`).
    tensorboard: bool = False


class OutputConfig(_Section):
    dir: str = "runs"
    # Feature cache root; None = <output dir>/../cache, shared by all runs.
    cache_dir: str | None = None


# --------------------------------------------------------------------------------------------
# Deliberate deviations from the reference code (README "Deviations from the reference code").
# A recipe named after a paper reproduces its reference code's behaviour, quirks included; each
# improvement is one switch here, default False (= the reference). `_fixed` recipes turn them on.


class FixesConfig(_Section):
    """[fixes]: every deliberate improvement over the reference code, off by default."""

    # Images: convert to RGB before padding / resizing (black pad for palette, CMYK and RGBA
    # images). The CLIP4Cir, BLIP4CIR, SPRC and CaLa (CIRR) data_utils convert after the crop.
    convert_rgb_first: bool = False
    # The `clip` transform: torchvision CenterCrop (rounds the offset half to even) instead of
    # CLIPImageProcessor's floor((side - size) / 2), which LinCIR used.
    torchvision_center_crop: bool = False
    # AMP: bf16 where the GPU supports it (fp16 + GradScaler elsewhere) for stages whose recipe
    # says fp16; the references all ran fp16 autocast with a GradScaler.
    amp_auto: bool = False
    # LinCIR EMA of Phi: warm-up decay (1 + n) / (10 + n) counted from n = 0 (first decay 1/10);
    # LinCIR's EMAModel increments its counter first, so its first decay is 2/11.
    ema_warmup_from_zero: bool = False
    # The validation before the first step may become `best` (no reference selects from it:
    # they validate only after training steps).
    select_initial_validation: bool = False

    # -- optimisation (schedule and parameter groups) --
    # finetune.scheduler = "epoch_cosine" advances every optimizer step and holds min_lr past
    # schedule_epochs (the references set it once per epoch and let it rise again after
    # max_epoch: Bi-Blip4CIR / CaLa src/utils.py cosine_lr_schedule).
    step_cosine: bool = False
    # CaLa: the Q-Formers' query_tokens share their Q-Former's parameter group, so they follow
    # its schedule (CaLa src/blip_fine_tune.py gives them their own group, which
    # onlyGroup0=True leaves at the base lr all run).
    schedule_query_tokens: bool = False
    # onecycle spans the run's own epochs instead of finetune.schedule_epochs (SPRC
    # src/blip_fine_tune_2.py builds CIRR's OneCycleLR with epochs=80 whatever --num-epochs).
    onecycle_spans_run: bool = False

    def enabled(self) -> list[str]:
        return [name for name, value in self if value is True]


class Recipe(_Section):
    name: str = ""
    description: str = ""
    seed: int = 0
    device: str = "auto"
    method: MethodConfig = Field(default_factory=Clip4CirMethod)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    combiner: CombinerConfig = Field(default_factory=CombinerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    fixes: FixesConfig = Field(default_factory=FixesConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Built-in recipes


def builtin_dir() -> Path:
    """Where the shipped recipes are: inside the installed wheel, or the checkout's recipes/."""
    package_copy = Path(__file__).resolve().parent / "recipes"
    if package_copy.is_dir():
        return package_copy
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def header_comment(path: Path) -> str:
    """The leading comment block of a recipe file (what it reproduces and how to run it)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def find_recipe(name_or_path: str) -> Path:
    """Resolve a built-in recipe name or a path to a TOML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or candidate.is_file() or "/" in name_or_path:
        if not candidate.is_file():
            raise CirError(f"recipe file not found: {candidate}")
        return candidate
    builtin = builtin_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    close = difflib.get_close_matches(name_or_path, builtin_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CirError(
        f"unknown recipe '{name_or_path}'{hint} (`cir recipes list` shows the built-in ones; "
        "a path to a .toml file also works)"
    )


def _read_toml(path: Path) -> dict[str, Any]:
    from cir_cli.io import read_toml

    return read_toml(path, "recipe")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and, recursively, the recipe it `extends`; the child's keys win."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise CirError(f"{path}: 'extends' forms a cycle: {cycle}")
    raw = _read_toml(path)
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str):
        raise CirError(f"{path}: 'extends' must be a recipe name or path (a string)")
    if not Path(parent_name).is_absolute() and (path.parent / f"{parent_name}.toml").is_file():
        parent = path.parent / f"{parent_name}.toml"
    else:
        parent = find_recipe(parent_name)
    return _deep_merge(_load_raw(parent, (*chain, resolved)), raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`finetune.lr=1e-5` -> (['finetune', 'lr'], 1e-05).

    Values are TOML literals; bare words (paths, model names) are strings.
    """
    if "=" not in item:
        raise CirError(f"--set {item!r}: expected key.path=value, e.g. --set finetune.lr=1e-5")
    key, value_text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CirError(f"--set {item!r}: empty key; expected key.path=value")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text  # a bare string such as a path or a model name
    return key.split("."), value


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`--set key.path=value` items (TOML literals), then `values` ({'output.dir': path}) that
    are already typed: a CLI option's value is set as given, never re-parsed as TOML."""
    result = _deep_merge({}, raw)
    parsed = [(item, *parse_override(item)) for item in overrides]
    parsed += [(f"{key}={value}", key.split("."), value) for key, value in (values or {}).items()]
    for item, path, value in parsed:
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CirError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation can hold (unwraps Annotated / Union / Optional)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _members(args[0])
    if args:
        return [m for a in args for m in _members(a)]
    return (
        [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    )


def _resolve_loc(loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """(key path without union tags, field names of the section the last key sits in)."""
    current: list[type[BaseModel]] = [Recipe]
    path: list[str] = []
    for i, part in enumerate(loc):
        fields = {f: m.model_fields[f] for m in current for f in m.model_fields}
        if part not in fields:
            # A discriminated union puts the member's tag in the location: pick that member.
            tagged = [
                m
                for m in current
                if m.model_fields.get("name") is not None
                and typing.get_args(m.model_fields["name"].annotation) == (part,)
            ]
            if tagged:
                current = tagged
                continue
            return path + [str(p) for p in loc[i:]], list(fields)
        path.append(str(part))
        if i < len(loc) - 1:
            current = _members(fields[part].annotation) or current
    return path, list(dict.fromkeys(f for m in current for f in m.model_fields))


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a table (section)",
    "dict_type": "a table (section)",
}


# Keys that moved when the engine took over optimisation (issue 13): a one-line pointer.
_MOVED = {
    "finetune.cosine_epochs": "finetune.schedule_epochs",
    "method.schedule": 'finetune.scheduler = "onecycle" (or another schedule)',
    "method.schedule_epochs": "finetune.schedule_epochs",
    "method.pct_start": "finetune.pct_start",
    "method.div_factor": "finetune.div_factor",
    "method.final_div_factor": "finetune.final_div_factor",
    "method.cycle_momentum": "finetune.cycle_momentum",
    "method.schedule_text_proj": 'finetune.schedule_groups = "all"',
    "method.schedule_all_groups": 'finetune.schedule_groups = "all"',
    "method.finetune_max_epoch": 'finetune.schedule_epochs (finetune.scheduler = "epoch_cosine")',
    "method.rerank_max_epoch": 'combiner.schedule_epochs (combiner.scheduler = "epoch_cosine")',
    "method.periodic_cosine": "fixes.step_cosine (true: per step, held at 0 past the span)",
    "method.rerank_weight_decay": "combiner.weight_decay",
}


def _describe_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        path, options = _resolve_loc(loc)
        key = ".".join(path)
        if key in _MOVED:
            return f"{source}: '{key}' has moved: use {_MOVED[key]}"
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(options)}"
        return f"{source}: unknown key '{key}'{hint}"
    key = ".".join(_resolve_loc(loc)[0])
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = err.get("ctx", {}).get("expected_tags", "")
        given = err.get("input", {}).get("name")
        return f"{source}: {key}.name = {given!r} is not known; expected one of {expected}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{source}: {key} = {err.get('input')!r} is not allowed; expected one of {expected}"
    if kind in _TYPE_WORDS:
        return f"{source}: {key} must be {_TYPE_WORDS[kind]}, got {err.get('input')!r}"
    return f"{source}: {key}: {err['msg']} (got {err.get('input')!r})"


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        # One line: the first problem is reported; fixing it reveals the next.
        raise CirError(_describe_error(exc.errors()[0], source)) from None


def load_recipe(
    name_or_path: str, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Recipe:
    """Load a built-in name or a TOML path, apply `extends` and `--set` overrides, validate.

    `values` are typed overrides from CLI options ({'output.dir': 'runs/it's'}), applied last.
    """
    path = find_recipe(name_or_path)
    raw = _load_raw(path)
    if not raw:
        # An empty file (or one of only comments) would validate as all defaults and then fail
        # far from its cause.
        raise CirError(
            f"{path}: the recipe is empty; expected at least [method], [backbone] and [data] "
            "(or extends = \"<recipe>\"); `cir recipes cp` gives a starting point"
        )
    raw.setdefault("name", path.stem)
    source = str(path) if not overrides else f"{path} (with --set overrides)"
    return validate_recipe(apply_overrides(raw, overrides or [], values), source)


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Copy a recipe file verbatim (comments included) to edit it locally, as `tune cp` does."""
    src = find_recipe(name)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise CirError(f"{dest} already exists; pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


# --------------------------------------------------------------------------------------------
# TOML output (tomllib reads only); the recipes hold scalars, lists and nested tables.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "", unset_as_comments: bool = False) -> str:
    """Serialise a nested dict; None values are left out (TOML has no null: absent = default),
    or, with `unset_as_comments`, written as `# key = (unset)` so every settable key shows."""
    lines = []
    for k, v in data.items():
        if isinstance(v, dict):
            continue
        if v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
        elif unset_as_comments:
            lines.append(f"# {k} = (unset)")
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    out = "\n".join(lines)
    for key, table in tables:
        name = f"{prefix}{key}"
        body = to_toml(table, prefix=f"{name}.", unset_as_comments=unset_as_comments)
        out += f"\n\n[{name}]\n{body}" if out or lines else f"[{name}]\n{body}"
    return out.strip() + "\n"
