"""The attention maps of a ViT's decision, computed from every block's attention in one forward pass.

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

`attention_passes` runs the model once (forward, and backward from the target's logit when asked);
`gradient_maps` gives the three maps one backward pass yields. `vit_core.methods` names the maps,
`vit_core.explanation` bundles them for a batch of images.
"""

from __future__ import annotations

import math

import torch

from .attribution import attention_x_gradient_map, patch_sums, target_tensor
from .layout import TokenLayout, cls_patch_map, patch_grid, token_layout
from .model import ViTClassifier, eval_mode

HEAD_FUSIONS = ("mean", "max", "min")


def check_rollout_settings(head_fusion: str, discard_ratio: float) -> None:
    """ValueError, naming the allowed values, unless `head_fusion` is one of HEAD_FUSIONS and
    `discard_ratio` a number in [0, 1): the one check of the rollout settings (the app and the
    command lines pass its message on)."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"unknown head fusion {head_fusion!r} (head_fusion); choose one of {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard ratio (discard_ratio) must be a number in [0, 1), got {discard_ratio!r}")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """[..., H, T, T] -> [..., T, T] by mean, max or min over the head dimension."""
    check_rollout_settings(head_fusion, 0.0)
    if head_fusion == "mean":
        return attention.mean(dim=-3)
    if head_fusion == "max":
        return attention.amax(dim=-3)
    return attention.amin(dim=-3)


def discard_weakest(attention: torch.Tensor, discard_ratio: float, n_prefix_tokens: int = 1) -> torch.Tensor:
    """In each row of [..., T, T], zero the floor(ratio * (T-P)) smallest patch entries (columns
    P..T-1, P = n_prefix_tokens); the prefix (CLS) columns are never discarded. Returns a new tensor."""
    check_rollout_settings("mean", discard_ratio)
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
    check_rollout_settings(head_fusion, discard_ratio)
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


def rollout_map(attentions: torch.Tensor, head_fusion: str, discard_ratio: float,
                layout: TokenLayout = TokenLayout()) -> torch.Tensor:
    """Attention rollout [B, g, g] from every block's attentions [B, L, H, T, T]: the layout's
    explained row of `attention_rollout`, patch columns (prefix columns never discarded)."""
    joint = attention_rollout(attentions, head_fusion, discard_ratio, n_prefix_tokens=layout.n_prefix_tokens)
    return cls_patch_map(joint, layout)


def layer_maps(attentions: torch.Tensor, head_fusion: str, layout: TokenLayout = TokenLayout()) -> torch.Tensor:
    """Each block's explained row of its head-fused attention, patch columns: [B, L, g, g] from
    [B, L, H, T, T]; the last of them is the last-layer attention map."""
    return cls_patch_map(fuse_heads(attentions, head_fusion), layout)


def gradient_maps(model: ViTClassifier, images: torch.Tensor, target) -> dict[str, torch.Tensor]:
    """The maps one forward and one backward pass give for `target` (an int or [B]), each [B, g, g]
    by method name: gradient rollout and the values of `attribution.attention_x_gradient` and
    `input_x_gradient` (objective "logit")."""
    _, _, attentions, grads, input_grad = attention_passes(model, images, target, True, input_gradient=True)
    return {"grad_rollout": cls_patch_map(gradient_rollout(attentions, grads), token_layout(model)),
            "attention_x_gradient": attention_x_gradient_map(attentions, grads, model),
            "input_x_gradient": patch_sums(images.detach().float() * input_grad, model.patch_size)}


def attention_passes(model: ViTClassifier, images: torch.Tensor, target: int | torch.Tensor | None, gradients: bool,
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
