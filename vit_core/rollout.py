"""Explanations of the ViT's decision from its attention, computed in one forward pass.

- Attention rollout (Abnar & Zuidema 2020): per layer, fuse the heads, optionally discard the
  weakest patch links, add the identity for the residual stream, renormalise rows, and multiply the
  layers with later layers on the left. The CLS row of the product says how much each input patch
  flows into the CLS token.
- Gradient rollout (Chefer, Gur & Wolf 2021, generic attention rule): weight each attention map by
  the positive part of its gradient for the target class, average heads, and accumulate
  R <- R + A_l R from R = I. Class-specific, unlike plain rollout.

Every map comes back raw (no rescaling) with patches in row-major order, the order of
`vit_core.patchify`. Normalising for display belongs to `viz`. Maps read the model's
`layout.TokenLayout`: for our ViT the CLS row and the patch columns after it; for an adapted timm
ViT the explained row(s) among its prefix tokens (CLS, distillation, registers), or the mean of the
patch rows for a model that averages its patch tokens.

`explain` also offers the attribution maps of `vit_core.attribution` (LRP, gradients, occlusion,
Integrated Gradients) by name: asked for with `methods=` or later with `Explanation.with_maps`,
computed once per target class and joined to `Explanation.maps()`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layout import TokenLayout, cls_patch_map, patch_grid, token_layout
from .attribution import (ATTRIBUTION_METHODS, OWN_MODEL_METHODS, Progress, attention_x_gradient_map, patch_sums,
                          target_tensor)
from .model import ViTClassifier, eval_mode

HEAD_FUSIONS = ("mean", "max", "min")
# The maps every explanation holds, from one forward and one backward pass.
ATTENTION_METHODS = ("rollout", "grad_rollout", "last_layer")
# Every map an Explanation can offer, by name.
MAP_METHODS = ATTENTION_METHODS + tuple(ATTRIBUTION_METHODS)
# Those costing more than one forward and one backward pass per image (occlusion: one forward row
# per patch; Integrated Gradients: one forward and backward row per step): computed on request only.
SLOW_METHODS = ("occlusion", "occlusion_drop", "integrated_gradients")
# One backward pass of the target's logit to the attentions and the input gives all three.
GRADIENT_MAPS = ("grad_rollout", "attention_x_gradient", "input_x_gradient")


def check_methods(methods: Sequence[str]) -> list[str]:
    """`methods` as a list; ValueError naming the allowed values if any is not in MAP_METHODS."""
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in MAP_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(MAP_METHODS)}")
    return list(methods)


def supported_methods(model) -> tuple[str, ...]:
    """The names in MAP_METHODS that can explain `model`: all of them for our ViTClassifier; for a
    model from `vit_core.adapters.adapt`, all but `attribution.OWN_MODEL_METHODS`."""
    if isinstance(model, ViTClassifier):
        return MAP_METHODS
    return tuple(m for m in MAP_METHODS if m not in OWN_MODEL_METHODS)


def _check_rollout_args(head_fusion: str, discard_ratio: float) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"unknown head_fusion {head_fusion!r}; choose one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """[..., H, T, T] -> [..., T, T] by mean, max or min over the head dimension."""
    _check_rollout_args(head_fusion, 0.0)
    if head_fusion == "mean":
        return attention.mean(dim=-3)
    if head_fusion == "max":
        return attention.amax(dim=-3)
    return attention.amin(dim=-3)


def discard_weakest(attention: torch.Tensor, discard_ratio: float, n_prefix_tokens: int = 1) -> torch.Tensor:
    """In each row of [..., T, T], zero the floor(ratio * (T-P)) smallest patch entries (columns
    P..T-1, P = n_prefix_tokens); the prefix (CLS) columns are never discarded. Returns a new tensor."""
    _check_rollout_args("mean", discard_ratio)
    n_drop = math.floor(discard_ratio * (attention.shape[-1] - n_prefix_tokens))
    attention = attention.clone()
    if n_drop > 0:
        patches = attention[..., n_prefix_tokens:]
        weakest = patches.topk(n_drop, dim=-1, largest=False).indices
        patches.scatter_(-1, weakest, 0.0)  # a view: writes into `attention`
    return attention


def attention_rollout(attentions: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, n_prefix_tokens: int = 1) -> torch.Tensor:
    """Joint attention [B, T, T] from per-head attentions [B, L, H, T, T].

    For each layer l >= start_layer: fuse heads, discard (never the first `n_prefix_tokens`
    columns), add the identity, divide rows by their sums; then joint = A_L ... A_start (later
    layers on the left). Every row of the result sums to 1.
    """
    _check_rollout_args(head_fusion, discard_ratio)
    if attentions.ndim != 5:
        raise ValueError(f"attentions must be [B, L, H, T, T], got shape {tuple(attentions.shape)}")
    n_layers, tokens = attentions.shape[1], attentions.shape[-1]
    if not 0 <= start_layer < n_layers:
        raise ValueError(f"start_layer must be in [0, {n_layers}), got {start_layer}")
    eye = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device)
    joint = eye.expand(attentions.shape[0], tokens, tokens)
    for layer in range(start_layer, n_layers):
        a = discard_weakest(fuse_heads(attentions[:, layer], head_fusion), discard_ratio, n_prefix_tokens) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint


def gradient_rollout(attentions: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s relevancy [B, T, T] from attentions and d(target logit)/d(attentions),
    both [B, L, H, T, T]: R = I; R <- R + mean_h(max(0, grad * A)) @ R, layer by layer."""
    if attentions.shape != gradients.shape:
        raise ValueError("attentions and gradients must have the same shape")
    tokens = attentions.shape[-1]
    relevance = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device)
    relevance = relevance.expand(attentions.shape[0], tokens, tokens)
    for layer in range(attentions.shape[1]):
        weighted = (gradients[:, layer] * attentions[:, layer]).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


