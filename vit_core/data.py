"""CIFAR-10 held in memory as uint8 tensors, and augmentation of whole batches with tensor ops.

Two sources: a local ImageFolder root with `train/` and `test/` (one folder per class), or
torchvision's CIFAR-10 (downloaded only when asked). Images are decoded once; the training loop
then only indexes tensors, so no per-image PIL work happens while training.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .images import ImageError, decode_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"}


class DataError(RuntimeError):
    """Data that cannot be found or read; the message says what to pass instead."""


@dataclass
class ImageTensors:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.images[indices], self.labels[indices], self.classes)


def _read_rgb(path: Path, size: int | None) -> torch.Tensor:
    try:
        image = decode_rgb(path)  # the app's and explain command's decoding, minus their size limits
    except ImageError as error:
        raise DataError(f"could not read the image {path}: {error}") from error
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1)


def load_image_folder(root: str | Path, image_size: int | None = 32, limit: int | None = None,
                      seed: int = 0) -> ImageTensors:
    """Decode an ImageFolder tree (root/<class>/<image>) into uint8 tensors.

    `limit` keeps a random subset of that many images (same `seed`, same subset)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image>.jpg")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"{root} has class folders but no images in them")
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if limit is not None and limit < len(files):
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        keep = keep.sort().values
        files = [files[i] for i in keep.tolist()]
        labels_t = labels_t[keep]
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda p: _read_rgb(p, image_size), files, chunksize=256))
    except (OSError, ValueError) as error:
        raise DataError(f"could not read an image under {root}: {error}") from error
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise DataError(f"images under {root} differ in size {sorted(shapes)}; pass an image size")
    return ImageTensors(torch.stack(images), labels_t, classes)


def _load_torchvision_cifar10(root: Path, train: bool, download: bool) -> ImageTensors:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise DataError(str(error)) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def load_split(data: str | Path, split: str, download: bool = False, limit: int | None = None,
               seed: int = 0) -> ImageTensors:
    """Load the `train` or `test` split of CIFAR-10 from `data`.

    `data` is either an ImageFolder root holding `train/` and `test/`, or a torchvision CIFAR-10
    root (`cifar-10-batches-py/` inside, or downloaded there when `download` is set).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(data).expanduser()
    if (root / split).is_dir():
        tensors = load_image_folder(root / split, limit=limit, seed=seed)
    elif (root / "cifar-10-batches-py").is_dir() or download:
        try:
            tensors = _load_torchvision_cifar10(root, split == "train", download)
        except OSError as error:  # no network, no permission
            raise DataError(f"could not download CIFAR-10 into {root}: {error}. Pass --data with a "
                            f"local folder that holds train/ and test/ ImageFolder trees.") from error
        if limit is not None and limit < len(tensors):
            keep = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(seed))[:limit]
            tensors = tensors.subset(keep.sort().values)
    else:
        raise DataError(
            f"no CIFAR-10 found at {root}: expected {root}/{split}/<class>/*.jpg (an ImageFolder "
            f"tree) or {root}/cifar-10-batches-py (torchvision). Pass --data DIR pointing at one, "
            f"or add --download to fetch CIFAR-10 with torchvision.")
    return tensors


def validation_count(train: ImageTensors, val_size: float) -> int:
    """How many of `train`'s images `split_validation` holds out for `val_size`: a share below 1
    (at least one image per class that has two), else a count."""
    if val_size >= 1:
        return int(val_size)
    counts = torch.bincount(train.labels, minlength=len(train.classes))
    return max(round(val_size * len(train)), int((counts >= 2).sum()))


def split_validation(train: ImageTensors, val_size: float, seed: int = 0) -> tuple[ImageTensors, ImageTensors]:
    """Hold images out of train for validation, with a fixed seed so every run validates on the same.

    `val_size` below 1 is a share of the images, else a count. The split is a random draw in which
    every class with two or more images gets at least one validation image: where the draw misses
    a class, one of its images trades places with an image of the class the draw favoured most.
    """
    n = len(train)
    counts = torch.bincount(train.labels, minlength=len(train.classes))
    n_val = validation_count(train, val_size)
    if not 0 < n_val < n:
        raise ValueError(f"validation size {val_size:g} gives {n_val} of {n} images; it must leave 1 to "
                         f"{n - 1} images (pass --val-size as a share below 1, e.g. 0.1, or a smaller count)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val, rest = order[:n_val], order[n_val:]
    labels = train.labels.tolist()
    for cls in (c for c in range(len(counts)) if counts[c] >= 2):
        in_val = [labels[i] for i in val]
        if cls in in_val:
            continue
        favoured = max(set(in_val), key=in_val.count)
        if in_val.count(favoured) < 2:
            break  # fewer validation images than classes: nothing left to trade
        out_of_val = max(i for i, label in zip(val, in_val) if label == favoured)
        into_val = next(i for i in rest if labels[i] == cls)
        val[val.index(out_of_val)], rest[rest.index(into_val)] = into_val, out_of_val
    return train.subset(torch.tensor(sorted(rest))), train.subset(torch.tensor(sorted(val)))


# ----------------------------------------------------------------------------------------------
# Batch augmentation. Each image gets its own affine transform, applied to the whole batch by
# one `grid_sample` call: a horizontal flip is a negative x scale, a crop a scale + translation.

AUGMENTATIONS = ("crop", "rrc", "none")


def _sample(grid_theta: torch.Tensor, images: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(grid_theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def augment(images: torch.Tensor, policy: str, generator: torch.Generator | None = None,
            pad: int = 4, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random flip plus a random crop for a float batch [B, C, H, W] (already normalised, so the
    zero padding of pad-and-crop is the dataset mean).

    - "crop": pad by `pad` pixels and crop back at a random integer offset (exact pixel shifts).
    - "rrc": the report's RandomResizedCrop (area `scale`, aspect `ratio`) resized back, bilinear.
    - "none": flip only.
    """
    if policy not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {policy!r}; choose one of {AUGMENTATIONS}")
    batch, _, height, width = images.shape
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator).to(device) * (high - low) + low

    flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
    sx = torch.where(flip, -1.0, 1.0)
    sy = torch.ones(batch, device=device)
    tx = torch.zeros(batch, device=device)
    ty = torch.zeros(batch, device=device)
    mode = "nearest"
    if policy == "crop":
        # An integer shift of k pixels is 2k/size in normalised coordinates.
        tx = torch.randint(-pad, pad + 1, (batch,), generator=generator).to(device) * 2.0 / width
        ty = torch.randint(-pad, pad + 1, (batch,), generator=generator).to(device) * 2.0 / height
    elif policy == "rrc":
        area = uniform(*scale)
        aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
        crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
        tx = (uniform(0, 1) * 2 - 1) * (1 - crop_w)  # crop centre stays inside the image
        ty = (uniform(0, 1) * 2 - 1) * (1 - crop_h)
        sx = sx * crop_w
        sy = crop_h
        mode = "bilinear"
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    return _sample(theta, images, mode)


