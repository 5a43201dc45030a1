"""The interface every CIR method implements; evaluation, submission and search use only this.

A method splits its image path in two, so frozen work is cached and never recomputed:

    pixels --image_representation--> R  (cached on disk when `image_cache_key()` is not None)
    R (reference) + texts --queries_from_representation--> normalised query features (Q, D)
    R (gallery)           --targets_from_representation--> gallery features (N, D) or (N, T, D)
    score(queries, targets) -> (Q, N) similarities

CLIP4Cir: R = the raw CLIP image feature; queries = normalize(R + text) or the Combiner;
targets = normalize(R); score = cosine. SPRC keeps 32 query tokens per image and scores by the
max over them; LinCIR builds the query from text alone with a pseudo-token from R. The public
`encode_*` helpers are the same functions composed, for notebooks and scripts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cir_cli.cache import default_cache
from cir_cli.checkpoints import (
    extract_state_dict,
    is_safetensors,
    load_named_state,
    load_state_dict_strict,
    load_weights,
)
from cir_cli.data.transforms import build_transform, resolve_crop, resolve_rgb_order
from cir_cli.errors import CirError
from cir_cli.modules import Combiner
from cir_cli.modules.combiner import infer_combiner_dims
from cir_cli.runs import resolve_weights_file

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from cir_cli.config import Recipe
    from cir_cli.data.base import CIRSplit


class CIRMethod(nn.Module):
    """Base class of all methods (see the module docstring for the contract)."""

    #: registry name, set by subclasses
    name: str = ""
    #: the training stages and the factory of each: a method that trains defines the factory
    #: (`finetune_task`, and `combiner_task` for a second stage) returning a `TrainingTask`.
    STAGE_TASKS = {"finetune": "finetune_task", "combiner": "combiner_task"}

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        # This method's own [method] section (the class it registered), read as self.cfg.
        self.cfg = recipe.method
        self._transform = None

    # -- training ----------------------------------------------------------------------------

    def has_stage(self, stage: str) -> bool:
        return hasattr(self, self.STAGE_TASKS[stage])

    def training_task(self, stage: str, device: torch.device) -> Any:
        """Set the model up for `stage` and return that stage's `TrainingTask`.

        The factory changes the model, on purpose: it drops or adds the Combiner, freezes or
        unfreezes towers, turns on gradient checkpointing, adds an EMA copy, as the stage
        needs. Call it once per run, on the model that will train, after it moved to `device`.
        """
        return getattr(self, self.STAGE_TASKS[stage])(device)

    def task_sections(self) -> dict[str, Any]:
        """The recipe sections every stage task takes (methods/training.py), read from this
        method's recipe: the factories pass them on with the stage's own section."""
        recipe = self.recipe
        return {
            "data": recipe.data,
            "eval_cfg": recipe.eval,
            "seed": recipe.seed,
            "cache": default_cache(recipe),
            "recipe_record": recipe.to_dict(),
        }

    # -- preprocessing ---------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """The recipe's data.image_size, or the backbone's own input resolution."""
        return self.recipe.data.image_size or self.backbone.image_size

    def preprocessing_options(self) -> tuple[str, str]:
        """(RGB conversion order, centre crop) of this recipe: the reference's for its transform
        (`data.rgb_conversion`, "auto" = the transform's reference) unless a fix says otherwise."""
        data, fixes = self.recipe.data, self.recipe.fixes
        rgb = "first" if fixes.convert_rgb_first else data.rgb_conversion
        crop = "torchvision" if fixes.torchvision_center_crop else "auto"
        return resolve_rgb_order(data.transform, rgb), resolve_crop(data.transform, crop)

    def preprocessing_id(self) -> str:
        data = self.recipe.data
        rgb, crop = self.preprocessing_options()
        order = "rgb1" if rgb == "first" else "rgb2"
        crop_id = "fc" if crop == "floor" else "tc"
        return f"{data.transform}-r{data.target_ratio}-s{self.image_size}-{order}-{crop_id}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised pixel tensor (3, S, S), with the recipe's pad transform."""
        return self.transform(image)

    @property
    def transform(self):
        if self._transform is None:
            data = self.recipe.data
            rgb, crop = self.preprocessing_options()
            self._transform = build_transform(
                data.transform, self.image_size, data.target_ratio, rgb=rgb, crop=crop
            )
        return self._transform

    # -- the contract ------------------------------------------------------------------------

    def image_cache_key(self) -> str | None:
        """Key of the cached image representation, or None when it is trainable right now."""
        raise NotImplementedError

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        raise NotImplementedError

    def query_texts(self, split: CIRSplit) -> list[str]:
        """The modification texts of `split`'s queries, in order, as this method reads them.

        Default: the split's caption policy (FashionIQ's join, CIRR verbatim). A method that
        marks the raw captions before the join (BLIP4CIR's compat prompts) overrides it.
        """
        return split.texts()

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def single_modality_queries(
        self, reference: torch.Tensor, texts: list[Any]
    ) -> dict[str, torch.Tensor]:
        """Queries built from one modality alone, scored like composed queries (the modality
        audit of `cir validate --report`): "image" = the reference's own target feature,
        "text" = the caption's feature in the target space. Empty where a method has no such
        query (its targets live in a space a text or image feature alone cannot enter)."""
        return {}

    def score(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(Q, D) x (N, D) -> (Q, N) cosine similarities of normalised features."""
        return queries @ targets.T

    # -- convenience API (the same functions composed) ---------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_queries(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.queries_from_representation(self.image_representation(pixels), texts)

    @torch.no_grad()
    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.targets_from_representation(self.image_representation(pixels))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- checkpoints -----------------------------------------------------------------------

    def load_checkpoint(self, path: str, _chain: tuple[Path, ...] = ()) -> None:
        """Load trained weights: our checkpoints (a run dir, a checkpoint dir or the
        .safetensors of the trained tensors) or a file in the method's published layout."""
        file = resolve_weights_file(path)
        if not is_safetensors(file):
            self.import_published(file)
            return
        here = file.resolve()
        if here in _chain:
            # A hand-edited or copied sidecar can name itself (or an earlier link) as its base.
            cycle = " -> ".join(str(p) for p in (*_chain, here))
            raise CirError(f"{_chain[-1]}: base_checkpoint forms a cycle: {cycle}")
        state, meta = load_weights(file)
        base = meta.get("base_checkpoint")
        if base is not None and not isinstance(base, str):
            raise CirError(f"{file}: base_checkpoint must be a path (a string), got {base!r}")
        if base:  # a stage-II checkpoint names the stage-I weights it was trained on
            self.load_checkpoint(base, (*_chain, here))
        self.prepare_for_state(state, str(file))
        load_named_state(self, state, str(file))

    def prepare_for_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Create the optional modules a checkpoint holds weights for (a Combiner, an EMA)."""

    def import_published(self, file: Path) -> None:
        """Load a file in the method's published (original code's) layout."""
        raise CirError(f"{file}: {self.name} reads only its own .safetensors checkpoints")

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


class FusedFeatureMethod(CIRMethod):
    """Methods whose query fuses raw image and text features (CLIP4Cir, BLIP4CIR).

    The cached representation is the raw image feature, targets are its normalised copy, and a
    query is `compose(raw reference, raw text)` (the sum or the method's Combiner).
    """

    combiner: nn.Module | None
    backbone: Any

    def compose(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Normalised query features from raw reference-image and text features, by
        `method.combining`: the Combiner when one is loaded ("auto") or required ("combiner"),
        else the element-wise sum."""
        mode = self.cfg.combining
        if mode == "combiner" and self.combiner is None:
            raise CirError(
                "method.combining = 'combiner' but no Combiner weights were loaded; pass "
                "--checkpoint <stage-II run or combiner .pt> (or set method.combining = 'auto')"
            )
        if self.combining_in_use() == "combiner":
            return self.combiner.combine_features(reference, text)
        return torch.nn.functional.normalize(reference + text, dim=-1)

    def combining_in_use(self) -> str:
        sum_only = self.cfg.combining == "sum"
        return "combiner" if self.combiner is not None and not sum_only else "sum"

    def add_combiner(self) -> None:
        """A fresh Combiner with the recipe's [combiner] sizes (stage II starts from it)."""
        cfg = self.recipe.combiner
        self.combiner = Combiner(
            self.backbone.feature_dim, cfg.projection_dim, cfg.hidden_dim, dropout=cfg.dropout
        )

    def prepare_for_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        if any(k.startswith("combiner.") for k in state) and self.combiner is None:
            self.add_combiner_for(state, source)

    def import_combiner(self, ckpt: dict[str, Any], file: Path) -> None:
        """A published `{'epoch', 'Combiner': state_dict}` file, strictly (sized from it)."""
        state = extract_state_dict(ckpt, "Combiner", file)
        if self.combiner is None:
            self.add_combiner_for({f"combiner.{k}": v for k, v in state.items()}, str(file))
        load_state_dict_strict(self.combiner, state, str(file))

    def add_combiner_for(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A Combiner sized from the `combiner.*` tensors of `state` (eval mode)."""
        sub = {
            k.removeprefix("combiner."): v for k, v in state.items() if k.startswith("combiner.")
        }
        d, p, h = infer_combiner_dims(sub, source)
        if d != self.backbone.feature_dim:
            raise CirError(
                f"{source}: Combiner for {d}-d features, but this backbone gives "
                f"{self.backbone.feature_dim}-d features"
            )
        self.combiner = Combiner(d, p, h, dropout=self.recipe.combiner.dropout).to(self.device)
        self.combiner.eval()

    def image_representation(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_images(pixels).float()

    def queries_from_representation(
        self, reference: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        text = self.encode_texts(texts).float()
        return self.compose(reference.to(text.device).float(), text)

    def targets_from_representation(self, representation: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(representation.float(), dim=-1)

    def single_modality_queries(
        self, reference: torch.Tensor, texts: list[Any]
    ) -> dict[str, torch.Tensor]:
        # The raw image and text features share the backbone's contrastive space, so either one
        # normalised is a query against the normalised image targets.
        normalize = torch.nn.functional.normalize
        return {
            "image": self.targets_from_representation(reference.to(self.device)),
            "text": normalize(self.encode_texts(texts).float(), dim=-1),
        }