@dataclass
class Explanation:
    """Everything the app and the command line draw, for a batch of B images."""

    probs: torch.Tensor          # [B, C] softmax class probabilities
    target: torch.Tensor         # [B] class explained by grad_rollout
    attentions: torch.Tensor     # [B, L, H, T, T] per-head softmax attention of every block
    rollout: torch.Tensor        # [B, g, g] attention rollout, CLS (explained) row, raw
    grad_rollout: torch.Tensor | None  # [B, g, g] gradient rollout for `target`, raw; None until asked
                                       # for when made by explain(gradients=False) (see `maps()`)
    layer_maps: torch.Tensor     # [B, L, g, g] each layer's CLS -> patch attention (heads fused)
    last_layer: torch.Tensor     # [B, g, g] last layer's CLS -> patch attention (heads fused)
    head_fusion: str
    discard_ratio: float
    layout: TokenLayout = TokenLayout()  # which rows and columns of `attentions` the maps read
    # Class-specific maps already computed for these images, {target: {method: [B, g, g]}} with the
    # target a tuple (one class per image): gradient rollouts and attribution maps. Shared by every
    # Explanation derived from this one, since no setting changes them.
    _class_maps: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # Maps computed as a by-product of another ({target: {method: map}}, see GRADIENT_MAPS), moved
    # into _class_maps when asked for; shared the same way.
    _spare: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def maps(self) -> dict[str, torch.Tensor]:
        """The explanation maps by method name, each [B, g, g]: the three attention maps, then every
        attribution map computed so far for `target` (`explain(methods=...)`, `with_maps`)."""
        own = self._own_maps()
        attributions = {name: value for name, value in own.items() if name != "grad_rollout"}
        gradient = {"grad_rollout": own["grad_rollout"]} if "grad_rollout" in own else {}  # not yet asked for
        return {"rollout": self.rollout, **gradient, "last_layer": self.last_layer, **attributions}

    def _own_maps(self) -> dict[str, torch.Tensor]:
        """The cache's entry for `target` (created, with this gradient rollout, on first use)."""
        own = self._class_maps.setdefault(tuple(self.target.tolist()), {})
        if self.grad_rollout is not None:
            own.setdefault("grad_rollout", self.grad_rollout)
        return own

    def with_maps(self, model: ViTClassifier, images: torch.Tensor, methods: Sequence[str],
                  progress: Progress | None = None) -> "Explanation":
        """This explanation with the maps of `methods` (names in MAP_METHODS) for `target` in `maps()`;
        `images` are the ones it was computed from. Each attribution map is computed once per target
        (`attribution.ATTRIBUTION_METHODS`; see SLOW_METHODS for the costly ones) and then kept for
        this explanation and every one derived from it; so is the gradient rollout of an explanation
        made with `explain(gradients=False)`. The SLOW_METHODS report to `progress(done, total)` as
        they go. Returns self."""
        methods = check_methods(methods)
        self._check_images(images)
        own = self._own_maps()
        refused = [m for m in methods if m not in own and m not in supported_methods(model)]
        if refused:
            raise ValueError(f"{', '.join(refused)} need vit_core's own ViTClassifier; for "
                             f"{type(model).__name__} choose from {', '.join(supported_methods(model))}")
        missing = [m for m in methods if m not in own and m not in ("rollout", "last_layer")]
        for name in missing:
            slow = {"progress": progress} if name in SLOW_METHODS and progress is not None else {}
            own[name] = (self._gradient_map(model, images, self.target, name, own) if name in GRADIENT_MAPS else
                         ATTRIBUTION_METHODS[name](model, images, self.target.to(images.device), **slow).detach().cpu())
        return self

    def _gradient_map(self, model: ViTClassifier, images: torch.Tensor, target: torch.Tensor, name: str,
                      have: dict) -> torch.Tensor:
        """Map `name` (one of GRADIENT_MAPS) for `target`: a spare of an earlier `gradient_maps` pass
        for that target, else a new pass (one gives all three), whose other maps not in `have` stay
        as spares."""
        spare = self._spare.setdefault(tuple(target.tolist()), {})
        if name not in spare:
            spare.update({n: v for n, v in gradient_maps(model, images, target).items() if n not in have})
        return spare.pop(name)

    def with_settings(self, head_fusion: str, discard_ratio: float) -> "Explanation":
        """The same explanation for another head fusion / discard ratio, recomputed from the cached
        attentions (no forward pass). The gradient rollout does not depend on either and is kept."""
        _check_rollout_args(head_fusion, discard_ratio)
        if (head_fusion, discard_ratio) == (self.head_fusion, self.discard_ratio):
            return self
        prefix = self.layout.n_prefix_tokens
        layer_maps = cls_patch_map(fuse_heads(self.attentions, head_fusion), self.layout)
        return self._derived(
            rollout=cls_patch_map(attention_rollout(self.attentions, head_fusion, discard_ratio,
                                                    n_prefix_tokens=prefix), self.layout),
            layer_maps=layer_maps, last_layer=layer_maps[:, -1], head_fusion=head_fusion,
            discard_ratio=discard_ratio)

    def retarget(self, model: ViTClassifier, images: torch.Tensor, target: int | torch.Tensor) -> "Explanation":
        """The same explanation with the gradient rollout of class `target` (an int or [B]) instead
        of `self.target`; `images` are the ones it was computed from. Everything else is kept. The
        model runs (one forward and one backward pass, `gradient_maps`, whose other maps wait for
        `with_maps`) only the first time a target is asked for; later calls, from this explanation or
        any derived from it, reuse it."""
        self._check_images(images)
        try:
            wanted = torch.as_tensor(target, dtype=torch.long).expand(len(self.target))
        except RuntimeError:
            raise ValueError(f"target must be a class index or one per image ({len(self.target)}), "
                             f"got shape {tuple(torch.as_tensor(target).shape)}") from None
        if ((wanted < 0) | (wanted >= self.probs.shape[-1])).any():
            raise ValueError(f"target must be a class index in [0, {self.probs.shape[-1]})")
        key = tuple(wanted.tolist())
        self._own_maps()
        if key == tuple(self.target.tolist()):
            return self
        cached = self._class_maps.setdefault(key, {})
        if "grad_rollout" not in cached:
            cached["grad_rollout"] = self._gradient_map(model, images, wanted, "grad_rollout", cached)
        return self._derived(target=wanted.clone(), grad_rollout=cached["grad_rollout"])

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

    def _derived(self, **changes) -> "Explanation":
        """dataclasses.replace that keeps the shared cache of gradient rollouts."""
        derived = dataclasses.replace(self, **changes)
        derived._class_maps, derived._spare = self._class_maps, self._spare
        return derived

    def as_numpy(self) -> dict[str, np.ndarray]:
        """Every tensor and setting, and every map of `maps()`, as numpy arrays by name."""
        arrays = {name: getattr(self, name).numpy() for name in
                  ("probs", "target", "attentions", "rollout", "layer_maps", "last_layer")}
        arrays.update({name: value.numpy() for name, value in self.maps().items()})  # grad_rollout once known
        arrays["head_fusion"] = np.array(self.head_fusion)
        arrays["discard_ratio"] = np.array(self.discard_ratio)
        return arrays


