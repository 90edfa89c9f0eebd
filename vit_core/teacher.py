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

`WhitenedTeacher` is the stronger kind, with the rest of airbench94's ingredients (Jordan 2024,
"94% on CIFAR-10 in 3.29 seconds"): a 2x2 first convolution fixed to whiten image patches (from
their covariance's eigenvectors), BatchNorm with a frozen unit scale, dirac-initialised convs,
Nesterov SGD on a triangular schedule with a larger step for BatchNorm biases, label smoothing
0.2, reflect-padded 2-pixel translation with a flip that alternates every epoch, a lookahead
(EMA) of the weights, and mirror + 1-pixel-translate test-time averaging. `train_whitened_teacher`
holds that recipe. `TEACHERS` maps each kind to its class; a folder's config.json names its kind
(a folder without one is the original `ConvTeacher`).
"""

from __future__ import annotations

import json
import math
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


def _load_local(cls, *, model_id, map_location="cpu", **kwargs):
    """`from_pretrained` for a teacher: local folders only and safetensors only (a teacher is a
    training input, never fetched), strict keys."""
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_ARGUMENTS}
    model = cls(**model_kwargs)
    weights_file = Path(model_id) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"teacher folder {model_id} holds no {WEIGHTS_NAME}")
    state = load_safetensors(str(weights_file), device=str(map_location))
    if set(state) != set(model.state_dict()):
        raise CheckpointMismatchError(f"{weights_file} is not a {cls.__name__} with this config.json")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


_HUB_ARGUMENTS = {"revision", "cache_dir", "force_download", "local_files_only", "token", "strict", "proxies",
                  "resume_download"}


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

    TTA_LEVEL = 1  # mirror averaging

    @classmethod
    def _from_pretrained(cls, **kwargs):
        return _load_local(cls, **kwargs)


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
def tta_logits(teacher: nn.Module, images: torch.Tensor, level: int, bf16: bool = True) -> torch.Tensor:
    """Test-time averaged logits. Level 0: the images alone; 1: the mean over each image and its
    mirror; 2: half of level 1 plus a quarter each of level 1 for the images shifted one pixel
    up-left and down-right (reflected at the border), as airbench94 predicts."""
    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (teacher_logits(teacher, x, bf16) + teacher_logits(teacher, x.flip(-1), bf16))

    if level == 0:
        return teacher_logits(teacher, images, bf16)
    if level == 1:
        return mirrored(images)
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
    return 0.5 * mirrored(images) + 0.25 * (mirrored(up_left) + mirrored(down_right))


@torch.no_grad()
def teacher_accuracy(teacher: nn.Module, data: ImageTensors, device: torch.device | str = "cpu",
                     batch_size: int = 500, level: int | None = None) -> float:
    """Accuracy with the teacher kind's own test-time averaging (`TTA_LEVEL`) unless `level` is given."""
    teacher.eval()
    level = teacher.TTA_LEVEL if level is None else level
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start:start + batch_size].to(device), teacher.mean, teacher.std)
        predicted = tta_logits(teacher, x, level).argmax(-1).cpu()
        correct += (predicted == data.labels[start:start + batch_size]).sum().item()
    return correct / len(data)


def train_teacher(train_set: ImageTensors, val_set: ImageTensors, out: str | Path, epochs: int = 10,
                  batch_size: int = 512, lr: float = 0.2, weight_decay: float = 5e-4,
                  label_smoothing: float = 0.2, widths: Sequence[int] = (64, 256, 256), seed: int = 0,
                  device: torch.device | str = "cpu", bf16: bool = True, log=print) -> ConvTeacher:
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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


# ----------------------------------------------------------------------------------------------
# The whitened teacher: airbench94's network and training recipe.

LOGIT_SCALE = 1 / 9  # airbench's fixed output scale: with label smoothing, keeps early logits small


