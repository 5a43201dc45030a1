"""The recipe schema: one pydantic section per TOML table, and `Recipe`, which holds them all.

Loading (built-in names, `extends`, `--set` overrides, one-line errors) is `cir_cli.recipes`.
This module imports only the standard library, pydantic and the dataset and method
registries; validating [method] imports just that method's torch-free section class, so
`cir recipes show` and dry runs stay fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from cir_cli.data import DATASETS
from cir_cli.registry import method_config, method_names


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a recipe must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# [method]: each method declares its own keys in a subclass of `MethodSection`, registered with
# the method (cir_cli/registry.py); the recipe validates [method] with the class registered for
# its `name`.


class MethodSection(_Section):
    """What every [method] section has: `name`, the registered method it picks."""

    name: str


def _method_section(value: Any, handler: ValidatorFunctionWrapHandler) -> MethodSection:
    """Validate a [method] table with the section class registered for its `name`."""
    if isinstance(value, MethodSection):
        return value
    if not isinstance(value, dict):
        return handler(value)  # pydantic's own "must be a table" error
    names = method_names()
    name = value.get("name")
    if name not in names:
        expected = ", ".join(repr(n) for n in names)
        context = {"discriminator": "'name'", "tag": str(name), "expected_tags": expected}
        raise PydanticKnownError("union_tag_invalid", context)
    return method_config(name).model_validate(value)


def _default_method() -> MethodSection:
    return method_config("clip4cir")()


MethodField = Annotated[SerializeAsAny[MethodSection], WrapValidator(_method_section)]


# --------------------------------------------------------------------------------------------
# [backbone]: one class per family, picked by `name` (open_clip when absent).


class BackboneConfig(_Section):
    """The encoder towers: registry key `name`, architecture and weights.

    Calling `BackboneConfig(name=..., ...)` builds the class of that family (as `Path()` gives
    a `PosixPath`), so scripts need not know the subclasses.
    """

    name: str = "open_clip"
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
    # Seed of the towers' random initialisation (pretrained = ""): fixes a random frozen tower
    # across run seeds (toy studies); None = drawn from the run's seed, as before.
    init_seed: int | None = None
    # Keys of other families: always unset here (setting one is an error naming the key), so
    # every [backbone] reads, dumps and shows the same keys (manifests, `cir recipes show`).
    image_size: None = None
    tokenizer: None = None
    vision_pretrained: None = None
    sha1: None = None

    def __new__(cls, *args: Any, **data: Any) -> BackboneConfig:
        if cls is BackboneConfig:
            cls = BACKBONE_CONFIGS.get(data.get("name", "open_clip"), cls)
        return super().__new__(cls)


class OpenClipBackboneConfig(BackboneConfig):
    """open_clip towers (CLIP4Cir, CaLa's RN50x4, LinCIR's tiny CLIP)."""

    name: Literal["open_clip"] = "open_clip"


class HfClipBackboneConfig(BackboneConfig):
    """Hugging Face transformers CLIP (LinCIR's ViT-L/14 and ViT-G/14)."""

    name: Literal["hf_clip"] = "hf_clip"


class BlipBackboneConfig(BackboneConfig):
    """BLIP ViT + BERT towers (Bi-BLIP4CIR, candidate re-ranking)."""

    name: Literal["blip"] = "blip"
    # Input resolution; None = the architecture's (blip-base: 384). Pretrained position grids
    # (model_base.pth: 14x14 at 224 px) are resized bicubically to it.
    image_size: int | None = Field(None, gt=0)
    # BERT-uncased vocabulary: a vocab.txt, a tokenizer folder or a hub id; None =
    # bert-base-uncased (hub cache) for blip-base, the built-in vocabulary for cir-tiny-blip.
    tokenizer: str | None = None
    # Expected SHA1 of backbone.pretrained (model_base.pth:
    # 5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50); None = not checked.
    sha1: str | None = None


class Blip2BackboneConfig(BackboneConfig):
    """BLIP-2 frozen ViT + Q-Former (SPRC, CaLa)."""

    name: Literal["blip2"] = "blip2"
    # BERT-uncased vocabulary (a vocab.txt, a tokenizer folder or a hub id); None =
    # bert-base-uncased for blip2-vit-g/-vit-l, "cir-tiny" for the tiny archs.
    tokenizer: str | None = None
    # Frozen ViT weights when `pretrained` has none (LAVIS saves without them): eva_vit_g.pth /
    # clip_vit_L.pth, an OpenAI / open_clip ViT-L-14 state dict, or "openai".
    vision_pretrained: str | None = None


BACKBONE_CONFIGS: dict[str, type[BackboneConfig]] = {
    "open_clip": OpenClipBackboneConfig,
    "hf_clip": HfClipBackboneConfig,
    "blip": BlipBackboneConfig,
    "blip2": Blip2BackboneConfig,
}


def _backbone_family(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("name", "open_clip")
    return getattr(value, "name", None)


BackboneSection = Annotated[
    Annotated[OpenClipBackboneConfig, Tag("open_clip")]
    | Annotated[HfClipBackboneConfig, Tag("hf_clip")]
    | Annotated[BlipBackboneConfig, Tag("blip")]
    | Annotated[Blip2BackboneConfig, Tag("blip2")],
    Discriminator(_backbone_family),
]


# --------------------------------------------------------------------------------------------
# The other sections


class DataConfig(_Section):
    # A registered dataset (cir_cli.data.DATASETS, so one added by register_dataset counts).
    dataset: str = "cirr"
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

    @field_validator("dataset", mode="before")
    @classmethod
    def _registered(cls, name: Any) -> str:
        if not isinstance(name, str) or name not in DATASETS:
            known = [repr(n) for n in DATASETS]
            # Reported like a Literal mismatch: "data.dataset = 'x' is not allowed; expected ..."
            expected = " or ".join([", ".join(known[:-1]), known[-1]] if len(known) > 1 else known)
            raise PydanticCustomError(
                "literal_error", "Input should be {expected}", {"expected": expected}
            )
        return name


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
    method: MethodField = Field(default_factory=_default_method)
    backbone: BackboneSection = Field(default_factory=OpenClipBackboneConfig)
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
