"""Shared fixtures: tiny models so every test runs in well under a second on a busy CPU."""

from __future__ import annotations

import pytest
import torch

from vit_core import ViTClassifier

TINY = dict(image_size=16, patch_size=4, emb_size=32, depth=2, n_heads=4, mlp_ratio=2.0, dropout=0.0,
            n_classes=10)


def make_tiny(seed: int = 0, **overrides) -> ViTClassifier:
    """A tiny ViT with sharper-than-init attention (scaled q/k weights), so maps are not flat."""
    torch.manual_seed(seed)
    model = ViTClassifier(**{**TINY, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.in_proj_weight.mul_(4.0)
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def tiny_model() -> ViTClassifier:
    return make_tiny()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_data(tmp_path):
    """A tiny generated ImageFolder with train/ and test/ (two colour classes)."""
    from toys import make_image_folder

    return make_image_folder(tmp_path / "data")
