"""Per-image trust figures: how far should this one map be trusted for this one image?

For every map of an image, three figures, each computed on that image alone:

- deletion and insertion AUC (`vit_core.faithfulness` curves at patch granularity, coarse steps)
  as a percentile among random maps of the same image: 100 means the map orders patches better
  than every random map, 50 means no better than chance;
- the Spearman correlation with leave-one-patch-out occlusion (the drop in the target's
  log-probability when each patch alone is removed), the per-patch effect the map claims to rank.

A patch is removed as `removal` says: filled with the dataset mean ("mean") or its token left out
("drop"; shorter sequences, so cheaper, and the input the model saw in training with patch
dropout). The occlusion reference removes patches the same way.

`TrustContext` holds what every map of the same images shares, computed once: the untouched and
the all-removed image (the first and last curve columns, the same for every map), the random
maps' curves and the occlusion reference. Scoring a map then costs only its own inner curve
columns, 2 (steps - 1) forward rows per image, batched with whatever else is due in one pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .attribution import occlusion, target_tensor
from .faithfulness import (PERTURBATION_MODES, auc, check_removal, kept_probabilities, moved_counts, random_maps,
                           ranks, spearman_rows)
from .model import kept_while_unchanged


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


def _check_maps(maps: dict[str, torch.Tensor], batch: int, grid: int) -> tuple[list[str], torch.Tensor]:
    if not maps:
        raise ValueError("trust figures need at least one map")
    shapes = {name: tuple(torch.as_tensor(m).shape) for name, m in maps.items()}
    if len(set(shapes.values())) != 1 or next(iter(shapes.values())) != (batch, grid, grid):
        raise ValueError(f"every map must be [B, g, g] = [{batch}, {grid}, {grid}] (B = {batch} images), got {shapes}")
    names = list(maps)
    return names, torch.stack([torch.as_tensor(maps[n]).detach().float().cpu() for n in names], dim=1)


# Each model's bfloat16 copy for the scoring passes, kept while its parameters are the same
# tensors, unchanged in place (a copy costs milliseconds, a large share of one image's trust).
_BFLOAT16_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def bfloat16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 deep copy of `model`, made once and kept while its weights stay as they are."""
    return kept_while_unchanged(_BFLOAT16_COPIES, model, tuple(model.parameters()),
                                lambda: copy.deepcopy(model).to(torch.bfloat16))


