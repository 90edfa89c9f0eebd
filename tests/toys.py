"""Builders for the tests: the tiny ViT and a tiny generated ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier

ROOT = Path(__file__).resolve().parents[1]


# The one tiny ViT of the test suite: a few ms per forward pass on a busy CPU.
TINY = dict(image_size=32, patch_size=4, emb_size=32, depth=2, n_heads=4, mlp_ratio=2.0, dropout=0.0,
            n_classes=10)


def tiny_vit(seed: int = 0, sharpen: bool = False, **overrides) -> ViTClassifier:
    """A tiny ViT in eval mode, the same for the same seed and settings (`overrides` go to the
    constructor). With `sharpen`, attention and logits are sharper than at init (q/k weights scaled,
    larger position, CLS and head weights), so maps and class scores are not flat."""
    torch.manual_seed(seed)
    model = ViTClassifier(**{**TINY, **overrides})
    if sharpen:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.in_proj_weight.mul_(4.0)
            model.pos_embed.normal_(0, 0.5)
            model.cls_token.normal_(0, 0.5)
            model.head.weight.normal_(0, 0.5)
    return model.eval()


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
