"""Is an explanation map faithful to the model, and does it depend on what the model learned?

- Deletion / insertion (Petsiuk et al. 2018, at patch granularity): remove (or add) patches in the
  order a map ranks them, most relevant first, and record the target class probability after each
  step. A removed patch is either filled with the dataset mean (0 in normalised pixels; removal
  "mean") or left out of the token sequence (removal "drop": CLS and the kept patch tokens keep
  their position embeddings, the sequence the model saw in training with patch dropout). A faithful
  map makes the deletion curve fall fast (low area) and the insertion curve rise fast (high area).
  Random maps are the baseline.
- Model-randomisation sanity check (Adebayo et al. 2018): re-initialise the network cascading from
  the classifier head down to the patch embedding and compare each randomised model's map with the
  trained model's by Spearman rank correlation. A map that stays the same explains the
  architecture or the input, not what was learned.

`python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR` scores every map over test images and
writes RESULTS_FILE beside the checkpoint; `read_results` and `result_mean` read it back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attribution import OCCLUSION_MODES, predicted_class, target_tensor
from .model import ViTClassifier, eval_mode
from .methods import check_methods, method_maps

PERTURBATION_MODES = ("deletion", "insertion")
# A patch is removed the way occlusion removes it: filled with the dataset mean, or its token dropped.
REMOVALS = OCCLUSION_MODES
# The leave-one-patch-out map that removes patches each way: the reference a map is compared with.
REFERENCES = {"mean": "occlusion", "drop": "occlusion_drop"}
# What `python -m vit_core.cli.faithfulness` writes beside a checkpoint (`read_results`).
RESULTS_FILE = "faithfulness.json"


def _check_batch(images: torch.Tensor, patch_maps: torch.Tensor, target, n_classes: int) -> torch.Tensor:
    """Validate shapes; returns the target as a long tensor [B] (`attribution.target_tensor`)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, S, S], got shape {tuple(images.shape)}")
    if patch_maps.ndim != 3 or patch_maps.shape[-1] != patch_maps.shape[-2]:
        raise ValueError(f"patch_maps must be [B, g, g], got shape {tuple(patch_maps.shape)}")
    if patch_maps.shape[0] != images.shape[0]:
        raise ValueError(f"{patch_maps.shape[0]} maps for {images.shape[0]} images")
    size, grid = images.shape[-1], patch_maps.shape[-1]
    if images.shape[-2] != size or size % grid:
        raise ValueError(f"a {grid}x{grid} map does not tile a {images.shape[-2]}x{size} image")
    return target_tensor(target, images.shape[0], n_classes)


def check_removal(model: nn.Module, removal: str) -> None:
    """ValueError unless `removal` is a known way to remove a patch that `model` supports."""
    if removal not in REMOVALS:
        raise ValueError(f"unknown removal {removal!r}; choose one of {REMOVALS}")
    if removal == "drop" and not all(hasattr(model, name) for name in ("embed", "blocks", "forward_head")):
        raise ValueError("removal 'drop' needs a ViTClassifier (embed, blocks, forward_head) to leave tokens out")


def moved_counts(n_patches: int, steps: int) -> torch.Tensor:
    """Patches moved at each curve column 0..steps: round-down(k * n / steps)."""
    if not 1 <= steps <= n_patches:
        raise ValueError(f"steps must be in [1, {n_patches}] (or None for one patch per step), got {steps}")
    return torch.arange(steps + 1) * n_patches // steps


def ranks(patch_maps: torch.Tensor) -> torch.Tensor:
    """[..., g, g] -> [..., n]: each patch's place in the map's order, 0 = most relevant (ties keep
    row-major order)."""
    flat = torch.as_tensor(patch_maps).flatten(-2).float()
    order = flat.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    return rank.scatter_(-1, order, torch.arange(flat.shape[-1]).expand_as(order))


def _mean_fill_pass(model, images, keep, image_index, patch_size):
    grid = math.isqrt(keep.shape[-1])
    mask = keep.view(-1, grid, grid).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return model(images[image_index].float() * mask[:, None].to(images.device))


def _drop_pass(model, tokens, keep, image_index):
    """Logits of rows `keep` [R, n] sorted by how many patches they keep: one packed pass."""
    counts, sizes = keep.sum(dim=1).unique_consecutive(return_counts=True)
    index = []
    for block, count in zip(keep.split(sizes.tolist()), counts.tolist()):
        kept = block.nonzero()[:, 1].view(len(block), count) + 1  # row-major patch order, token = patch + 1
        index.append(torch.cat([torch.zeros(len(block), 1, dtype=torch.long), kept], dim=1).to(tokens.device))
    return model.subset_logits(tokens, image_index.to(tokens.device), index)


