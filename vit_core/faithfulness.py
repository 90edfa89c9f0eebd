"""Is an explanation map faithful to the model, and does it depend on what the model learned?

- Deletion / insertion (Petsiuk et al. 2018, at patch granularity): remove (or add) patches in the
  order a map ranks them, most relevant first, filling removed patches with the dataset mean (0 in
  normalised pixels), and record the target class probability after each step. A faithful map
  makes the deletion curve fall fast (low area) and the insertion curve rise fast (high area).
  Random maps are the baseline.
- Model-randomisation sanity check (Adebayo et al. 2018): re-initialise the network cascading from
  the classifier head down to the patch embedding and compare each randomised model's map with the
  trained model's by Spearman rank correlation. A map that stays the same explains the
  architecture or the input, not what was learned.

`python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR -n 500` prints the AUCs of
attention rollout, gradient rollout, last-layer attention and random maps over n test images.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .model import ViTClassifier
from .rollout import Explanation, explain

PERTURBATION_MODES = ("deletion", "insertion")
SANITY_METHODS = ("rollout", "grad_rollout", "last_layer")


def _check_batch(images: torch.Tensor, patch_maps: torch.Tensor, target) -> tuple[int, torch.Tensor]:
    """Validate shapes; returns the patch size and target as a long tensor [B]."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, S, S], got shape {tuple(images.shape)}")
    if patch_maps.ndim != 3 or patch_maps.shape[-1] != patch_maps.shape[-2]:
        raise ValueError(f"patch_maps must be [B, g, g], got shape {tuple(patch_maps.shape)}")
    if patch_maps.shape[0] != images.shape[0]:
        raise ValueError(f"{patch_maps.shape[0]} maps for {images.shape[0]} images")
    size, grid = images.shape[-1], patch_maps.shape[-1]
    if images.shape[-2] != size or size % grid:
        raise ValueError(f"a {grid}x{grid} map does not tile a {images.shape[-2]}x{size} image")
    target_t = torch.as_tensor(target, dtype=torch.long).flatten()
    if target_t.numel() == 1:
        target_t = target_t.expand(images.shape[0])
    if target_t.shape != (images.shape[0],):
        raise ValueError(f"target must be an int or [B] = [{images.shape[0]}], got {tuple(target_t.shape)}")
    return size // grid, target_t.clone()


