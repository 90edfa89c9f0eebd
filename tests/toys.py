"""Builders for the model/data/training tests: a tiny ViT and a tiny generated ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(seed: int = 0, **overrides) -> ViTClassifier:
    torch.manual_seed(seed)
    kwargs = dict(image_size=32, patch_size=4, emb_size=32, depth=2, n_heads=4, mlp_ratio=2.0,
                  dropout=0.0, n_classes=10)
    kwargs.update(overrides)
    return ViTClassifier(**kwargs).eval()


def make_image_folder(root: Path, classes=("blue", "red"), per_class: int = 48, seed: int = 0,
                      size: int = 32) -> Path:
    """A learnable toy dataset: each class has its own dominant colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = {0: (40, 60, 200), 1: (200, 50, 40), 2: (40, 190, 60)}
    for split, n in (("train", per_class), ("test", max(4, per_class // 4))):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.array(colours[label % 3], dtype=np.float32) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root