def _token_passes(lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Rows per forward pass, shortest sequences first (so each pass holds few distinct lengths),
    each pass at most `budget` tokens or a single row."""
    order = lengths.argsort(stable=True)
    passes, start, used = [], 0, 0
    for i, length in enumerate(lengths[order].tolist()):
        if used + length > budget and i > start:
            passes.append(order[start:i])
            start, used = i, 0
        used += length
    return passes + [order[start:]]


@torch.no_grad()
def kept_class_probabilities(model: nn.Module, images: torch.Tensor, keep: torch.Tensor, image_index: torch.Tensor,
                             removal: str = "mean", batch_size: int = 256) -> torch.Tensor:
    """Class probabilities [R, C] of R perturbed inputs: row r is image `image_index[r]` of normalised
    `images` [B, C, S, S] with only the patches `keep[r]` ([R, n] bool, row-major) kept and the
    others removed by `removal`. Forward passes of at most `batch_size` rows (for "drop", as many
    rows' tokens: rows keeping fewer patches go more at a time, packed whatever their lengths).
    Eval mode; the model's mode is restored."""
    check_removal(model, removal)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep, image_index = keep.cpu(), image_index.cpu()
    probs = torch.empty(len(keep), len(model.class_names))
    if not len(keep):
        return probs
    with eval_mode(model):
        if removal == "mean":
            passes = torch.arange(len(keep)).split(batch_size)
            patch_size = images.shape[-1] // math.isqrt(keep.shape[-1])
        else:
            tokens = model.embed(images.float())
            passes = _token_passes(keep.sum(dim=1) + 1, batch_size * (keep.shape[1] + 1))
        for part in passes:
            logits = (_mean_fill_pass(model, images, keep[part], image_index[part], patch_size)
                      if removal == "mean" else _drop_pass(model, tokens, keep[part], image_index[part]))
            probs[part] = logits.float().softmax(dim=-1).cpu()
    return probs


def kept_probabilities(model: nn.Module, images: torch.Tensor, keep: torch.Tensor, image_index: torch.Tensor,
                       target: torch.Tensor, removal: str = "mean", batch_size: int = 256) -> torch.Tensor:
    """Target probability [R] of the perturbed inputs of `kept_class_probabilities`, row r scored
    for class `target[image_index[r]]` ([B])."""
    probs = kept_class_probabilities(model, images, keep, image_index, removal, batch_size)
    wanted = torch.as_tensor(target).cpu()[image_index.cpu()]
    return probs.gather(1, wanted[:, None]).squeeze(1) if len(probs) else probs[:, 0]


def perturbation_curve(model: nn.Module, images: torch.Tensor, patch_maps: torch.Tensor, target,
                       mode: str = "deletion", steps: int | None = None, batch_size: int = 256,
                       removal: str = "mean") -> torch.Tensor:
    """Target-class probability [B, steps + 1] as patches are removed ("deletion") from the image
    or added ("insertion") to an all-removed image, in the order of `patch_maps` (most relevant
    first; ties keep row-major order). Column k is after round-down(k * n / steps) patches out of
    n; column 0 is the untouched (deletion) or all-removed (insertion) image. `images` are
    normalised [B, C, S, S], so the dataset mean is 0; `removal` "mean" fills removed patches
    with it, "drop" leaves their tokens out (a `ViTClassifier` only). `steps` None moves one patch
    per step. The model runs in eval mode in chunks of `batch_size` rows and is left in the mode
    it came in."""
    if mode not in PERTURBATION_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {PERTURBATION_MODES}")
    check_removal(model, removal)
    patch_maps = torch.as_tensor(patch_maps)
    target_t = _check_batch(images, patch_maps, target, len(model.class_names))
    batch, n_patches = images.shape[0], patch_maps.shape[-1] ** 2
    counts = moved_counts(n_patches, n_patches if steps is None else int(steps))
    chosen = ranks(patch_maps)[:, None, :] < counts[None, :, None]  # [B, K, n]: moved yet?
    keep = ~chosen if mode == "deletion" else chosen
    image_index = torch.arange(batch).repeat_interleave(len(counts))
    probs = kept_probabilities(model, images, keep.flatten(0, 1), image_index, target_t, removal, batch_size)
    return probs.view(batch, len(counts))


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
                       steps: int | None = None, batch_size: int = 256,
                       removal: str = "mean") -> dict[str, dict[str, torch.Tensor]]:
    """Per method in `maps` ({name: [B, g, g]}): "deletion" and "insertion" curves [B, K] and
    "deletion_auc" and "insertion_auc" [B]."""
    results = {}
    for name, patch_maps in maps.items():
        entry = {}
        for mode in PERTURBATION_MODES:
            curve = perturbation_curve(model, images, patch_maps, target, mode=mode, steps=steps,
                                       batch_size=batch_size, removal=removal)
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
    """Spearman rank correlation of two maps (any shapes with the same number of entries; torch of
    any float dtype, or numpy), with average ranks for ties. NaN when either map is constant."""
    a = np.asarray(a.detach().double().cpu() if hasattr(a, "detach") else a, dtype=np.float64).ravel()
    b = np.asarray(b.detach().double().cpu() if hasattr(b, "detach") else b, dtype=np.float64).ravel()
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


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`spearman` of each pair of maps a[i], b[i] ([B, g, g] each) -> float64 [B]."""
    return torch.tensor([spearman(x, y) for x, y in zip(a, b)], dtype=torch.float64)


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


def _cascade(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(stage, state-dict names) from the head down to the embedding. The `depth` blocks sit under
    `blocks_path` in the state dict (an adapted model names its own; ours are "blocks"); what the
    state dict holds before the first block is the embedding (patch projection, prefix tokens,
    position embedding), what comes after the last block is the head (final norm, classifier)."""
    path = getattr(model, "blocks_path", "blocks")
    names = list(model.state_dict())
    blocks = [f"{path}.{i}" for i in range(model.depth)]
    in_block = [next((i for i, b in enumerate(blocks) if n.startswith(b + ".")), None) for n in names]
    first = in_block.index(0)
    last = len(names) - in_block[::-1].index(len(blocks) - 1)
    stages = [("head", names[last:])]
    stages += [(f"block {i + 1}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    return stages + [("embedding", names[:first])]


def cascading_randomization(model: ViTClassifier, images: torch.Tensor, methods: Sequence[str], target=None,
                            head_fusion: str = "mean", discard_ratio: float = 0.0,
                            seed: int = 0) -> dict[str, list[dict]]:
    """Cascading model randomisation on a deep copy of `model` (the given model is not touched):
    re-initialise the head (final norm + classifier), then block L, ..., block 1, then the
    embedding (patch projection, CLS token, position embedding), each step keeping the earlier
    ones. After each step, the Spearman correlation between the trained model's map and the
    randomised one, per image, for the same target class (default: the trained model's
    prediction). Per method in `methods` (names in `methods.METHODS`): [{"stage": "head" | "block L" | ... |
    "embedding", "spearman": mean over images, "spearman_std": their standard deviation}] in
    cascade order (NaN where every image's map went constant)."""
    work = copy.deepcopy(model)
    target = predicted_class(work, images) if target is None else target
    settings = dict(target=target, head_fusion=head_fusion, discard_ratio=discard_ratio)
    reference = method_maps(work, images, methods, **settings)
    methods = list(reference)
    fresh = _fresh_weights(work, seed)
    results: dict[str, list[dict]] = {name: [] for name in methods}
    for stage, prefixes in _cascade(work):
        _reinitialise(work, fresh, prefixes)
        for name, randomised in method_maps(work, images, methods, **settings).items():
            scores = spearman_rows(reference[name], randomised).numpy()
            finite = np.isfinite(scores).any()  # nanmean of no numbers would warn
            results[name].append({"stage": stage, "spearman": float(np.nanmean(scores)) if finite else float("nan"),
                                  "spearman_std": float(np.nanstd(scores)) if finite else float("nan")})
    return results


def randomization_sanity(model: ViTClassifier, images: torch.Tensor, method: str = "rollout", target=None,
                         head_fusion: str = "mean", discard_ratio: float = 0.0, seed: int = 0) -> list[dict]:
    """`cascading_randomization` of one method: its list of stages."""
    check_methods([method])
    return cascading_randomization(model, images, [method], target, head_fusion, discard_ratio, seed)[method]


# ------------------------------------------------------------------------------------------------
# The results file: its one reader, beside the module that scores the maps

def read_results(folder: str | Path) -> dict | None:
    """The RESULTS_FILE `python -m vit_core.cli.faithfulness` wrote into `folder`, or None when it has
    not run there. Its "methods" map each method to {removal: {figure: {"mean", "se", "n"}}} plus
    "class_sensitivity" and "randomisation"; "random" holds the random maps' AUCs per removal, "n"
    the image count, "removals" and "references" the removal modes and their occlusion reference.
    ValueError when the file is not JSON or has no "methods" table."""
    path = Path(folder) / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise ValueError(f"{path} holds no \"methods\" table; rerun python -m vit_core.cli.faithfulness")
    return results


def result_mean(results: dict, name: str, removal: str | None, figure: str) -> float | None:
    """The mean over images of `figure` for method `name` ("random": the random maps) under `removal`
    (None for a figure that does not depend on it, like "class_sensitivity"); None when absent."""
    entry = results.get("random") if name == "random" else results["methods"].get(name)
    for key in (removal, figure) if removal is not None else (figure,):
        entry = entry.get(key) if isinstance(entry, dict) else None
    value = entry.get("mean") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
