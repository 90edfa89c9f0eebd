"""Where an explanation looks in a ViT's token sequence, and how a row of it becomes a patch grid.

A model the explorer explains has a `layout` (a `TokenLayout`): our own ViTClassifier one CLS token,
read; an adapted timm or Hugging Face ViT (`vit_core.adapters`) its own prefix tokens (CLS,
distillation, registers) and the rows its logits are computed from. The maps of `vit_core.rollout`
and `vit_core.attribution` read it here, without knowing the wrappers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """Where an explanation looks in the token sequence: `n_prefix_tokens` tokens (CLS, distillation,
    registers) come first and the patch tokens after them, row-major. `explained_tokens` are the
    prefix tokens whose rows are read (averaged when more than one); None reads the mean of the
    patch tokens' rows (models that average their patch tokens)."""

    n_prefix_tokens: int = 1
    explained_tokens: tuple[int, ...] | None = (0,)

    def __post_init__(self):
        if self.n_prefix_tokens < 0:
            raise ValueError(f"n_prefix_tokens must be >= 0, got {self.n_prefix_tokens}")
        if self.explained_tokens is not None and (
                not self.explained_tokens or not all(0 <= t < self.n_prefix_tokens for t in self.explained_tokens)):
            raise ValueError(f"explained_tokens {self.explained_tokens} must be prefix tokens "
                             f"in [0, {self.n_prefix_tokens}), or None for the mean of the patch tokens")


def token_layout(model: nn.Module) -> TokenLayout:
    """The layout of a model the explorer can explain (its `layout`); TypeError for any other."""
    layout = getattr(model, "layout", None)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"cannot explain a {type(model).__name__}; pass it through vit_core.adapters.adapt "
                        f"first (vit_core.adapters.SUPPORTED says which models it takes)")
    return layout


def cls_patch_map(matrix: torch.Tensor, layout: TokenLayout = TokenLayout()) -> torch.Tensor:
    """The explained row, patch columns of [..., T, T] as a square grid [..., g, g] (row-major
    patches). The default layout reads the CLS row (token 0) and the columns after it."""
    prefix, explained = layout.n_prefix_tokens, layout.explained_tokens
    if explained is None:  # a model that averages its patch tokens
        row = matrix[..., prefix:, :].mean(dim=-2)
    elif len(explained) == 1:
        row = matrix[..., explained[0], :]
    else:
        row = matrix[..., list(explained), :].mean(dim=-2)
    return patch_grid(row[..., prefix:])


def patch_grid(row: torch.Tensor) -> torch.Tensor:
    """Patch columns [..., N] -> [..., g, g]."""
    grid = math.isqrt(row.shape[-1])
    if grid * grid != row.shape[-1]:
        raise ValueError(f"{row.shape[-1]} patches do not form a square grid")
    return row.reshape(*row.shape[:-1], grid, grid)
