"""One explanation of a batch of images, as a value, and the cache that lets explanations share work.

`explain` runs the model once (one forward and, unless told not to, one backward pass) and returns
an `Explanation`: probabilities, every block's attention, attention rollout, last-layer attention
and the gradient rollout, for one target class and one pair of rollout settings. Its methods return
new explanations and never change one: `with_settings` (other rollout settings, from the cached
attentions), `retarget` (another class) and `with_maps` (more maps of `vit_core.methods`, by name).

What one explanation computes, another of the same images may reuse: a `MapCache`, owned by the
caller (the app keeps one per image), holds the class-specific maps computed so far, per target, and
is the one thing these calls change. Without one, nothing is kept between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .attribution import Progress
from .layout import TokenLayout, cls_patch_map, token_layout
from .methods import METHOD, Batch, check_methods, check_supported
from .rollout import (attention_passes, check_rollout_settings, fuse_heads, gradient_rollout, layer_maps,
                      rollout_map, token_map)


def _key(target: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.as_tensor(target).tolist())


class MapCache:
    """The class-specific maps computed so far for one batch of images, by target (one class per
    image) and method, and the gradient maps a shared pass gave beside the one asked for (kept apart
    until asked for, see `methods.Batch`). Maps that depend on the rollout settings are not kept:
    one cache serves every setting."""

    def __init__(self):
        self._maps: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._spare: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def maps(self, target) -> dict[str, torch.Tensor]:
        """The maps kept for `target` ([B] class indices), by method (a copy)."""
        return dict(self._maps.get(_key(target), {}))

    def add(self, target, maps: Mapping[str, torch.Tensor]) -> None:
        """Keeps those of `maps` (for `target`) that are class-specific and independent of the
        rollout settings; a map already kept stays."""
        entry = self._maps.setdefault(_key(target), {})
        for name, value in maps.items():
            if METHOD[name].class_specific and not METHOD[name].rollout_settings:
                entry.setdefault(name, value)

    def spare(self, target) -> dict[str, torch.Tensor]:
        """The spare gradient maps for `target`: a live dict, which a `methods.Batch` takes from and adds to."""
        return self._spare.setdefault(_key(target), {})


@dataclass(frozen=True, eq=False)
class Explanation:
    """Everything the app and the command line draw, for a batch of B images."""

    probs: torch.Tensor          # [B, C] softmax class probabilities
    target: torch.Tensor         # [B] class explained by grad_rollout and the maps in `extra`
    attentions: torch.Tensor     # [B, L, H, T, T] per-head softmax attention of every block
    rollout: torch.Tensor        # [B, g, g] attention rollout, CLS (explained) row, raw
    grad_rollout: torch.Tensor | None  # [B, g, g] gradient rollout for `target`, raw; None until asked
                                       # for when made by explain(gradients=False) (see `maps()`)
    layer_maps: torch.Tensor     # [B, L, g, g] each layer's CLS -> patch attention (heads fused)
    last_layer: torch.Tensor     # [B, g, g] last layer's CLS -> patch attention (heads fused)
    head_fusion: str
    discard_ratio: float
    layout: TokenLayout = TokenLayout()  # which rows and columns of `attentions` the maps read
    # The other maps of vit_core.methods for `target` (`with_maps`), by name, in the order asked for.
    extra: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def maps(self) -> dict[str, torch.Tensor]:
        """The explanation maps by method name, each [B, g, g]: the three attention maps (the
        gradient rollout once known), then the others this explanation holds."""
        gradient = {} if self.grad_rollout is None else {"grad_rollout": self.grad_rollout}
        return {"rollout": self.rollout, **gradient, "last_layer": self.last_layer, **self.extra}

    def with_maps(self, model: nn.Module, images: torch.Tensor, methods: Sequence[str],
                  cache: MapCache | None = None, progress: Progress | None = None) -> "Explanation":
        """This explanation holding the maps of `methods` (names in `methods.METHODS`) for `target`
        as well; `images` are the ones it was computed from. A map `cache` holds for the target is
        taken from it, one computed is kept there; slow methods report to `progress(done, total)`.
        ValueError for an unknown method or one that cannot explain `model`."""
        methods = check_methods(methods)
        self._check_images(images)
        cache = MapCache() if cache is None else cache
        present = self.maps()
        cache.add(self.target, present)
        known = cache.maps(self.target)
        missing = [m for m in dict.fromkeys(methods) if m not in present and m not in known]
        check_supported(model, missing)
        computed = self._compute(model, images, missing, cache, progress) if missing else {}
        cache.add(self.target, computed)
        added = {m: computed[m] if m in computed else known[m] for m in methods if m not in present}
        return dataclasses.replace(self, grad_rollout=added.pop("grad_rollout", self.grad_rollout),
                                   extra={**self.extra, **added})

    def _compute(self, model: nn.Module, images: torch.Tensor, methods: list[str], cache: MapCache,
                 progress: Progress | None) -> dict[str, torch.Tensor]:
        """The maps of `methods` for this explanation's target and settings, sharing their passes."""
        batch = Batch(model, images, self.target, self.head_fusion, self.discard_ratio, progress,
                      spare=cache.spare(self.target))
        return {name: METHOD[name].compute(batch).detach().cpu() for name in methods}

    def with_settings(self, head_fusion: str, discard_ratio: float) -> "Explanation":
        """The same explanation for another head fusion / discard ratio, recomputed from the cached
        attentions (no forward pass). Maps that do not depend on either are kept."""
        check_rollout_settings(head_fusion, discard_ratio)
        if (head_fusion, discard_ratio) == (self.head_fusion, self.discard_ratio):
            return self
        layers = layer_maps(self.attentions, head_fusion, self.layout)
        return dataclasses.replace(
            self, rollout=rollout_map(self.attentions, head_fusion, discard_ratio, self.layout), layer_maps=layers,
            last_layer=layers[:, -1], head_fusion=head_fusion, discard_ratio=discard_ratio,
            extra={name: value for name, value in self.extra.items() if not METHOD[name].rollout_settings})

    def retarget(self, model: nn.Module, images: torch.Tensor, target: int | torch.Tensor,
                 cache: MapCache | None = None) -> "Explanation":
        """The same explanation for class `target` (an int or [B]) instead of `self.target`; `images`
        are the ones it was computed from. It holds the gradient rollout of that class and every
        other map `cache` holds for it; the attentions and the class-free maps are kept. The model
        runs (one forward and one backward pass, whose other gradient maps wait in the cache) only
        when `cache` has no gradient rollout of that class."""
        self._check_images(images)
        try:
            wanted = torch.as_tensor(target, dtype=torch.long).expand(len(self.target))
        except RuntimeError:
            raise ValueError(f"target must be a class index or one per image ({len(self.target)}), "
                             f"got shape {tuple(torch.as_tensor(target).shape)}") from None
        if ((wanted < 0) | (wanted >= self.probs.shape[-1])).any():
            raise ValueError(f"target must be a class index in [0, {self.probs.shape[-1]})")
        if _key(wanted) == _key(self.target):
            return self
        cache = MapCache() if cache is None else cache
        cache.add(self.target, self.maps())
        known = cache.maps(wanted)
        if "grad_rollout" not in known:
            known["grad_rollout"] = Batch(model, images, wanted, spare=cache.spare(wanted)).gradient_map("grad_rollout")
            cache.add(wanted, known)
        return dataclasses.replace(self, target=wanted.clone(), grad_rollout=known["grad_rollout"],
                                   extra={name: value for name, value in known.items() if name != "grad_rollout"})

    def _check_images(self, images: torch.Tensor) -> None:
        if images.shape[0] != len(self.target):
            raise ValueError(f"images must be the {len(self.target)} this explanation was computed from, "
                             f"got a batch of {images.shape[0]}")

    def head_attention(self, head: int | None = None) -> torch.Tensor:
        """Every block's attention matrix for one head, or the plain mean of the heads when `head`
        is None, [B, L, T, T]. (Head fusion by max or min is a rollout setting, not used here.)"""
        n_heads = self.attentions.shape[2]
        if head is None:
            return fuse_heads(self.attentions, "mean")
        if not 0 <= head < n_heads:
            raise ValueError(f"head must be None (mean over heads) or in [0, {n_heads}), got {head}")
        return self.attentions[:, :, head]

    def token_attention(self, token: int, layer: int, head: int | None = None) -> torch.Tensor:
        """Where `token` attends in block `layer`, for each image: `token_map` of every image's
        attentions, [B, g, g]. Token 0 is CLS, token i + 1 patch i (i + P after P prefix tokens);
        `head` None averages the heads."""
        prefix = self.layout.n_prefix_tokens
        return torch.stack([token_map(attentions, token, layer, head, prefix) for attentions in self.attentions])

    def as_numpy(self) -> dict[str, np.ndarray]:
        """Every tensor and setting, and every map of `maps()`, as numpy arrays by name."""
        tensors = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        arrays = {name: value.numpy() for name, value in tensors.items() if torch.is_tensor(value)}
        arrays.update({name: value.numpy() for name, value in self.maps().items()})
        arrays["head_fusion"] = np.array(self.head_fusion)
        arrays["discard_ratio"] = np.array(self.discard_ratio)
        return arrays


