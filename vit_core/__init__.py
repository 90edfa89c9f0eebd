"""vit_core: a small Vision Transformer for CIFAR-10 and the tools to see what it attends to.

The command-line tools live in `vit_core.cli` (`python -m vit_core.cli.explain`, `.evaluate`,
`.faithfulness`, `.anatomy`, `.space`, `.train`; installed as `vit-explain` and so on); this package
only holds the library.
"""

from .adapters import adapt, load_model
from .checkpoints import CheckpointError, load_checkpoint
from .images import ImageError, read_image
from .layout import TokenLayout, cls_patch_map
from .model import CIFAR10_CLASSES, PRESETS, CheckpointMismatchError, ViTClassifier, patchify
from .preprocessing import normalize, preprocess, to_model_pixels
from .explanation import Explanation, MapCache, explain
from .methods import METHODS, attribute
from .rollout import HEAD_FUSIONS, attention_rollout, discard_weakest, fuse_heads, gradient_rollout, token_map

__all__ = [
    "TokenLayout", "adapt", "load_model", "METHODS", "attribute", "MapCache",
    "CheckpointError", "load_checkpoint", "ImageError", "read_image",
    "CIFAR10_CLASSES", "PRESETS", "CheckpointMismatchError", "ViTClassifier",
    "normalize", "patchify", "preprocess", "to_model_pixels",
    "HEAD_FUSIONS", "Explanation", "attention_rollout", "cls_patch_map", "discard_weakest", "explain",
    "fuse_heads", "gradient_rollout", "token_map",
]
