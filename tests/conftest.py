"""Shared fixtures: tiny models so every test runs in well under a second on a busy CPU."""

from __future__ import annotations

import pytest
import torch

from toys import make_image_folder, tiny_vit
from vit_core import ViTClassifier


@pytest.fixture
def tiny_model() -> ViTClassifier:
    """16x16 images in 4x4 patches of 4 px, sharpened (see `toys.tiny_vit`)."""
    return tiny_vit(image_size=16, sharpen=True)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_data(tmp_path):
    """A tiny generated ImageFolder with train/ and test/ (two colour classes)."""
    return make_image_folder(tmp_path / "data")
