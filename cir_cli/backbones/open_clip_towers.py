"""CLIP towers from open_clip: built-in architectures by name + pretrained tag, or local weights.

`pretrained` is either an open_clip tag for the architecture (`RN50x4` + `openai`,
`ViT-L-14` + `openai`, `ViT-bigG-14` + `laion2b_s39b_b160k`), or a local file: a plain
state dict (`.pt`/`.bin`/`.safetensors`, open_clip or OpenAI key names) or a CLIP4Cir
fine-tuned checkpoint (`{'epoch', 'CLIP': state_dict}`, spec 7). Local files are loaded with
`weights_only=True` and strictly.

The configs in `configs/` (`cir-tiny`, `cir-tiny-rn`) are registered with open_clip at import:
random-initialised tiny CLIPs for tests and the toy recipe, loaded through the same code path
as the real models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
from torch import nn

from cir_cli.cache import memoised_fingerprint
from cir_cli.checkpoints import load_state_dict_strict, load_torch_checkpoint
from cir_cli.errors import CirError
from cir_cli.weights import missing_hint

if TYPE_CHECKING:
    from cir_cli.config import OpenClipBackboneConfig

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


def _read_local_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = load_torch_checkpoint(path)
    # CLIP4Cir stage-I files keep the state dict under the class name (spec 7).
    for key in ("CLIP", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CirError(f"{path}: expected a state dict of tensors (or {{'CLIP': state_dict}})")
    return state


def load_clip_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load an OpenAI / open_clip CLIP state dict (e.g. CLIP4Cir's and CaLa's
    `{'CLIP': ...}` files) into an open_clip model."""
    state = dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    # OpenAI files carry these three scalars; open_clip keeps them out of the state dict.
    for extra in ("input_resolution", "context_length", "vocab_size"):
        state.pop(extra, None)
    load_state_dict_strict(model, state, source, ignore=["attn_mask"])


class OpenClipBackbone(nn.Module):
    """An open_clip CLIP model with the backbone surface the methods use."""

    def __init__(self, model: nn.Module, tokenizer, arch: str, source: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.source = source

    @classmethod
    def from_config(cls, config: OpenClipBackboneConfig) -> OpenClipBackbone:
        if config.arch not in open_clip.list_models():
            raise CirError(
                f"backbone.arch '{config.arch}' is not an open_clip architecture "
                "(see open_clip.list_models(); tiny test configs: cir-tiny, cir-tiny-rn)"
            )
        pretrained = config.pretrained
        local = Path(pretrained).expanduser() if pretrained else None
        if pretrained and (local.exists() or "/" in pretrained or local.suffix):
            if not local.is_file():
                raise CirError(
                    f"backbone.pretrained: weights file not found: {local}"
                    + missing_hint(str(local))
                )
            model = open_clip.create_model(config.arch, pretrained=None)
            load_clip_state(model, _read_local_weights(local), str(local))
            source = str(local)
        elif pretrained:
            tags = open_clip.list_pretrained_tags_by_model(config.arch)
            if pretrained not in tags:
                known = ", ".join(tags) or "none"
                raise CirError(
                    f"backbone.pretrained '{pretrained}' is neither a local file nor a tag of "
                    f"{config.arch} (tags: {known})"
                )
            try:
                model = open_clip.create_model(config.arch, pretrained=pretrained)
            except Exception as exc:  # download failures come as many exception types
                raise CirError(
                    f"could not fetch {config.arch}/{pretrained} weights ({type(exc).__name__}); "
                    "offline, download them once and set backbone.pretrained to the file path"
                ) from None
            source = f"{config.arch}/{pretrained}"
        else:
            # open_clip logs a root-level warning for random init; here it is what was asked.
            import logging

            root_logger = logging.getLogger()
            level = root_logger.level
            root_logger.setLevel(logging.ERROR)
            try:
                model = open_clip.create_model(config.arch, pretrained=None)
            finally:
                root_logger.setLevel(level)
            source = f"{config.arch}/random-init"
        tokenizer = open_clip.get_tokenizer(config.arch)
        model.eval()
        return cls(model, tokenizer, config.arch, source)

    # -- backbone surface ------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def feature_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection")
            else int(self.model.embed_dim)
        )

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        # open_clip's tokenizer truncates to the context length (the seeds' validation did
        # not, and crashed on long captions: spec bug 16).
        return self.tokenizer(texts)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) projected image features, (B, D)."""
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) projected text features, (B, D)."""
        return self.model.encode_text(tokens)

    def encode_image_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected global (B, D), layer-4 map before the attention pool (B, C, H, W)).

        ResNet towers only (RN50x4: (B, 2560, 9, 9) at 288 px). The map is the attention pool's
        input, captured by a forward pre-hook during open_clip's own `encode_image`: the global
        feature is exactly encode_image's, and no library code is patched (CaLa edits CLIP's
        `ModifiedResNet.forward`).
        """
        pool = getattr(self.model.visual, "attnpool", None)
        if pool is None:
            raise CirError(
                f"backbone.arch '{self.arch}': CaLa's CLIP variant needs a ResNet image tower "
                "with an attention pool (RN50x4, cir-tiny-rn)"
            )
        captured: list[torch.Tensor] = []
        handle = pool.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            features = self.model.encode_image(pixels)
        finally:
            handle.remove()
        return features, captured[0]

    def encode_text_with_sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected global (B, D), ln_final token sequence (B, L, W) incl. padding positions).

        The sequence is ln_final's output, captured by a forward hook during open_clip's own
        `encode_text` (CaLa edits CLIP's `encode_text` to return it).
        """
        captured: list[torch.Tensor] = []
        handle = self.model.ln_final.register_forward_hook(
            lambda _m, _args, out: captured.append(out)
        )
        try:
            features = self.model.encode_text(tokens)
        finally:
            handle.remove()
        return features, captured[0]

    def map_shape(self) -> tuple[int, int]:
        """(channels C, positions H*W) of `encode_image_with_map`'s map, from the pool's size."""
        pos = self.model.visual.attnpool.positional_embedding
        return int(pos.shape[1]), int(pos.shape[0]) - 1

    def image_fingerprint(self) -> str:
        """Content hash of the image tower (memoised while its weights are unchanged)."""
        return memoised_fingerprint(self.model.visual)

    def image_cache_key(self, preprocessing: str) -> str:
        """Cache key of the raw projected image features (`encode_image`): CLIP4Cir and CaLa
        share the entries."""
        return f"clip-image-{self.arch}-{self.image_fingerprint()}-{preprocessing}"

    def image_module(self) -> nn.Module:
        return self.model.visual

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.model.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        visual = {id(p) for p in self.model.visual.parameters()}
        # logit_scale is CLIP's own temperature; CIR methods use a fixed scale, so it is left out.
        return [
            p
            for name, p in self.model.named_parameters()
            if id(p) not in visual and name != "logit_scale"
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