# The maps every Explanation holds (its fields named after a method), in METHODS' order.
HELD_METHODS = tuple(name for name in METHOD if name in {field.name for field in dataclasses.fields(Explanation)})


def explain(model: nn.Module, images: torch.Tensor, target: int | torch.Tensor | None = None,
            head_fusion: str = "mean", discard_ratio: float = 0.0, methods: Sequence[str] = (),
            gradients: bool = True, cache: MapCache | None = None) -> Explanation:
    """Probabilities, attentions, rollout and gradient rollout for a normalised batch [B, 3, S, S],
    from one forward and one backward pass in float32. `model` is a ViTClassifier or a model made
    by `vit_core.adapters.adapt` / `load_model` (its maps: `methods.supported_methods`). `target`
    (an int or [B]) defaults to the predicted class. `methods` (names in `methods.METHODS`) are
    other maps computed now as well (`Explanation.with_maps` computes more later, kept in `cache`).
    With `gradients=False` only the forward pass runs: `grad_rollout` is None and `maps()` leaves it
    out until `with_maps(..., ["grad_rollout"])` asks for it (the app's uploads, shown with other
    methods)."""
    check_rollout_settings(head_fusion, discard_ratio)
    methods = check_methods(methods)
    if images.ndim != 4 or images.shape[1:] != (3, model.image_size, model.image_size):
        raise ValueError(f"images must be [B, 3, {model.image_size}, {model.image_size}] from "
                         f"vit_core.preprocess, got shape {tuple(images.shape)}")
    layout = token_layout(model)
    probs, target_t, attentions, grads, _ = attention_passes(model, images, target, gradients)
    layers = layer_maps(attentions, head_fusion, layout)
    explanation = Explanation(
        probs=probs, target=target_t, attentions=attentions,
        rollout=rollout_map(attentions, head_fusion, discard_ratio, layout),
        grad_rollout=None if grads is None else cls_patch_map(gradient_rollout(attentions, grads), layout),
        layer_maps=layers, last_layer=layers[:, -1], head_fusion=head_fusion, discard_ratio=discard_ratio,
        layout=layout)
    return explanation.with_maps(model, images.detach(), methods, cache) if methods else explanation
