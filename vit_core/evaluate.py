"""Measure a classifier on uint8 images: batched, mirror-averaged class probabilities, accuracy,
per-class accuracy and the confusion matrix.

`predict_probs` is the one prediction path of evaluation and of training's validation;
`python -m vit_core.cli.evaluate` runs `evaluate` on the CIFAR-10 test split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .devices import autocast
from .model import ViTClassifier, eval_mode
from .preprocessing import normalize


@torch.no_grad()
def predict_probs(model: ViTClassifier, images_uint8: torch.Tensor, device: torch.device,
                  batch_size: int = 500, mirror: bool = True, amp: str = "off",
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Class probabilities [N, classes] on the CPU for uint8 images [N, C, H, W], `batch_size` at a
    time on `device`; with `mirror`, each averaged with its horizontally flipped image's. `amp` is
    "off", "bf16" or "auto" (see `devices.uses_bf16`). The model runs in eval mode and is left in
    the mode it came in. `progress`, if given, is called with each batch's image count."""
    if len(images_uint8) == 0:
        raise ValueError("predict_probs needs at least one image")
    out = []
    with eval_mode(model):
        for start in range(0, len(images_uint8), batch_size):
            x = normalize(images_uint8[start:start + batch_size].to(device), model.mean, model.std)
            with autocast(device, amp):
                probs = model(x).float().softmax(-1)
                if mirror:
                    probs = (probs + model(x.flip(-1)).float().softmax(-1)) / 2
            out.append(probs.cpu())
            if progress is not None:
                progress(len(probs))
    return torch.cat(out)


def evaluate(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             mirror: bool = True, progress: Callable[[int], None] | None = None) -> dict:
    """Accuracy, per-class accuracy (by class name), confusion matrix (rows: true class) and the
    number of images, for uint8 `images` [N, C, H, W] with int64 `labels` [N]; `progress` as in
    `predict_probs`."""
    probs = predict_probs(model, images, device, mirror=mirror, progress=progress)
    predicted = probs.argmax(-1)
    n_classes = probs.shape[-1]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1).float()
    return {
        "accuracy": (predicted == labels).float().mean().item(),
        "per_class": {name: per_class[i].item() for i, name in enumerate(model.class_names)},
        "confusion": confusion.tolist(),
        "n_images": len(labels),
        "mirror": mirror,
    }