def explain(model: ViTClassifier, images: torch.Tensor, target: int | torch.Tensor | None = None,
            head_fusion: str = "mean", discard_ratio: float = 0.0, methods: Sequence[str] = (),
            gradients: bool = True) -> Explanation:
    """Probabilities, attentions, rollout and gradient rollout for a normalised batch [B, 3, S, S],
    from one forward and one backward pass in float32. `model` is a ViTClassifier or a model made
    by `vit_core.adapters.adapt` / `load_model` (its maps: `supported_methods`). `target` (an int or
    [B]) defaults to the predicted class. `methods` (names in MAP_METHODS) are attribution maps
    computed now as well (`Explanation.with_maps` computes more later). With `gradients=False` only
    the forward pass runs: `grad_rollout` is None and `maps()` leaves it out until
    `with_maps(..., ["grad_rollout"])` asks for it (the app's uploads, shown with other methods)."""
    _check_rollout_args(head_fusion, discard_ratio)
    methods = check_methods(methods)
    if images.ndim != 4 or images.shape[1:] != (3, model.image_size, model.image_size):
        raise ValueError(f"images must be [B, 3, {model.image_size}, {model.image_size}] from "
                         f"vit_core.preprocess, got shape {tuple(images.shape)}")
    layout = token_layout(model)
    probs, target_t, attentions, grads, _ = _passes(model, images, target, gradients)
    layer_maps = cls_patch_map(fuse_heads(attentions, head_fusion), layout)
    explanation = Explanation(
        probs=probs,
        target=target_t,
        attentions=attentions,
        rollout=cls_patch_map(attention_rollout(attentions, head_fusion, discard_ratio,
                                                n_prefix_tokens=layout.n_prefix_tokens), layout),
        grad_rollout=None if grads is None else cls_patch_map(gradient_rollout(attentions, grads), layout),
        layer_maps=layer_maps,
        last_layer=layer_maps[:, -1],
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        layout=layout,
    )
    return explanation.with_maps(model, images.detach(), methods)