class TrustContext:
    """The trust work shared by every map of normalised `images` [B, C, S, S] explaining `target`
    (an int or [B]); see the module docstring.

    The curves move round-down(k * n / steps) patches at column k (coarse steps keep this fast);
    the percentiles compare each map with `n_random` uniform random maps drawn from `seed` (the
    same for every image and call with that seed; the global RNG is untouched). Deletion ranks
    patches by each random map; insertion by the same random orders reversed (equally random),
    so when `steps` divides the number of patches every inserted set is a deleted set's
    complement and one pass serves both. `occlusion_map` is the leave-one-patch-out map
    (`attribution.occlusion` with mode = `removal`) if already computed; otherwise it is
    computed when a Spearman figure is first asked for. `bf16` runs the perturbed inputs through a
    bfloat16 copy of the model under autocast: faster on CPUs with bf16 units; the AUCs move
    slightly, so near-ties between maps may reorder. The occlusion reference stays in float32: its
    values are small differences of log-probabilities, whose ranks bfloat16 would shuffle enough to
    move the Spearman figures (`benchmarks/trust_probe.py --reference-bf16` measures by how much).
    Forward passes take up to `batch_size` rows.
    """

    def __init__(self, model, images: torch.Tensor, target, removal: str = "mean", steps: int = 8,
                 n_random: int = 20, seed: int = 0, batch_size: int = 512, bf16: bool = False,
                 occlusion_map: torch.Tensor | None = None):
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, S, S], got shape {tuple(images.shape)}")
        if n_random < 1:
            raise ValueError(f"n_random must be >= 1, got {n_random}")
        check_removal(model, removal)
        self.model, self.images, self.removal = model, images.detach(), removal
        self.batch, self.grid = images.shape[0], model.grid_size
        self.target = target_tensor(target, self.batch, len(model.class_names))
        self.counts = moved_counts(self.grid ** 2, steps)
        self.batch_size, self.bf16 = batch_size, bf16
        # bf16: a bfloat16 copy of the weights, so autocast has no weights to cast in every layer.
        self._scorer = bfloat16_copy(model) if bf16 else model
        if occlusion_map is not None and tuple(occlusion_map.shape) != (self.batch, self.grid, self.grid):
            raise ValueError(f"occlusion_map must be {(self.batch, self.grid, self.grid)}, "
                             f"got {tuple(occlusion_map.shape)}")
        self._occlusion = None if occlusion_map is None else torch.as_tensor(occlusion_map).detach().cpu()
        self._random_ranks = ranks(random_maps(n_random, self.grid, seed=seed))  # [R, n]
        self._ends: torch.Tensor | None = None    # [B, 2]: untouched, all removed
        self._random: dict[str, torch.Tensor] | None = None  # mode -> random AUCs [B, R]

    @property
    def occlusion_map(self) -> torch.Tensor:
        """The leave-one-patch-out reference [B, g, g] (computed on first use)."""
        if self._occlusion is None:
            self._occlusion = occlusion(self.model, self.images, self.target, mode=self.removal).detach().cpu()
        return self._occlusion

    def _probabilities(self, keep: torch.Tensor) -> torch.Tensor:
        """Target probabilities [B, X] of the inputs `keep` [B, X, n] says to keep, one pass."""
        per_image = keep.shape[1]
        image_index = torch.arange(self.batch).repeat_interleave(per_image)
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            probs = kept_probabilities(self._scorer, self.images, keep.flatten(0, 1), image_index, self.target,
                                       self.removal, self.batch_size)
        return probs.view(self.batch, per_image)

    def _inner_keeps(self, rank: torch.Tensor) -> dict[str, torch.Tensor]:
        """Kept patches [B, K * (steps - 1), n] at the inner curve columns of maps ranked `rank` [B, K, n]."""
        inner = self.counts[1:-1]
        chosen = rank[:, :, None, :] < inner[None, None, :, None]  # [B, K, steps - 1, n]
        return {"deletion": (~chosen).flatten(1, 2), "insertion": chosen.flatten(1, 2)}

    def _random_keeps(self) -> dict[str, torch.Tensor]:
        """The random maps' inner columns still to evaluate (insertion only when not a reversal)."""
        n = self.grid ** 2
        rank = self._random_ranks.expand(self.batch, -1, -1)
        keeps = self._inner_keeps(rank)
        reversal = bool((self.counts + self.counts.flip(0) == n).all())
        return {"deletion": keeps["deletion"]} if reversal else {
            "deletion": keeps["deletion"], "insertion": self._inner_keeps(n - 1 - rank)["insertion"]}

    def _curves(self, probs: dict[str, torch.Tensor], n_maps: int) -> dict[str, torch.Tensor]:
        """Inner probabilities {mode: [B, K * (steps - 1)]} -> full curves {mode: [B, K, steps + 1]}."""
        full, empty = (self._ends[:, i, None, None].expand(-1, n_maps, 1) for i in (0, 1))
        inner = {mode: p.view(self.batch, n_maps, len(self.counts) - 2) for mode, p in probs.items()}
        if "insertion" not in inner:  # the reversed random orders insert what deletion kept
            inner["insertion"] = inner["deletion"].flip(-1)
        return {"deletion": torch.cat([full, inner["deletion"], empty], dim=-1),
                "insertion": torch.cat([empty, inner["insertion"], full], dim=-1)}

    def areas(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deletion and insertion AUC [B, K] of K maps per image ([B, K, g, g]); the first call
        also evaluates the shared columns and random maps, all in one batched pass."""
        parts = {("maps", mode): keep for mode, keep in self._inner_keeps(ranks(stacked)).items()}
        if self._ends is None:
            untouched_and_empty = torch.tensor([[True], [False]]).expand(-1, self.grid ** 2)
            parts[("ends", "")] = untouched_and_empty.expand(self.batch, -1, -1)
            parts.update({("random", mode): keep for mode, keep in self._random_keeps().items()})
        sizes = [keep.shape[1] for keep in parts.values()]
        probs = dict(zip(parts, self._probabilities(torch.cat(list(parts.values()), dim=1)).split(sizes, dim=1)))
        if self._ends is None:
            self._ends = probs[("ends", "")]
            random = {mode: probs[("random", mode)] for mode in PERTURBATION_MODES if ("random", mode) in probs}
            n_random = len(self._random_ranks)
            self._random = {mode: auc(curve) for mode, curve in self._curves(random, n_random).items()}
        curves = self._curves({mode: probs[("maps", mode)] for mode in PERTURBATION_MODES}, stacked.shape[1])
        return {mode: auc(curve) for mode, curve in curves.items()}

    def random_areas(self) -> dict[str, torch.Tensor]:
        """Deletion and insertion AUC [B, R] of the random maps."""
        if self._random is None:
            self.areas(torch.zeros(self.batch, 0, self.grid, self.grid))
        return self._random

    def curve_figures(self, maps: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per map ({name: [B, g, g]}): "deletion_auc", "insertion_auc" and their percentiles
        among the random maps ("deletion_percentile", "insertion_percentile"), each [B]."""
        names, stacked = _check_maps(maps, self.batch, self.grid)
        areas = self.areas(stacked)
        random = self.random_areas()
        deletion = _percentile_better(areas["deletion"], random["deletion"], lower_is_better=True)
        insertion = _percentile_better(areas["insertion"], random["insertion"], lower_is_better=False)
        return {name: {"deletion_auc": areas["deletion"][:, i], "insertion_auc": areas["insertion"][:, i],
                       "deletion_percentile": deletion[:, i], "insertion_percentile": insertion[:, i]}
                for i, name in enumerate(names)}

    def spearman(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per map: its Spearman correlation with the occlusion reference, per image [B]."""
        names, stacked = _check_maps(maps, self.batch, self.grid)
        return {name: spearman_rows(stacked[:, i], self.occlusion_map) for i, name in enumerate(names)}

    def figures(self, maps: dict[str, torch.Tensor]) -> dict[str, TrustFigures]:
        """Every trust figure of every map in `maps` ({name: [B, g, g]})."""
        curves, correlations = self.curve_figures(maps), self.spearman(maps)
        return {name: TrustFigures(**curves[name], spearman_occlusion=correlations[name]) for name in maps}


def trust_figures(model, images: torch.Tensor, maps: dict[str, torch.Tensor], target,
                  occlusion_map: torch.Tensor | None = None, steps: int = 8, n_random: int = 20,
                  seed: int = 0, batch_size: int = 512, bf16: bool = False,
                  removal: str = "mean") -> dict[str, TrustFigures]:
    """Trust figures of every map in `maps` ({name: [B, g, g]}) for normalised `images` [B, C, S, S]
    and `target` (an int or [B]): `TrustContext(...).figures(maps)`, whose docstring says what
    each setting does. Keep a `TrustContext` instead to score more maps of the same images later."""
    context = TrustContext(model, images, target, removal=removal, steps=steps, n_random=n_random, seed=seed,
                           batch_size=batch_size, bf16=bf16, occlusion_map=occlusion_map)
    return context.figures(maps)