def whitening_init_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Fix `conv`'s filters so that its first half of output channels whitens the k x k patches of
    `images` (normalised, [N, C, H, W]) and its second half is their negation (so the GELU after
    it keeps both signs of every direction).

    Each filter is an eigenvector of the patches' second-moment matrix over the square root of its
    eigenvalue plus `eps` (which keeps near-empty directions from being blown up): the whitened
    channels then have second moments diag(eigenvalue / (eigenvalue + eps)), almost the identity.
    """
    channels, (kh, kw) = images.shape[1], conv.kernel_size
    if conv.in_channels != channels or conv.out_channels != 2 * channels * kh * kw:
        raise ValueError(f"a {kh}x{kw} whitening conv of {channels}-channel images needs {channels} input and "
                         f"{2 * channels * kh * kw} output channels, not {conv.in_channels} and {conv.out_channels}")
    patches = images.double().unfold(2, kh, 1).unfold(3, kw, 1)  # [N, C, H', W', kh, kw]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kh * kw)
    moment = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending: the strongest direction last
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(-1, channels, kh, kw)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()


def _dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 conv whose first c_in filters start as the identity: an implicit residual at init."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:c_in])
    return conv


def _scale_free_bn(width: int) -> nn.BatchNorm2d:
    """BatchNorm with its scale frozen at 1 (only the bias learns) and fast running statistics."""
    norm = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


def _whitened_group(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_dirac_conv(c_in, c_out), nn.MaxPool2d(2), _scale_free_bn(c_out), nn.GELU(),
                         _dirac_conv(c_out, c_out), _scale_free_bn(c_out), nn.GELU())


class WhitenedTeacher(nn.Module, PyTorchModelHubMixin, library_name="vit-attention-explorer",
                      tags=["image-classification", "cnn", "cifar10", "distillation-teacher"], license="mit"):
    """airbench94's network: a fixed patch-whitening 2x2 conv (+ GELU), three conv groups (each
    halves the resolution), a global max-pool and a linear head with a fixed 1/9 scale."""

    TTA_LEVEL = 2  # mirror + 1-pixel translations

    def __init__(self, widths: Sequence[int] = (64, 256, 256), n_classes: int = 10,
                 class_names: Sequence[str] | None = CIFAR10_CLASSES,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 whiten_kernel: int = 2, kind: str = "whitened"):
        super().__init__()
        if kind != "whitened":
            raise ValueError(f"a WhitenedTeacher's config names kind 'whitened', not {kind!r}")
        self.kind = kind  # written to config.json, so `load_teacher` knows the class
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.mean, self.std = tuple(mean), tuple(std)
        self.whiten = nn.Conv2d(3, 2 * 3 * whiten_kernel ** 2, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        groups, c_in = [], self.whiten.out_channels
        for width in widths:
            groups.append(_whitened_group(c_in, width))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c_in, n_classes, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, classes]."""
        features = self.groups(F.gelu(self.whiten(images))).amax(dim=(2, 3))
        return self.head(features) * LOGIT_SCALE

    @classmethod
    def _from_pretrained(cls, **kwargs):
        return _load_local(cls, **kwargs)


TEACHERS: dict[str, type[nn.Module]] = {"conv": ConvTeacher, "whitened": WhitenedTeacher}


def load_teacher(folder: str | Path) -> nn.Module:
    """The trained teacher in `folder`, of the kind its config.json names (none: `ConvTeacher`)."""
    config_file = Path(folder) / "config.json"
    kind = json.loads(config_file.read_text()).get("kind", "conv") if config_file.is_file() else "conv"
    if kind not in TEACHERS:
        raise ValueError(f"{config_file} names teacher kind {kind!r}; known kinds: {sorted(TEACHERS)}")
    return TEACHERS[kind].from_pretrained(str(folder))


class Lookahead:
    """airbench's lookahead: a running average of the weights (and BatchNorm statistics) that the
    network is reset to at every update, so both become decay * average + (1 - decay) * current."""

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        state = model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1 - decay)
            state[key].copy_(average)


def triangle(progress: float, start: float = 0.2, peak: float = 1.0, end: float = 0.07,
             peak_at: float = 0.23) -> float:
    """Learning-rate factor at `progress` (0 to 1 of the run): linear from `start` to `peak` over
    the first `peak_at`, then linear to `end` at the finish."""
    if progress < peak_at:
        return start + (peak - start) * progress / peak_at
    return peak + (end - peak) * min(1.0, (progress - peak_at) / (1 - peak_at))


