"""Every explanation method, one `Method` entry each in METHODS; everything else derives from it.

An entry says what the method is called (its name in the library, the command lines and the app's
API, and its label), how its map is computed, what that costs (fast: at most one forward and one
backward pass), whether it explains a class, whether it depends on the rollout settings (head
fusion, discard ratio), which models it explains, and where the app's method picker lists it.
The names the library accepts and its error messages, the maps a model supports, the faithfulness
tool's methods, the app's picker, labels and trust figures, the Compare view and the command-line
choices all read this list. Adding a method is adding an entry; its `compute` takes a `Batch` (the
images, the target, the settings and the passes maps share) and returns the map [B, g, g], raw,
patches row-major. A function with the signature of `vit_core.attribution`'s methods,
`fn(model, images, target, **options)`, becomes one with `batch_method(fn, **options)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from . import rollout
from .attribution import (Progress, check_images, integrated_gradients, lrp, occlusion, occlusion_drop,
                          predicted_class, target_tensor)
from .gradient_rules import has_rules
from .layout import TokenLayout, token_layout
from .libragrad import libragrad
from .model import ViTClassifier


@dataclass(frozen=True)
class Models:
    """Which models a method explains: those `accepts(model)` is true for; `needs` says which, for
    the message to a caller whose model it cannot explain."""

    accepts: Callable[[nn.Module], bool]
    needs: str


# The methods that read our ViTClassifier's own modules (token dropping).
OWN_VIT = Models(lambda model: isinstance(model, ViTClassifier), "vit_core's own ViTClassifier")
# The methods that run a ViT's layers with gradient rules (vit_core.gradient_rules: LRP's): ours and
# the timm and transformers ViTs of vit_core.adapters.adapt, whose wrappers hand out a rule walker.
RULE_VITS = Models(has_rules, "a ViT with gradient rules: vit_core's own ViTClassifier or a timm or "
                              "transformers ViT from vit_core.adapters.adapt")
# The methods that need only a model's forward pass, its attentions and its token layout: every
# model from `vit_core.adapters.adapt` (ours included).
ANY_VIT = Models(lambda model: True, "a model from vit_core.adapters.adapt")


class Batch:
    """A batch to explain and the passes its maps share. `images` are normalised [B, C, S, S],
    `target` the class explained per image (an int or [B]), `head_fusion` and `discard_ratio` the
    rollout settings, `progress(done, total)` what a slow method reports to. The forward pass that
    gives every block's attention and the one backward pass of `rollout.gradient_maps` run once
    each, when a map first needs them. `spare` holds gradient maps an earlier pass gave beside the
    one asked for (`vit_core.explanation.MapCache` keeps them per target); a map taken leaves it."""

    def __init__(self, model: nn.Module, images: torch.Tensor, target, head_fusion: str = "mean",
                 discard_ratio: float = 0.0, progress: Progress | None = None, spare: dict | None = None):
        rollout.check_rollout_settings(head_fusion, discard_ratio)
        self.model, self.images = model, check_images(model, images)
        self.target = target_tensor(target, len(images), len(model.class_names)).to(images.device)
        self.head_fusion, self.discard_ratio, self.progress = head_fusion, discard_ratio, progress
        self.spare = {} if spare is None else spare

    @property
    def layout(self) -> TokenLayout:
        return token_layout(self.model)

    @cached_property
    def attentions(self) -> torch.Tensor:
        """Every block's attention [B, L, H, T, T], from a forward pass without gradients."""
        return rollout.attention_passes(self.model, self.images, self.target, gradients=False)[2]

    def gradient_map(self, name: str) -> torch.Tensor:
        """Map `name` of `rollout.gradient_maps`: a spare if there is one, else from a new pass, whose
        other maps stay spare."""
        if name not in self.spare:
            self.spare.update(rollout.gradient_maps(self.model, self.images, self.target))
        return self.spare.pop(name)


def batch_method(fn: Callable[..., torch.Tensor], **options) -> Callable[[Batch], torch.Tensor]:
    """The `compute` of a method written as `fn(model, images, target, **options) -> [B, g, g]`;
    if `fn` takes `progress`, it gets the batch's."""
    reports = "progress" in inspect.signature(fn).parameters

    def compute(batch: Batch) -> torch.Tensor:
        extra = {"progress": batch.progress} if reports and batch.progress is not None else {}
        return fn(batch.model, batch.images, batch.target, **options, **extra)
    return compute


def _rollout(batch: Batch) -> torch.Tensor:
    return rollout.rollout_map(batch.attentions, batch.head_fusion, batch.discard_ratio, batch.layout)


def _last_layer(batch: Batch) -> torch.Tensor:
    return rollout.layer_maps(batch.attentions[:, -1:], batch.head_fusion, batch.layout)[:, 0]


def _from_gradient_pass(name: str) -> Callable[[Batch], torch.Tensor]:
    return lambda batch: batch.gradient_map(name)


