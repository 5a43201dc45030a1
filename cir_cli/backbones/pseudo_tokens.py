"""Pseudo-token injection into CLIP text towers (spec lincir_searle_circo.md 1.4).

A prompt such as "a photo of $ that {caption}" is tokenised piece by piece around its
placeholders: the pieces are BPE-encoded separately and the placeholder id (259, the CLIP BPE
token `$</w>`, asserted at start-up) is put between them. Because CLIP's tokenizer splits words
before BPE, this gives exactly the ids of the whole prompt, and we know which positions are
placeholders: a literal `$` inside a caption stays an ordinary token (LinCIR would have replaced
it too; spec bug 9).

The placeholder embeddings are replaced by a forward hook on the text tower's token-embedding
module that overwrites its output at those positions with the given vectors (every occurrence
in a row gets that row's vector, as LinCIR). The tower's own forward then runs unchanged:
positional embeddings, causal mask, final LayerNorm, EOT pooling and projection. No private
encoder internals are called, so this works across transformers 4.x/5.x and for open_clip
(whose `encode_text` calls `model.token_embedding` once).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cir_cli.errors import CirError

PLACEHOLDER = "$"
PLACEHOLDER_ID = 259  # "$</w>" in CLIP's BPE vocabulary
# How training captions mark masked phrases (LinCIR's "[$]" special token, spec 1.6).
MASK_MARKER = "[$]"


def check_placeholder_id(tokenizer: Any) -> int:
    """The BPE id of a standalone `$`; CirError unless it is 259 (the CLIP BPE vocabulary)."""
    ids = list(tokenizer.encode(PLACEHOLDER))
    if ids != [PLACEHOLDER_ID]:
        raise CirError(
            f"the text tokenizer encodes '$' as {ids}, expected [{PLACEHOLDER_ID}] (CLIP BPE); "
            "pseudo-token methods need a CLIP BPE tokenizer"
        )
    return PLACEHOLDER_ID


def tokenize_pieces(
    tokenizer: Any, texts: Sequence[Sequence[str]], context_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and placeholder mask (B, L) of texts given as pieces around placeholders.

    `texts[b] = [p0, p1, ..., pk]` means p0 $ p1 $ ... $ pk. Layout: SOT, ids, EOT, zero padding
    (OpenAI `clip.tokenize`). Too long: cut to L and the last id set to EOT, as open_clip does;
    placeholders cut away are dropped from the mask (callers check that one remains).
    """
    length = int(context_length or tokenizer.context_length)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, pieces in enumerate(texts):
        tokens = [sot]
        positions = []
        for i, piece in enumerate(pieces):
            if i:
                positions.append(len(tokens))
                tokens.append(PLACEHOLDER_ID)
            if piece.strip():
                tokens.extend(tokenizer.encode(piece))
        tokens.append(eot)
        if len(tokens) > length:
            tokens = tokens[:length]
            tokens[-1] = eot
        ids[row, : len(tokens)] = torch.tensor(tokens)
        for pos in positions:
            if pos < length - 1:
                mask[row, pos] = True
    return ids, mask


def prompt_pieces(template: str, caption: str) -> list[str]:
    """Split a prompt template at its `$` placeholders and fill in {caption} in each piece."""
    return [piece.replace("{caption}", caption) for piece in template.split(PLACEHOLDER)]


def token_embedding_of(backbone: Any) -> nn.Embedding:
    """The token-embedding module of a backbone's text tower (HF CLIP or open_clip CLIP)."""
    getter = getattr(backbone, "token_embedding_module", None)
    if getter is not None:
        return getter()
    model = getattr(backbone, "model", None)
    module = getattr(model, "token_embedding", None)
    if isinstance(module, nn.Embedding):
        return module
    raise CirError(
        f"backbone {getattr(backbone, 'arch', backbone)!r} has no CLIP token embedding to inject "
        "pseudo tokens into (supported: hf_clip and open_clip CLIP text towers)"
    )


def token_width_of(backbone: Any) -> int:
    return int(token_embedding_of(backbone).embedding_dim)


@contextmanager
def injected(embedding: nn.Embedding, mask: torch.Tensor, vectors: torch.Tensor):
    """While active, `embedding`'s output at `mask` positions of row b is `vectors[b]`."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[:2] != mask.shape:
            raise RuntimeError(
                f"pseudo-token mask {tuple(mask.shape)} does not match the token embedding "
                f"output {tuple(output.shape[:2])}"
            )
        m = mask.to(output.device).unsqueeze(-1)
        v = vectors.to(device=output.device, dtype=output.dtype).unsqueeze(1)
        return torch.where(m, v, output)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_pseudo_tokens(
    backbone: Any, ids: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """Raw projected text features (B, d) of `ids` with the masked positions set to `vectors`.

    `vectors` (B, w) may require grad (LinCIR training back-propagates through the frozen
    tower into Phi).
    """
    if vectors.shape[0] != ids.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors for {ids.shape[0]} prompts")
    embedding = token_embedding_of(backbone)
    device = embedding.weight.device
    with injected(embedding, mask.to(device), vectors):
        return backbone.encode_text(ids.to(device))
