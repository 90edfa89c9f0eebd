"""Model anatomy: what a trained ViT has learnt, read off its weights and off many images at once.

After Dosovitskiy et al. (2021), Fig. 7: the principal components of the patch-embedding filters
(left), the cosine similarity of the position embeddings (centre) and each head's mean attention
distance by depth (right); plus each head's attention entropy and the average explanation map of
each class. None of this depends on one user image, so it is computed once per checkpoint and
cached beside it as `anatomy.npz`; the app only reads the cache. Regenerate it (the one way to do
so, e.g. after retraining) with

    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10 --data ../shared/cifar10 -n 1000
    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10     # the app's example images

Conventions: attentions are [B, L, H, T, T] (or one image's [L, H, T, T], or the model's tuple of
L blocks [B, H, T, T]) with token 0 = CLS and token i + 1 = patch i, row-major; results are numpy.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageError, read_image
from .model import ViTClassifier
from .preprocessing import preprocess
from .explanation import HELD_METHODS, explain

ANATOMY_NAME = "anatomy.npz"  # the cache's file name inside a checkpoint folder
FORMAT_VERSION = 1
REGENERATE = "python -m vit_core.cli.anatomy --checkpoint DIR"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


class AnatomyError(ValueError):
    """An anatomy cache or image set that cannot be used; the message says what to do instead."""


# ----------------------------------------------------------------------------------------------
# Attention statistics

def _attention_batch(attentions) -> torch.Tensor:
    """Any accepted attention layout -> a float tensor [B, L, H, T, T]."""
    if isinstance(attentions, (list, tuple)):
        attentions = torch.stack([torch.as_tensor(a) for a in attentions], dim=1)
    attentions = torch.as_tensor(attentions).detach()
    if attentions.ndim == 4:
        attentions = attentions.unsqueeze(0)
    if attentions.ndim != 5 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be [B, L, H, T, T] or [L, H, T, T], got shape "
                         f"{tuple(attentions.shape)}")
    return attentions.float()


def patch_distances(grid_size: int, patch_size: int) -> torch.Tensor:
    """[N, N] Euclidean distance in pixels between the centres of patches i and j (row-major)."""
    index = torch.arange(grid_size * grid_size)
    rows, cols = (index // grid_size).double(), (index % grid_size).double()
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    return squared.sqrt() * patch_size


def mean_attention_distance(attentions, grid_size: int, patch_size: int) -> np.ndarray:
    """Each head's attention-weighted distance in pixels between query and key patch, [L, H].

    Over patch queries and patch keys only: the CLS row is ignored, and each patch row's CLS
    entry is left out and the rest renormalised to sum 1, so the figure says how far a patch
    looks *when it looks at patches* (uniform attention over patches gives
    `uniform_attention_distance` whatever share goes to CLS). Averaged over queries and images.
    """
    attentions = _attention_batch(attentions)
    n_patches = grid_size * grid_size
    if attentions.shape[-1] != n_patches + 1:
        raise ValueError(f"attentions over {attentions.shape[-1]} tokens do not fit a {grid_size}x"
                         f"{grid_size} grid plus CLS ({n_patches + 1} tokens)")
    patches = attentions[..., 1:, 1:].double()
    weights = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    per_query = (weights * patch_distances(grid_size, patch_size)).sum(dim=-1)  # [B, L, H, N]
    return per_query.mean(dim=(0, 3)).numpy()


def uniform_attention_distance(grid_size: int, patch_size: int) -> float:
    """The mean attention distance of a head that attends to every patch equally: a reference line."""
    return float(patch_distances(grid_size, patch_size).mean())


def attention_entropy(attentions, cls_only: bool = False) -> np.ndarray:
    """Each head's attention entropy in nats, [L, H]: -sum p log p over all T keys (CLS included)
    of each query row, averaged over every query row (CLS and patches) and image; with `cls_only`,
    over the CLS row alone. Uniform attention gives log(T), attention to one token 0."""
    attentions = _attention_batch(attentions).double()
    if cls_only:
        attentions = attentions[..., :1, :]
    entropy = -torch.xlogy(attentions, attentions).sum(dim=-1)  # 0 log 0 = 0
    return entropy.mean(dim=(0, 3)).numpy()


# ----------------------------------------------------------------------------------------------
# What the weights say

def position_similarity(model: ViTClassifier) -> np.ndarray:
    """[N, N] cosine similarity of patch i's position embedding with patch j's (row-major, CLS's
    own embedding left out); the diagonal is 1 unless an embedding is exactly zero."""
    positions = F.normalize(model.pos_embed[0, 1:].detach().double(), dim=-1)
    return (positions @ positions.T).float().numpy()


def patch_embedding_filters(model: ViTClassifier, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The top-k principal components of the patch-embedding filters, as RGB filters [k, C, p, p],
    and the share of the filters' variance each explains [k].

    Each of the `emb` output units of `patch_embed` is a filter over a flattened C x p x p patch
    (the order of `patchify`); the filters are centred and decomposed by SVD. Signs are fixed so
    each component's largest-magnitude entry is positive."""
    weight = model.patch_embed.weight.detach().double()  # [emb, C * p * p]
    p = model.patch_size
    channels = weight.shape[1] // (p * p)
    if not 1 <= k <= min(weight.shape):
        raise ValueError(f"k must be in [1, {min(weight.shape)}], got {k}")
    _, singular, components = torch.linalg.svd(weight - weight.mean(dim=0), full_matrices=False)
    variance = singular**2
    if variance.sum() <= 0:
        raise ValueError("the patch-embedding filters are all equal; there is no variance to explain")
    components = components[:k]
    largest = components.abs().argmax(dim=1, keepdim=True)
    components = components * components.gather(1, largest).sign()
    ratio = (variance / variance.sum())[:k]
    return components.reshape(k, channels, p, p).float().numpy(), ratio.float().numpy()