@torch.no_grad()
def perturbation_curve(model: nn.Module, images: torch.Tensor, patch_maps: torch.Tensor, target,
                       mode: str = "deletion", steps: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """Target-class probability [B, steps + 1] as patches are removed ("deletion") from the image
    or added ("insertion") to an all-mean image, in the order of `patch_maps` (most relevant first;
    ties keep row-major order). Column k is after round-down(k * n / steps) patches out of n;
    column 0 is the untouched (deletion) or all-mean (insertion) image. `images` are normalised
    [B, C, S, S], so the dataset mean is 0; `steps` None moves one patch per step. The model is
    run in eval mode in chunks of `batch_size` images and left in the mode it came in."""
    if mode not in PERTURBATION_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {PERTURBATION_MODES}")
    patch_maps = torch.as_tensor(patch_maps)
    patch_size, target_t = _check_batch(images, patch_maps, target)
    batch, grid = images.shape[0], patch_maps.shape[-1]
    n_patches = grid * grid
    steps = n_patches if steps is None else int(steps)
    if not 1 <= steps <= n_patches:
        raise ValueError(f"steps must be in [1, {n_patches}] (or None for one patch per step), got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    order = patch_maps.reshape(batch, n_patches).float().argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_patches).expand(batch, n_patches))  # rank[b, patch]
    counts = torch.arange(steps + 1) * n_patches // steps                     # patches moved per column
    chosen = rank[:, None, :] < counts[None, :, None]                          # [B, K, n]: moved yet?
    keep = ~chosen if mode == "deletion" else chosen
    keep = keep.reshape(-1, grid, grid)
    n_columns = steps + 1

    was_training = model.training
    model.eval()
    probs = torch.empty(batch * n_columns)
    try:
        for start in range(0, batch * n_columns, batch_size):
            index = torch.arange(start, min(start + batch_size, batch * n_columns))
            image_index = index // n_columns
            mask = keep[index].repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
            inputs = images[image_index].float() * mask[:, None].to(images.device)
            logits = model(inputs)
            probs[index] = logits.float().softmax(dim=-1).gather(
                1, target_t[image_index, None].to(logits.device)).squeeze(1).cpu()
    finally:
        model.train(was_training)
    return probs.view(batch, n_columns)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under each row of `curve` [..., K] by the trapezoid rule over x evenly spaced in [0, 1];
    for probabilities it lies in [0, 1]."""
    curve = torch.as_tensor(curve, dtype=torch.float32)
    if curve.shape[-1] < 2:
        raise ValueError("a curve needs at least 2 points")
    return ((curve[..., :-1] + curve[..., 1:]) / 2).sum(dim=-1) / (curve.shape[-1] - 1)


def random_maps(batch: int, grid: int, seed: int = 0) -> torch.Tensor:
    """Uniform random maps [batch, grid, grid], the same for the same seed (global RNG untouched)."""
    return torch.rand(batch, grid, grid, generator=torch.Generator().manual_seed(seed))


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: dict[str, torch.Tensor], target,
                       steps: int | None = None, batch_size: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    """Per method in `maps` ({name: [B, g, g]}): "deletion" and "insertion" curves [B, K] and
    "deletion_auc" and "insertion_auc" [B]."""
    results = {}
    for name, patch_maps in maps.items():
        entry = {}
        for mode in PERTURBATION_MODES:
            curve = perturbation_curve(model, images, patch_maps, target, mode=mode, steps=steps,
                                       batch_size=batch_size)
            entry[mode] = curve
            entry[f"{mode}_auc"] = auc(curve)
        results[name] = entry
    return results


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing the mean of their ranks."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse.ravel()]


def spearman(a, b) -> float:
    """Spearman rank correlation of two maps (any shapes with the same number of entries; torch or
    numpy), with average ranks for ties. NaN when either map is constant."""
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64).ravel()
    b = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size}")
    if a.size < 2:
        raise ValueError("spearman needs at least 2 values")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return float("nan")
    return float((ra * rb).sum() / denominator)


def _fresh_weights(model: ViTClassifier, seed: int) -> dict[str, torch.Tensor]:
    """The state of a CPU copy of `model` re-initialised by its own `reset_parameters`, drawn from
    `seed` (on the CPU, so any device gives the same draw); the global RNG is left as it was."""
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh.reset_parameters()
    return fresh.state_dict()


@torch.no_grad()
def _reinitialise(model: nn.Module, fresh: dict[str, torch.Tensor], prefixes: list[str]) -> None:
    """Copy the fresh weights of every parameter and buffer under `prefixes` into `model`."""
    for name, tensor in model.state_dict().items():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            tensor.copy_(fresh[name])


def _method_map(explanation: Explanation, method: str) -> torch.Tensor:
    return getattr(explanation, method)


def randomization_sanity(model: ViTClassifier, images: torch.Tensor, method: str = "rollout", target=None,
                         head_fusion: str = "mean", discard_ratio: float = 0.0, seed: int = 0) -> list[dict]:
    """Cascading model randomisation on a deep copy of `model` (the given model is not touched):
    re-initialise the head (final norm + classifier), then block L, ..., block 1, then the
    embedding (patch projection, CLS token, position embedding), each step keeping the earlier
    ones. After each step, the Spearman correlation between the trained model's map and the
    randomised one, per image, for the same target class (default: the trained model's
    prediction). Returns [{"stage": "head" | "block L" | ... | "embedding", "spearman": mean over
    images, "spearman_std": their standard deviation}] in cascade order."""
    if method not in SANITY_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {SANITY_METHODS}")
    work = copy.deepcopy(model)
    trained = explain(work, images, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio)
    target_t = trained.target
    reference = _method_map(trained, method)
    stages = [("head", ["norm", "head"])]
    stages += [(f"block {i + 1}", [f"blocks.{i}"]) for i in reversed(range(len(work.blocks)))]
    stages += [("embedding", ["patch_embed", "cls_token", "pos_embed"])]
    fresh = _fresh_weights(work, seed)
    results = []
    for stage, prefixes in stages:
        _reinitialise(work, fresh, prefixes)
        randomised = _method_map(
            explain(work, images, target=target_t, head_fusion=head_fusion, discard_ratio=discard_ratio), method)
        scores = np.array([spearman(r, m) for r, m in zip(reference, randomised)])
        finite = np.isfinite(scores).any()  # nanmean of no numbers would warn
        results.append({"stage": stage, "spearman": float(np.nanmean(scores)) if finite else float("nan"),
                        "spearman_std": float(np.nanstd(scores)) if finite else float("nan")})
    return results
