"""Training-task base classes the methods' stages share (engine/trainer.py runs the loop).

They sit beside the methods, not in the engine: they drive a method through the method
contract (methods/base.py); the trainer only sees the `TrainingTask` protocol. A task takes the
recipe sections it reads as arguments (data, eval, its stage section, the seed); the method's
`finetune_task` / `combiner_task` is the one place that picks them out of the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cir_cli.checkpoints import load_named_state, named_trainable_state
from cir_cli.data import (
    load_data_split,
    load_train_split,
    recipe_categories,
    train_caption_policy,
)
from cir_cli.data.training import training_text
from cir_cli.errors import CirError
from cir_cli.evaluation import compute_representations, eval_selection_metric, evaluate
from cir_cli.methods.base import CIRMethod
from cir_cli.progress import progress_bar
from cir_cli.runs import resolve_weights_file

if TYPE_CHECKING:
    from cir_cli.cache import FeatureCache
    from cir_cli.config import CombinerConfig, DataConfig, EvalConfig, FinetuneConfig


class TripletTrainingTask:
    """What every triplet-trained method stage shares: data, validation, checkpoint plumbing.

    Subclasses set `stage` and implement `dataset`/`gather`, `param_groups` (the optimizer and
    the schedule are the recipe's, engine/optim.py), `set_train_mode` and `compute_loss` (see
    engine/trainer.py `TrainingTask`).

    Arguments besides the model: `cfg`, the stage's own section ([finetune] or [combiner],
    read as `self.cfg`); `data` and `eval_cfg`, the [data] and [eval] sections; `seed`, the
    run's seed (training-text draws); `cache`, the recipe's feature cache; `recipe_record`, what
    the checkpoint records as its recipe (the whole recipe's `to_dict()`, saved as is).
    """

    stage = ""

    def __init__(
        self,
        model: CIRMethod,
        device: torch.device,
        cfg: FinetuneConfig | CombinerConfig,
        *,
        data: DataConfig,
        eval_cfg: EvalConfig,
        seed: int,
        cache: FeatureCache,
        recipe_record: dict[str, Any],
    ) -> None:

        self.model, self.device, self.cfg = model, device, cfg
        self.data, self.eval_cfg, self.seed = data, eval_cfg, seed
        self.recipe_record = recipe_record
        root = Path(data.root).expanduser()
        categories = recipe_categories(data.dataset, data.categories)
        self.split = load_train_split(data.dataset, root, categories, data.train_split)
        if any(t.target is None for t in self.split.triplets):
            raise CirError(f"{self.split.label}: training needs targets for every triplet")
        self.policy = train_caption_policy(self.split, data.train_caption_policy)
        self.val_splits = load_data_split(data, data.val_split or eval_cfg.split)
        self.cache = cache
        self.epoch = 0
        self.selection_metric = eval_selection_metric(eval_cfg, data.dataset)

    def num_samples(self) -> int:
        return len(self.split.triplets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def evaluate(self) -> dict[str, float]:
        cache = self.cache if self.model.image_cache_key() is not None else None
        result = evaluate(
            self.model,
            self.val_splits,
            cache=cache,
            batch_size=self.eval_cfg.batch_size,
            num_workers=self.data.num_workers,
            rank_chunk=self.eval_cfg.rank_chunk,
        )
        return result.metrics

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return named_trainable_state(self.model)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_named_state(self.model, state, "resume state")

    def checkpoint_metadata(self) -> dict:
        return {"stage": self.stage, "recipe": self.recipe_record}

    def train_image_features(
        self, lazy: bool = False, key: str | None = None, encode=None
    ) -> tuple[dict[str, int], torch.Tensor]:
        """Frozen image features of every training image, computed once through the cache.

        By default the method's `image_representation` under its `image_cache_key`, the
        entries evaluation uses too; a stage that needs more per image (CaLa-CLIP's layer-4
        maps) passes its own `key` and `encode`. `lazy=True` returns rows read on demand from
        the memory-mapped shards (large per-image tensors such as ViT tokens).
        """
        names = self.split.image_names()
        key = key or self.model.image_cache_key()

        def compute(chunk: list[str]) -> torch.Tensor:
            return compute_representations(
                self.model,
                chunk,
                self.split.image_paths,
                self.eval_cfg.batch_size,
                self.data.num_workers,
                description="encoding training images",
                encode=encode,
            )

        feats = self.cache.get_or_compute_images(
            key, names, self.split.image_paths, compute, lazy=lazy
        )
        return {n: i for i, n in enumerate(names)}, feats

    def index_triplet_rows(self, rows: dict[str, int]) -> None:
        """`ref_rows` / `tgt_rows`: each triplet's reference and target row in a feature table
        whose row of image name n is rows[n]."""
        self.ref_rows = torch.tensor([rows[t.reference] for t in self.split.triplets])
        self.tgt_rows = torch.tensor([rows[t.target] for t in self.split.triplets])

    @torch.no_grad()
    def encode_texts_once(self, texts: list[str]) -> torch.Tensor:
        """Frozen text features of `texts` in eval mode (cached by the caller)."""
        self.model.eval()
        out = []
        batch = self.eval_cfg.batch_size
        with progress_bar("encoding training texts", len(texts)) as advance:
            for start in range(0, len(texts), batch):
                out.append(self.model.encode_texts(texts[start : start + batch]).float().cpu())
                advance(len(out[-1]))
        return torch.cat(out)


class CachedRowsStage:
    """Mixin for stages that train on cached per-image rows: batches are gathered in the main
    process (no DataLoader). The default `gather` returns (reference rows, target rows,
    training texts) from `self.features` indexed by `index_triplet_rows`."""

    def dataset(self):
        return None

    def collate(self, items):
        return items

    def gather(self, indices: list[int]):
        idx = torch.tensor(indices)
        texts = [training_text(self.split, self.policy, self.seed, self.epoch, i) for i in indices]
        return self.features[self.ref_rows[idx]], self.features[self.tgt_rows[idx]], texts


class CombinerStage(CachedRowsStage):
    """Mixin for stage-II tasks: only the Combiner trains (Adam), on in-memory cached features.

    Mixed in before a TripletTrainingTask subclass (built with the [combiner] section as its
    `cfg`) that fills the cached feature tables its `gather` reads. `finetune` is the [finetune]
    section: its `checkpoint` names the stage-I weights the Combiner sits on.
    """

    def __init__(self, *args: Any, finetune: FinetuneConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finetune = finetune

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.combiner.parameters()), "lr": self.cfg.lr}]

    def set_train_mode(self) -> None:
        self.model.eval()
        self.model.combiner.train()  # dropout active; the frozen towers stay in eval

    def checkpoint_metadata(self) -> dict:
        """Also names the stage-I checkpoint, so the Combiner alone brings its encoders back."""
        meta = super().checkpoint_metadata()
        base = self.finetune.checkpoint
        if base:
            meta["base_checkpoint"] = str(resolve_weights_file(base).resolve())
        return meta