def weights_digest(model: ViTClassifier) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, bytes): which weights a cache
    was computed from, whether they came from a folder or the Hub."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Explanations averaged by class

def _check_images(model: ViTClassifier, images: torch.Tensor, labels) -> torch.Tensor | None:
    if images.ndim != 4 or images.shape[1:] != (3, model.image_size, model.image_size) or not len(images):
        raise ValueError(f"images must be a non-empty batch [N, 3, {model.image_size}, {model.image_size}] "
                         f"from vit_core.preprocess, got shape {tuple(images.shape)}")
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if ((labels < 0) | (labels >= len(model.class_names))).any():
        raise ValueError(f"labels must be class indices in [0, {len(model.class_names)})")
    return labels


def _explained_batches(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor | None,
                       batch_size: int, progress: Callable[[int], None] | None = None):
    """`explain` over the images in batches, each explaining its label (or the predicted class);
    `progress`, if given, is called with each batch's image count once it is explained."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        target = None if labels is None else labels[start:start + batch_size]
        explanation = explain(model, images[start:start + batch_size], target=target)
        if progress is not None:
            progress(len(explanation.target))
        yield explanation


def _add_class_maps(sums: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor) -> None:
    """Add each map, scaled to sum 1 over its patches (so every image counts the same), to its class."""
    flat = maps.detach().double().flatten(1)
    flat = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-30)
    sums.index_add_(0, classes, flat.view_as(maps))


def _class_means(sums: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    """Per-class sums -> means; a class without images is NaN."""
    means = sums / counts.clamp_min(1).view(-1, 1, 1)
    means[counts == 0] = float("nan")
    return means.float().numpy()


def class_average_maps(model: ViTClassifier, images: torch.Tensor, labels, method: str = "grad_rollout",
                       batch_size: int = 100) -> np.ndarray:
    """The average explanation map of each class, [n_classes, g, g]: `method` is a name of
    `Explanation.maps()`; each image is explained for its label (what makes it that class), its
    map scaled to sum 1 over the patches, and the maps of a class averaged. Classes without
    images are NaN. `images` come from `vit_core.preprocess`; `labels` are class indices [N]."""
    if method not in HELD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {HELD_METHODS} (the maps explain gives)")
    labels = _check_images(model, images, labels)
    if labels is None:
        raise ValueError("class_average_maps needs labels")
    grid, n_classes = model.grid_size, len(model.class_names)
    sums = torch.zeros(n_classes, grid, grid, dtype=torch.float64)
    for explanation in _explained_batches(model, images, labels, batch_size):
        _add_class_maps(sums, explanation.maps()[method], explanation.target)
    return _class_means(sums, torch.bincount(labels, minlength=n_classes))


# ----------------------------------------------------------------------------------------------
# The whole anatomy, and its cache

@dataclass
class Anatomy:
    """Everything the app's model view draws, computed once per checkpoint (see the module doc)."""

    attention_distance: np.ndarray   # [L, H] mean attention distance, pixels
    attention_entropy: np.ndarray    # [L, H] nats, averaged over every query row
    position_similarity: np.ndarray  # [N, N] cosine similarity of the patch position embeddings
    filters: np.ndarray              # [k, C, p, p] principal components of the patch embedding
    filter_variance: np.ndarray      # [k] share of the filters' variance each component explains
    class_maps: dict[str, np.ndarray]  # method -> [n_classes, g, g] average map per class (NaN: no images)
    class_counts: np.ndarray         # [n_classes] images behind each class's maps
    class_names: list[str]
    n_images: int
    patch_size: int
    grouped_by: str                  # "label" or "prediction": how images were assigned to classes
    image_source: str                # which images, in words (a folder, a dataset and a count)
    weights_digest: str              # `weights_digest` of the model it describes

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.position_similarity.shape[0])

    @property
    def uniform_distance(self) -> float:
        """Mean attention distance of uniform attention over the patches (the figure's reference)."""
        return uniform_attention_distance(self.grid_size, self.patch_size)

    @property
    def max_entropy(self) -> float:
        """Entropy of uniform attention over all T = 1 + N tokens, in nats."""
        return math.log(self.position_similarity.shape[0] + 1)

    def matches(self, model: ViTClassifier) -> bool:
        """Whether this was computed from exactly these weights (False: the cache is stale)."""
        return self.weights_digest == weights_digest(model)