def gradient_maps(model: ViTClassifier, images: torch.Tensor, target) -> dict[str, torch.Tensor]:
    """GRADIENT_MAPS for `target` (an int or [B]) from one forward and one backward pass: the
    values of `explain(...).grad_rollout` and of `attribution.attention_x_gradient` and
    `input_x_gradient` (objective "logit"), each [B, g, g]."""
    _, _, attentions, grads, input_grad = _passes(model, images, target, True, input_gradient=True)
    layout = token_layout(model)
    return {"grad_rollout": cls_patch_map(gradient_rollout(attentions, grads), layout),
            "attention_x_gradient": attention_x_gradient_map(attentions, grads, model),
            "input_x_gradient": patch_sums(images.detach().float() * input_grad, model.patch_size)}


def _passes(model: ViTClassifier, images: torch.Tensor, target: int | torch.Tensor | None, gradients: bool,
            input_gradient: bool = False):
    """The model's forward pass (and, with `gradients`, the backward pass of the target's logit to
    every attention map, and with `input_gradient` to the input too): probs [B, C], target [B],
    attentions [B, L, H, T, T], their gradients or None, the input's gradient or None."""
    with eval_mode(model):
        # The input asks for gradients so the graph exists even if the weights are frozen.
        images = images.detach().float().requires_grad_(gradients)
        with torch.set_grad_enabled(gradients):
            logits, attention_list = model(images, return_attention=True)
            probs = logits.detach().softmax(dim=-1)
            target_t = probs.argmax(dim=-1) if target is None else target_tensor(target, len(images), probs.shape[-1])
            if gradients:
                score = logits.gather(1, target_t[:, None]).sum()  # samples are independent: one backward
                found = torch.autograd.grad(score, [*attention_list, images] if input_gradient else attention_list)
    attentions = torch.stack([a.detach() for a in attention_list], dim=1)
    grads = torch.stack(found[:len(attention_list)], dim=1) if gradients else None
    return probs, target_t, attentions, grads, found[-1] if gradients and input_gradient else None


def token_map(attentions: torch.Tensor, token: int, layer: int, head: int | None = None,
              n_prefix_tokens: int = 1) -> torch.Tensor:
    """Where one token attends, for ONE image: the row of `token` in block `layer`'s attention,
    restricted to the patch columns, as a [g, g] grid (row-major patches).

    `attentions` is [L, H, T, T] (one image of `Explanation.attentions`); token 0 is CLS and token
    i + 1 is patch i (i + P after P = `n_prefix_tokens` prefix tokens); `layer` may be negative
    (-1 = last block); `head` None averages the heads."""
    attentions = torch.as_tensor(attentions)
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be [L, H, T, T] for one image, got shape {tuple(attentions.shape)}")
    n_layers, n_heads, tokens = attentions.shape[0], attentions.shape[1], attentions.shape[-1]
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer must be in [{-n_layers}, {n_layers}), got {layer}")
    if not 0 <= token < tokens:
        raise ValueError(f"token must be in [0, {tokens}) (0 = CLS, i + 1 = patch i), got {token}")
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head must be None (mean over heads) or in [0, {n_heads}), got {head}")
    per_layer = attentions[layer]
    matrix = per_layer.mean(dim=0) if head is None else per_layer[head]
    return patch_grid(matrix[token, n_prefix_tokens:])