@dataclass(frozen=True)
class Method:
    """One explanation method: what it is called, how its map is computed and what that means for
    the app (cost, class, settings, models, place in the picker)."""

    name: str                       # in the library, the command lines and the app's API
    label: str                      # in the app and its figures
    compute: Callable[[Batch], torch.Tensor]  # the map [B, g, g] of the batch's images for its target
    fast: bool = True               # at most one forward and one backward pass: the app scores it for every
                                    # image; slow ones are computed on request and report progress
    class_specific: bool = True     # explains the target (False: the same map whatever the class)
    rollout_settings: bool = False  # depends on the head fusion or the discard ratio
    models: Models = ANY_VIT        # which models it explains
    picker: float | None = None     # where the app's method picker lists it, lowest first (a number, so a
                                    # new entry can go between two); None: the library and the CLIs only


METHODS: tuple[Method, ...] = (
    Method("rollout", "rollout", _rollout, class_specific=False, rollout_settings=True, picker=5),
    Method("grad_rollout", "gradient rollout", _from_gradient_pass("grad_rollout"), picker=1),
    Method("last_layer", "last-layer attention", _last_layer, class_specific=False, rollout_settings=True,
           picker=6),
    Method("occlusion", "occlusion", batch_method(occlusion), fast=False, picker=7),
    Method("occlusion_drop", "occlusion, token dropped", batch_method(occlusion_drop), fast=False, models=OWN_VIT,
           picker=8),
    Method("integrated_gradients", "Integrated Gradients", batch_method(integrated_gradients), fast=False,
           picker=9),
    Method("input_x_gradient", "input × gradient", _from_gradient_pass("input_x_gradient"), picker=4),
    Method("attention_x_gradient", "attention × gradient", _from_gradient_pass("attention_x_gradient"), picker=2),
    Method("attnlrp", "AttnLRP", batch_method(lrp, rules="attnlrp"), models=RULE_VITS, picker=3),
    # The log-probability ranks patches as the public code's default, the probability, does
    # (d log p = dp / p); the logit is the score its shares sum to exactly (vit_core.libragrad).
    Method("libragrad", "LibraGrad", batch_method(libragrad, objective="logprob"), models=RULE_VITS, picker=3.5),
    Method("cp_lrp", "CP-LRP", batch_method(lrp, rules="cp_lrp"), models=RULE_VITS),
    # Explains the log-probability, the quantity occlusion measures (see attribution.lrp).
    Method("lrp_composite", "LRP (composite)", batch_method(lrp, rules="lrp_composite", objective="logprob"),
           models=RULE_VITS, picker=0),
)
METHOD = {method.name: method for method in METHODS}
METHOD_NAMES = tuple(METHOD)
# The app's method picker, in its order.
PICKER = tuple(sorted((m.name for m in METHODS if m.picker is not None), key=lambda name: METHOD[name].picker))


def check_methods(names: str | Sequence[str], what: str = "method") -> list[str]:
    """`names` (one name or several) as a list; ValueError naming the allowed values if any is not
    a method's name (`what` is how the message calls one)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in METHOD]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(f"unknown {what}{plural} {', '.join(map(repr, unknown))}; choose from {', '.join(METHOD)}")
    return names


def supported_methods(model: nn.Module) -> tuple[str, ...]:
    """The names of the methods that can explain `model`, in METHODS' order."""
    return tuple(m.name for m in METHODS if m.models.accepts(model))


def check_supported(model: nn.Module, names: Sequence[str]) -> None:
    """ValueError unless every method of `names` can explain `model`, saying what they need."""
    refused = [name for name in names if not METHOD[name].models.accepts(model)]
    if refused:
        needs = {METHOD[name].models.needs: [] for name in refused}
        for name in refused:
            needs[METHOD[name].models.needs].append(name)
        said = "; ".join(f"{', '.join(group)} need {need}" for need, group in needs.items())
        raise ValueError(f"{said}; for {type(model).__name__} choose from {', '.join(supported_methods(model))}")


def method_maps(model: nn.Module, images: torch.Tensor, methods: Sequence[str], target=None,
                head_fusion: str = "mean", discard_ratio: float = 0.0,
                progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The maps [B, g, g] of `methods` (names in METHODS, at least one) for normalised `images`,
    explaining `target` (an int or [B]; default: the predicted class), detached on the CPU. They
    share their passes (`Batch`): one forward and one backward pass serve all the fast ones."""
    methods = check_methods(list(methods))
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(METHOD)}")
    images = check_images(model, images)
    batch = Batch(model, images, predicted_class(model, images) if target is None else target,
                  head_fusion, discard_ratio, progress)
    return {name: METHOD[name].compute(batch).detach().cpu() for name in methods}


def attribute(model: nn.Module, images: torch.Tensor, method: str, target=None) -> torch.Tensor:
    """The `method` map [B, g, g] (a name in METHODS; default rollout settings) for `target` (an int
    or [B]; default: the predicted class)."""
    check_methods([method], what="attribution method")
    return method_maps(model, images, [method], target)[method]