def compute_anatomy(model: ViTClassifier, images: torch.Tensor, labels=None, batch_size: int = 100,
                    n_filters: int = 28, image_source: str = "",
                    progress: Callable[[int], None] | None = None) -> Anatomy:
    """All of the anatomy from one `explain` pass over `images` (normalised, [N, 3, S, S]) in
    batches. With `labels`, each image is explained for its label and counted in its class;
    without, for and in its predicted class. `progress`, if given, is called with each batch's
    image count."""
    labels = _check_images(model, images, labels)
    n_layers, n_heads = model.depth, model.n_heads
    grid, n_classes = model.grid_size, len(model.class_names)
    distance, entropy = np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads))
    sums = {m: torch.zeros(n_classes, grid, grid, dtype=torch.float64) for m in HELD_METHODS}
    counts = torch.zeros(n_classes, dtype=torch.long)
    for explanation in _explained_batches(model, images, labels, batch_size, progress):
        share = len(explanation.target) / len(images)
        distance += share * mean_attention_distance(explanation.attentions, grid, model.patch_size)
        entropy += share * attention_entropy(explanation.attentions)
        for method, maps in explanation.maps().items():
            _add_class_maps(sums[method], maps, explanation.target)
        counts += torch.bincount(explanation.target, minlength=n_classes)
    filters, variance = patch_embedding_filters(model, min(n_filters, min(model.patch_embed.weight.shape)))
    return Anatomy(
        attention_distance=distance.astype(np.float32), attention_entropy=entropy.astype(np.float32),
        position_similarity=position_similarity(model), filters=filters, filter_variance=variance,
        class_maps={m: _class_means(s, counts) for m, s in sums.items()}, class_counts=counts.numpy(),
        class_names=list(model.class_names), n_images=len(images), patch_size=model.patch_size,
        grouped_by="prediction" if labels is None else "label", image_source=image_source,
        weights_digest=weights_digest(model))


