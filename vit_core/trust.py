"""Per-image trust figures: how far should this one map be trusted for this one image?

For every map of an image, three figures, each computed on that image alone:

- deletion and insertion AUC (`vit_core.faithfulness` curves at patch granularity, coarse steps)
  as a percentile among random maps of the same image: 100 means the map orders patches better
  than every random map, 50 means no better than chance;
- the Spearman correlation with leave-one-patch-out occlusion (the drop in the target's
  log-probability when each patch alone is set to the dataset mean), the per-patch effect the map
  claims to rank.

Every perturbed input of every map and every random map goes through the model in as few batched
forward passes as `batch_size` allows, without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attribution import occlusion, target_tensor
from .faithfulness import auc, perturbation_curve, random_maps, spearman


@dataclass
class TrustFigures:
    """One method's figures, each a tensor [B] (one value per image)."""

    deletion_auc: torch.Tensor          # area under the deletion curve (lower is better)
    insertion_auc: torch.Tensor         # area under the insertion curve (higher is better)
    deletion_percentile: torch.Tensor   # % of random maps with a higher deletion AUC (ties half)
    insertion_percentile: torch.Tensor  # % of random maps with a lower insertion AUC (ties half)
    spearman_occlusion: torch.Tensor    # rank correlation with leave-one-patch-out; NaN if constant

    def for_image(self, index: int) -> dict[str, float]:
        """The figures of image `index` as plain floats."""
        return {name: float(getattr(self, name)[index]) for name in self.__dataclass_fields__}


def _percentile_better(method: torch.Tensor, random: torch.Tensor, lower_is_better: bool) -> torch.Tensor:
    """Percent of the random AUCs [B, R] that `method` [B, M] beats, ties counting half -> [B, M]."""
    method, random = method[:, :, None], random[:, None, :]
    beaten = (random > method) if lower_is_better else (random < method)
    tied = random == method
    return 100.0 * (beaten.double() + 0.5 * tied.double()).mean(dim=-1)


def _check_maps(maps: dict[str, torch.Tensor], batch: int) -> tuple[list[str], torch.Tensor]:
    if not maps:
        raise ValueError("trust_figures needs at least one map")
    shapes = {name: tuple(torch.as_tensor(m).shape) for name, m in maps.items()}
    first = next(iter(shapes.values()))
    if len(first) != 3 or first[0] != batch or first[1] != first[2] or len(set(shapes.values())) != 1:
        raise ValueError(f"every map must be [B, g, g] with B = {batch} images, got {shapes}")
    names = list(maps)
    return names, torch.stack([torch.as_tensor(maps[n]).detach().float().cpu() for n in names], dim=1)


def _areas(model, images: torch.Tensor, every: torch.Tensor, target: torch.Tensor, steps: int,
           batch_size: int, bf16: bool) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUC [B, K] of K maps per image ([B, K, g, g]), all maps of all
    images in one batched `perturbation_curve` call per mode."""
    batch, per_image = every.shape[:2]
    repeated_images = images.detach().float().repeat_interleave(per_image, dim=0)
    repeated_target = target.repeat_interleave(per_image)
    areas = {}
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        for mode in ("deletion", "insertion"):
            curves = perturbation_curve(model, repeated_images, every.flatten(0, 1), repeated_target,
                                        mode=mode, steps=steps, batch_size=batch_size)
            areas[mode] = auc(curves).view(batch, per_image)
    return areas


def trust_figures(model, images: torch.Tensor, maps: dict[str, torch.Tensor], target,
                  occlusion_map: torch.Tensor | None = None, steps: int = 8, n_random: int = 20,
                  seed: int = 0, batch_size: int = 512, bf16: bool = False) -> dict[str, TrustFigures]:
    """Trust figures of every map in `maps` ({name: [B, g, g]}) for normalised `images` [B, C, S, S]
    and `target` (an int or [B]).

    The curves move round-down(k * n / steps) patches at column k (coarse steps keep this fast);
    the percentiles compare each map with `n_random` uniform random maps, drawn from `seed` (the
    same maps for every image and every call with that seed; the global RNG is untouched).
    `occlusion_map` is the leave-one-patch-out map ("mean" fill, `attribution.occlusion`) if
    already computed; otherwise it is computed here. `bf16` runs the perturbed inputs under
    bfloat16 autocast (faster on CPUs with bf16 units; the AUCs move slightly, so near-ties
    between maps may reorder).
    """
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, S, S], got shape {tuple(images.shape)}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    batch = images.shape[0]
    target = target_tensor(target, batch, len(model.class_names))
    names, stacked = _check_maps(maps, batch)
    if occlusion_map is not None and tuple(occlusion_map.shape) != tuple(stacked[:, 0].shape):
        raise ValueError(f"occlusion_map must be {tuple(stacked[:, 0].shape)}, got {tuple(occlusion_map.shape)}")
    grid, n_maps = stacked.shape[-1], len(names)
    # The same random maps for every image, so an image's figures do not depend on its batch.
    randoms = random_maps(n_random, grid, seed=seed).expand(batch, n_random, grid, grid)
    areas = _areas(model, images, torch.cat([stacked, randoms], dim=1), target, steps, batch_size, bf16)
    if occlusion_map is None:
        occlusion_map = occlusion(model, images, target)
    occlusion_map = torch.as_tensor(occlusion_map).detach().cpu()
    deletion = _percentile_better(areas["deletion"][:, :n_maps], areas["deletion"][:, n_maps:], True)
    insertion = _percentile_better(areas["insertion"][:, :n_maps], areas["insertion"][:, n_maps:], False)
    figures = {}
    for index, name in enumerate(names):
        correlation = torch.tensor([spearman(stacked[b, index], occlusion_map[b]) for b in range(batch)])
        figures[name] = TrustFigures(
            deletion_auc=areas["deletion"][:, index], insertion_auc=areas["insertion"][:, index],
            deletion_percentile=deletion[:, index], insertion_percentile=insertion[:, index],
            spearman_occlusion=correlation)
    return figures