def flip_translate(images: torch.Tensor, flip: torch.Tensor, pad: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror the images where `flip` [B] is true, then shift each by a random whole number of
    pixels in [-pad, pad] both ways, filling the border by reflection."""
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    if pad == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    top, left = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator).to(images.device)
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (left[:, None] + torch.arange(width, device=images.device))[:, None, :]
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    return padded[batch_index, :, rows, cols].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]


def _whitened_optimizer(model: WhitenedTeacher, batch_size: int, lr: float, momentum: float,
                        weight_decay: float, bias_scaler: float) -> torch.optim.SGD:
    """airbench's decoupled hyper-parameters for Nesterov SGD on a summed loss: `lr` and
    `weight_decay` per 1024 images, the step divided by momentum's gain 1 + 1 / (1 - momentum),
    and BatchNorm biases stepped `bias_scaler` times further with the same absolute decay."""
    gain = 1024 * (1 + 1 / (1 - momentum))
    step, decay = lr / gain, weight_decay * batch_size / gain
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for n, p in named if n.endswith(".bias") and n != "whiten.bias"]
    others = [p for n, p in named if not (n.endswith(".bias") and n != "whiten.bias")]
    groups = [dict(params=norm_biases, lr=step * bias_scaler, weight_decay=decay / (step * bias_scaler)),
              dict(params=others, lr=step, weight_decay=decay / step)]
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.SGD(groups, momentum=momentum, nesterov=True)


def _whitened_step(model: WhitenedTeacher, optimizer: torch.optim.SGD, images: torch.Tensor,
                   labels: torch.Tensor, label_smoothing: float, bf16: bool) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images.contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() / len(labels)


def train_whitened_teacher(train_set: ImageTensors, val_set: ImageTensors, out: str | Path, epochs: int = 10,
                           batch_size: int = 1024, lr: float = 11.5, momentum: float = 0.85,
                           weight_decay: float = 0.0153, bias_scaler: float = 64.0, label_smoothing: float = 0.2,
                           widths: Sequence[int] = (64, 256, 256), seed: int = 0, time_budget_min: float | None = None,
                           device: torch.device | str = "cpu", bf16: bool = True, log=print) -> WhitenedTeacher:
    """Train a `WhitenedTeacher` with airbench94's recipe on `train_set` (never the ViT's
    validation images) and save it with `save_pretrained` into `out`.

    The schedule runs on progress through the `epochs`, or through `time_budget_min` of wall clock
    where that is further along, so a slowed-down run still anneals and stops in time. airbench's
    stages at 3 of its 10 epochs (whitening bias frozen, lookahead on) come at 30 % progress.
    """
    torch.manual_seed(seed)
    device, generator = torch.device(device), torch.Generator().manual_seed(seed)
    model = WhitenedTeacher(widths, len(train_set.classes), train_set.classes)
    whitening_init_(model.whiten, normalize(train_set.images[:5000], model.mean, model.std))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = _whitened_optimizer(model, batch_size, lr, momentum, weight_decay, bias_scaler)
    steps_per_epoch = max(1, len(train_set) // batch_size)
    total, budget_s = epochs * steps_per_epoch, (time_budget_min or math.inf) * 60
    flips = torch.rand(len(train_set), generator=generator) < 0.5  # then all flip together every other epoch
    lookahead, step, progress, history, start = None, 0, 0.0, [], time.perf_counter()
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        for batch in range(steps_per_epoch):
            progress = max(step / total, (time.perf_counter() - start) / budget_s)
            if progress >= 1:
                break
            model.whiten.bias.requires_grad_(progress < 0.3)
            idx = order[batch * batch_size:(batch + 1) * batch_size]
            x = normalize(train_set.images[idx].to(device), model.mean, model.std)
            x = flip_translate(x, flips[idx] ^ bool(epoch % 2), 2, generator)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * triangle(progress)
            loss = _whitened_step(model, optimizer, x, train_set.labels[idx].to(device), label_smoothing, bf16)
            step += 1
            if progress >= 0.3 and step % 5 == 0:
                if lookahead is None:
                    lookahead = Lookahead(model)
                else:  # average harder as training ends
                    lookahead.update(model, decay=0.95 ** 5 * progress ** 3)
        if lookahead is not None:
            lookahead.update(model, decay=1.0)  # the epoch ends on the averaged weights
        last = epoch == epochs - 1 or progress >= 1
        val_acc = teacher_accuracy(model, val_set, device, level=None if last else 0)
        minutes = (time.perf_counter() - start) / 60
        history.append({"epoch": epoch + 1, "steps": step, "val_acc": val_acc, "minutes": minutes,
                        "train_loss": loss.item(), "test_time_averaging": last})
        log(f"teacher epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} | val acc {val_acc:.4f}"
            f"{' (test-time averaged)' if last else ''} | {minutes:.1f} min")
        if last:
            break
    out = Path(out)
    model.eval().save_pretrained(out)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return model


TRAINERS = {"conv": train_teacher, "whitened": train_whitened_teacher}