_ARRAYS = ("attention_distance", "attention_entropy", "position_similarity", "filters",
           "filter_variance", "class_counts")
_SCALARS = ("n_images", "patch_size", "grouped_by", "image_source", "weights_digest")


def save_anatomy(anatomy: Anatomy, path: str | os.PathLike) -> Path:
    """Write `anatomy` to a compressed .npz (no pickles), atomically: a reader never sees half a file."""
    path = Path(path)
    methods = sorted(anatomy.class_maps)
    arrays = {name: np.asarray(getattr(anatomy, name)) for name in _ARRAYS + _SCALARS}
    arrays.update(format_version=np.array(FORMAT_VERSION), class_names=np.array(anatomy.class_names),
                  class_map_methods=np.array(methods),
                  class_maps=np.stack([anatomy.class_maps[m] for m in methods]).astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_anatomy(path: str | os.PathLike) -> Anatomy:
    """Read a cache written by `save_anatomy`; AnatomyError says how to regenerate a bad one."""
    path = Path(path)
    if path.is_dir():
        path = path / ANATOMY_NAME
    advice = f"Regenerate it with `{REGENERATE}`."
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise AnatomyError(f"No anatomy cache at {path}. {advice}") from None
    except (OSError, ValueError) as error:  # not a zip, truncated, or holding pickled objects
        raise AnatomyError(f"{path} is not a readable anatomy cache ({error}). {advice}") from error
    if stored.get("format_version", np.array(-1)).item() != FORMAT_VERSION:
        raise AnatomyError(f"{path} was written in another format than version {FORMAT_VERSION}. {advice}")
    missing = sorted(set(_ARRAYS + _SCALARS + ("class_names", "class_map_methods", "class_maps")) - set(stored))
    if missing:
        raise AnatomyError(f"{path} lacks {', '.join(missing)}. {advice}")
    methods = [str(m) for m in stored["class_map_methods"]]
    return Anatomy(
        **{name: stored[name] for name in _ARRAYS},
        **{name: stored[name].item() for name in _SCALARS},
        class_maps=dict(zip(methods, stored["class_maps"])),
        class_names=[str(c) for c in stored["class_names"]])


# ----------------------------------------------------------------------------------------------
# The fixed image set when no dataset is at hand

def example_class(stem: str, class_names: Sequence[str]) -> str | None:
    """The class of an example file named `<class>_NNNN`, or None when the name carries none."""
    name = stem.rsplit("_", 1)[0]
    return name if name in class_names else None


def load_example_images(folder: str | os.PathLike, model: ViTClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Images named `<class>_NNNN.jpg` (the app's demo/examples) -> (normalised images [N, 3, S, S]
    as `vit_core.preprocess` makes them, labels [N]), in file-name order."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise AnatomyError(f"No example images (<class>_NNNN.jpg) in {folder}; pass a folder that holds some.")
    labels = []
    for path in files:
        name = example_class(path.stem, model.class_names)
        if name is None:
            raise AnatomyError(f"{path.name} is not named <class>_NNNN with a class of the model "
                               f"({', '.join(model.class_names)}).")
        labels.append(model.class_names.index(name))
    try:
        pictures = [read_image(path) for path in files]
    except ImageError as error:
        raise AnatomyError(f"Cannot read an example image in {folder}: {error}") from error
    return preprocess(pictures, model), torch.tensor(labels, dtype=torch.long)
