"""vit_core: a small Vision Transformer for CIFAR-10 and the tools to see what it attends to."""

from .model import (
    CIFAR10_CLASSES,
    PRESETS,
    CheckpointMismatchError,
    ViTClassifier,
    load_image,
    normalize,
    patchify,
    preprocess,
    to_model_pixels,
)
from .rollout import (
    HEAD_FUSIONS,
    Explanation,
    attention_rollout,
    cls_patch_map,
    discard_weakest,
    explain,
    fuse_heads,
    gradient_rollout,
    token_map,
)

__all__ = [
    "CIFAR10_CLASSES", "PRESETS", "CheckpointMismatchError", "ViTClassifier", "load_image",
    "normalize", "patchify", "preprocess", "to_model_pixels",
    "HEAD_FUSIONS", "Explanation", "attention_rollout", "cls_patch_map", "discard_weakest", "explain",
    "fuse_heads", "gradient_rollout", "token_map",
]
