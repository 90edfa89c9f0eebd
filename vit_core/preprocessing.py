"""From a picture to a model's input: resized whole to the model's input size with its own
resampling, then normalised with its mean and std. Any model with `image_size`, `mean` and `std`
(ours, or one from `vit_core.adapters`, which reads them from the model's own configuration)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from .images import to_rgb


def normalize(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised; the one place pixels become model inputs."""
    mean_t = torch.tensor(mean, device=batch_uint8.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=batch_uint8.device).view(1, -1, 1, 1) * 255
    return (batch_uint8.float() - mean_t) / std_t


def to_model_pixels(image: Image.Image, image_size: int,
                    resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """The RGB image the model actually sees: upright, alpha on white, resized to image_size with
    `resample` (a model's own is `resampling(model)`)."""
    image = to_rgb(image)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample, reducing_gap=3.0)
    return image


def resampling(model: nn.Module) -> Image.Resampling:
    """How images are resized for `model`: its own `resample` (an adapted model's pretrained
    config names one), else bicubic, as in our evaluation."""
    return getattr(model, "resample", Image.Resampling.BICUBIC)


def preprocess(images: Image.Image | Sequence[Image.Image], model: nn.Module) -> torch.Tensor:
    """One PIL image or a list -> normalised float tensor [B, 3, S, S], as in evaluation: resized
    whole (no crop) to the model's input size with its resampling, normalised with its mean and
    std. Any model with `image_size`, `mean` and `std` (ours, or one from `vit_core.adapters`)."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__}")
        pixels = to_model_pixels(image, model.image_size, resampling(model))
        arrays.append(torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8)
                      .view(model.image_size, model.image_size, 3))
    batch = torch.stack(arrays).permute(0, 3, 1, 2)
    return normalize(batch, model.mean, model.std)
