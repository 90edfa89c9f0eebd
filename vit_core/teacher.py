"""A small convolutional teacher whose predictions the ViT learns from (knowledge distillation).

A ViT trained from scratch on 45 000 images lacks the locality prior a CNN has built in; DeiT
(Touvron et al. 2021) showed that a CNN teacher's predictions pass some of that prior on. The
teacher never reaches the app: it only supplies training targets, and the shipped model stays a
plain patch ViT.

The network has the shape of the public CIFAR-10 speed-run CNNs (airbench, hlb-CIFAR10): a 3x3
stem, then three groups of conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU, a
global max-pool and a linear head. It trains in minutes with SGD (Nesterov), a one-cycle learning
rate, label smoothing, flip + 2-pixel crop and bf16 autocast, and predicts with mirror averaging.
`train_teacher` holds the whole recipe; its card records the command and accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .data import ImageTensors, augment
from .model import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, WEIGHTS_NAME, CheckpointMismatchError
from .preprocessing import normalize


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvTeacher(nn.Module, PyTorchModelHubMixin, library_name="vit-attention-explorer",
                  tags=["image-classification", "cnn", "cifar10", "distillation-teacher"], license="mit"):
    """Stem + three conv groups (each halves the resolution) + global max-pool + linear head."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), n_classes: int = 10,
                 class_names: Sequence[str] | None = CIFAR10_CLASSES,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.mean, self.std = tuple(mean), tuple(std)
        layers: list[nn.Module] = _conv_bn(3, widths[0])
        c_in = widths[0]
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(width), nn.GELU(), *_conv_bn(width, width)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, classes]."""
        features = self.features(images).amax(dim=(2, 3))
        return self.head(features)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only,
                         token, map_location="cpu", strict=True, **model_kwargs):
        # Local folders only and safetensors only: a teacher is a training input, never fetched.
        model = cls(**model_kwargs)
        weights_file = Path(model_id) / WEIGHTS_NAME
        if not weights_file.is_file():
            raise FileNotFoundError(f"teacher folder {model_id} holds no {WEIGHTS_NAME}")
        state = load_safetensors(str(weights_file), device=str(map_location))
        if set(state) != set(model.state_dict()):
            raise CheckpointMismatchError(f"{weights_file} is not a ConvTeacher with this config.json")
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def one_cycle(step: int, total: int, peak_at: float = 0.25) -> float:
    """Learning-rate factor: linear from 0.1 to 1 over the first `peak_at` of training, then to 0."""
    peak = max(1, int(total * peak_at))
    if step < peak:
        return 0.1 + 0.9 * step / peak
    return max(0.0, (total - step) / max(1, total - peak))


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, bf16: bool = True) -> torch.Tensor:
    """Teacher logits (fp32) for a normalised batch, under bf16 autocast where asked."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        return teacher(images.contiguous(memory_format=torch.channels_last)).float()


@torch.no_grad()
def teacher_accuracy(teacher: ConvTeacher, data: ImageTensors, device: torch.device | str = "cpu",
                     batch_size: int = 500) -> float:
    """Accuracy with mirror averaging, as the ViT is measured."""
    teacher.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start:start + batch_size].to(device), teacher.mean, teacher.std)
        probs = teacher_logits(teacher, x).softmax(-1) + teacher_logits(teacher, x.flip(-1)).softmax(-1)
        correct += (probs.argmax(-1).cpu() == data.labels[start:start + batch_size]).sum().item()
    return correct / len(data)


def train_teacher(train_set: ImageTensors, val_set: ImageTensors, out: str | Path, epochs: int = 10,
                  batch_size: int = 512, lr: float = 0.2, weight_decay: float = 5e-4,
                  label_smoothing: float = 0.2, widths: Sequence[int] = (64, 256, 256), seed: int = 0,
                  device: torch.device | str = "cpu", log=print) -> ConvTeacher:
    """Train the teacher on `train_set` (never the ViT's validation images, so the student's
    validation stays unseen by both) and save it with `save_pretrained` into `out`."""
    torch.manual_seed(seed)
    device = torch.device(device)
    model = ConvTeacher(widths, len(train_set.classes), train_set.classes)
    model = model.to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = max(1, len(train_set) // batch_size)
    total = epochs * steps_per_epoch
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_set), generator=generator)
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * one_cycle(epoch * steps_per_epoch + step, total)
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = augment(normalize(train_set.images[idx].to(device), model.mean, model.std), "crop", generator, pad=2)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), train_set.labels[idx].to(device), label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc = teacher_accuracy(model, val_set, device)
        minutes = (time.perf_counter() - start) / 60
        history.append({"epoch": epoch + 1, "val_acc": val_acc, "minutes": minutes})
        log(f"teacher epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} | val acc {val_acc:.4f} | {minutes:.1f} min")
    out = Path(out)
    model.eval().save_pretrained(out)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return model