def _box_mask(top: torch.Tensor, bottom: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """[B, H, W] mask of one rectangle per image: rows [top, bottom), columns [left, right)."""
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    return ((ys >= top[:, None, None]) & (ys < bottom[:, None, None])
            & (xs >= left[:, None, None]) & (xs < right[:, None, None]))


def random_erase(images: torch.Tensor, p: float, generator: torch.Generator | None = None,
                 area: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) for a normalised batch [B, C, H, W]: with probability `p`
    an image gets one rectangle (`area` fraction of the image, aspect `ratio`) set to zero, which
    after normalisation is the dataset mean. A regulariser: the class must be read from what is left.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"erase probability must be in [0, 1], got {p}")
    if p == 0.0:
        return images
    batch, _, height, width = images.shape
    rand = lambda: torch.rand(batch, generator=generator)  # noqa: E731
    erase_area = (area[0] + rand() * (area[1] - area[0])) * height * width
    aspect = torch.exp(math.log(ratio[0]) + rand() * (math.log(ratio[1]) - math.log(ratio[0])))
    box_h = torch.sqrt(erase_area * aspect).round().clamp(1, height)
    box_w = torch.sqrt(erase_area / aspect).round().clamp(1, width)
    top = (rand() * (height - box_h + 1)).floor()
    left = (rand() * (width - box_w + 1)).floor()
    chosen = rand() < p
    mask = (_box_mask(top, top + box_h, left, left + box_w, height, width)
            & chosen[:, None, None]).to(images.device)
    return images.masked_fill(mask[:, None], 0.0)


def cutmix(images: torch.Tensor, p: float, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019) for a batch [B, C, H, W]: with probability `p` an image gets a
    rectangle pasted from its neighbour in the batch (the batch rolled by one). The box covers a
    uniform random share of the image, clipped at the borders.

    Returns the mixed batch and, per image, the share of pixels still its own (1 where nothing was
    pasted); the loss gives the image's label that weight and the neighbour's label the rest.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix probability must be in [0, 1], got {p}")
    batch, _, height, width = images.shape
    if p == 0.0:
        return images, torch.ones(batch, device=images.device)
    rand = lambda: torch.rand(batch, generator=generator)  # noqa: E731
    side = torch.sqrt(rand())  # box sides as fractions: its area is uniform in [0, 1]
    centre_y, centre_x = rand() * height, rand() * width
    top = (centre_y - side * height / 2).round().clamp(0, height)
    bottom = (centre_y + side * height / 2).round().clamp(0, height)
    left = (centre_x - side * width / 2).round().clamp(0, width)
    right = (centre_x + side * width / 2).round().clamp(0, width)
    chosen = rand() < p
    inside = _box_mask(top, bottom, left, right, height, width) & chosen[:, None, None]
    own_share = 1.0 - inside.flatten(1).float().mean(1)
    mask = inside.to(images.device)[:, None]
    return torch.where(mask, images.roll(1, dims=0), images), own_share.to(images.device)


def mixup(images: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al. 2018) for a batch [B, C, H, W]: every image is blended with its neighbour
    in the batch (the batch rolled by one, as in `cutmix`), keeping a share drawn per image from
    Beta(alpha, alpha). Mixed images put the teacher's function on inputs between the training
    images, the "function matching" of Beyer et al. 2022.

    Returns the mixed batch and each image's own share, which the loss gives the image's label.
    """
    if alpha < 0.0:
        raise ValueError(f"mixup alpha must be >= 0, got {alpha}")
    batch = images.shape[0]
    if alpha == 0.0:
        return images, torch.ones(batch, device=images.device)
    # torch's Beta sampler takes no generator: seed a forked global stream from ours instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        own_share = torch.distributions.Beta(alpha, alpha).sample((batch,)).to(images.device)
    shares = own_share.to(images.dtype)[:, None, None, None]
    return shares * images + (1 - shares) * images.roll(1, dims=0), own_share


def mix(images: torch.Tensor, cutmix_p: float, mixup_alpha: float, generator: torch.Generator | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix, mixup or, with both on, one of the two per batch at even odds; returns the mixed
    batch and each image's own share, as both of them do."""
    if mixup_alpha > 0.0 and (cutmix_p == 0.0 or torch.rand(1, generator=generator).item() < 0.5):
        return mixup(images, mixup_alpha, generator)
    return cutmix(images, cutmix_p, generator)
