"""Patch attribution maps beyond attention: occlusion, gradients, Integrated Gradients and LRP.

Every method has the signature `fn(model, images, target) -> [B, g, g]`: `images` are normalised
[B, C, S, S] (as from `vit_core.preprocess`), `target` is the class explained for each image (an int
or a LongTensor [B]), and the map holds raw values, one per patch, in row-major order (the order of
`vit_core.patchify`), positive where the patch supports the target. `vit_core.methods` names them
(its `attribute(model, images, method)` computes one by name, for the predicted class by default).
`model` is our ViTClassifier or any model from `vit_core.adapters.adapt`, except where a method
reads our ViTClassifier's modules (token dropping, LRP's rules per layer), which says so.

The gradient methods take gradients with respect to the input only (`torch.autograd.grad`), so
parameters keep their `requires_grad` flags and get no `.grad`; the model runs in eval mode and is
left in the mode it came in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .gradient_rules import LRPRules, lrp_rules, rules_forward
from .layout import cls_patch_map, token_layout
from .model import ViTClassifier, eval_mode, patchify

OCCLUSION_MODES = ("mean", "drop")
OBJECTIVES = ("logit", "logprob")
# Rows per forward pass in the batched methods: enough to keep the matrix products efficient,
# few enough to bound the activation memory of one pass. Occlusion counts tokens instead (512
# rows of our 65-token ViT), so a larger model's passes stay as light and report progress.
ROWS_PER_PASS = 512
TOKENS_PER_PASS = 512 * 65
# progress(done, total): called by the slow methods as their work advances, in about
# PROGRESS_STEPS steps per image where the work is large enough to be worth showing.
Progress = Callable[[int, int], None]
PROGRESS_STEPS = 8


# ----------------------------------------------------------------------------------------------
# Shared helpers

def check_images(model: ViTClassifier, images: torch.Tensor) -> torch.Tensor:
    size = model.image_size
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-2:] != (size, size):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a normalised batch [B, C, {size}, {size}], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats (vit_core.normalize), got {images.dtype}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    return images.detach()


def _require_own(model: nn.Module, method: str) -> None:
    """ValueError unless `model` is our ViTClassifier: `method` reads its modules."""
    if not isinstance(model, ViTClassifier):
        raise ValueError(f"{method} reads the modules of vit_core's own ViTClassifier and cannot explain a "
                         f"{type(model).__name__}; vit_core.methods.supported_methods(model) lists the methods "
                         f"that can")


def target_tensor(target, batch: int, n_classes: int) -> torch.Tensor:
    """`target` (an int or [B] class indices) as a LongTensor [batch]; ValueError when it is not a
    class index in [0, n_classes) or does not match the batch."""
    target_t = torch.as_tensor(target).flatten()
    if target_t.is_floating_point() or target_t.is_complex() or target_t.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target_t.dtype}")
    target_t = target_t.long()
    if target_t.numel() == 1:
        target_t = target_t.expand(batch)
    if target_t.shape != (batch,):
        raise ValueError(f"target must be an int or [B] = [{batch}] class indices, got {target_t.numel()} values")
    if ((target_t < 0) | (target_t >= n_classes)).any():
        raise ValueError(f"target must be a class index in [0, {n_classes}), got {target_t.tolist()}")
    return target_t.clone()


def _n_classes(model: ViTClassifier) -> int:
    return len(model.class_names)


def _score(logits: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """Per-image explained quantity [B]: the target's logit or its log-probability."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if objective == "logprob":
        logits = logits.log_softmax(dim=-1)
    return logits.gather(1, target[:, None].to(logits.device)).squeeze(1)


def patch_sums(pixel_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-pixel values [B, C, S, S] -> per-patch sums over channels and pixels [B, g, g]."""
    return patchify(pixel_map, patch_size).sum(dim=(-3, -2, -1))


def _input_gradient(model: ViTClassifier, images: torch.Tensor, target: torch.Tensor,
                    objective: str, forward: Callable | None = None) -> torch.Tensor:
    """d score / d images for a batch; images are independent in eval mode, so one backward pass
    of the summed scores gives every image's gradient."""
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = (forward or model)(inputs)
        (gradient,) = torch.autograd.grad(_score(logits, target, objective).sum(), inputs)
    return gradient


# ----------------------------------------------------------------------------------------------
# Occlusion

def _patch_keep_masks(model: ViTClassifier, device) -> torch.Tensor:
    """[n, 1, S, S]: mask i is 0 on patch i and 1 elsewhere (row-major patches)."""
    grid, patch = model.grid_size, model.patch_size
    eye = torch.eye(grid * grid, device=device).view(-1, 1, grid, grid)
    return 1.0 - eye.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


@torch.no_grad()
def occlusion(model: ViTClassifier, images: torch.Tensor, target, mode: str = "mean",
              progress: Progress | None = None) -> torch.Tensor:
    """Leave-one-patch-out: the drop in the target's log-probability when one patch is removed.

    `mode` "mean" fills the patch with the dataset mean (0 in normalised pixels), the fill the
    deletion/insertion curves use; "drop" leaves the patch token out of the sequence (CLS and the
    other patch tokens keep their position embeddings), so no out-of-distribution grey patch is
    shown to the model. Exact by construction (no approximation); class-specific; costs one
    forward row per patch plus one per image, in passes of at most TOKENS_PER_PASS tokens.
    `progress(done, total)` is called after each pass with the perturbed rows done so far.
    """
    if mode not in OCCLUSION_MODES:
        raise ValueError(f"unknown occlusion mode {mode!r}; choose one of {OCCLUSION_MODES}")
    if mode == "drop":
        _require_own(model, "occlusion with mode 'drop'")
    images = check_images(model, images)
    target = target_tensor(target, len(images), _n_classes(model))
    n_patches = model.grid_size ** 2
    per_pass = _rows_per_pass(model, progress)
    chunk = max(1, per_pass // n_patches)
    total, maps = len(images) * n_patches, []
    with eval_mode(model):
        for start in range(0, len(images), chunk):
            x, t = images[start:start + chunk], target[start:start + chunk]
            full = _score(model(x), t, "logprob")
            tokens = model.embed(x) if mode == "drop" else None
            scores = []
            for rows in torch.arange(len(x) * n_patches).split(per_pass):
                logits = _occluded_logits(model, x, tokens, rows)
                scores.append(_score(logits, t[rows // n_patches], "logprob"))
                if progress is not None:
                    progress(start * n_patches + int(rows[-1]) + 1, total)
            maps.append(full[:, None] - torch.cat(scores).view(len(x), n_patches))
    return torch.cat(maps).view(len(images), model.grid_size, model.grid_size)


def _rows_per_pass(model: ViTClassifier, progress: Progress | None) -> int:
    """Perturbed inputs per forward pass: TOKENS_PER_PASS tokens' worth; when progress is shown,
    about PROGRESS_STEPS passes per image, unless that makes passes of under an eighth of it."""
    n_patches = model.grid_size ** 2
    tokens = n_patches + 1  # a CLS token or so: a budget needs no more precision
    rows = TOKENS_PER_PASS // tokens
    if progress is not None:
        rows = min(rows, max(-(-n_patches // PROGRESS_STEPS), TOKENS_PER_PASS // 8 // tokens))
    return max(1, rows)


def _occluded_logits(model: ViTClassifier, x: torch.Tensor, tokens: torch.Tensor | None,
                     rows: torch.Tensor) -> torch.Tensor:
    """Logits of perturbed rows `rows` of images x [b, C, S, S]: row r is image r // n with patch
    r % n filled with the mean, or, given the images' `tokens` (`model.embed(x)`), its token dropped."""
    n_patches = model.grid_size ** 2
    image, patch = rows // n_patches, rows % n_patches
    if tokens is None:
        return model(x[image] * _patch_keep_masks(model, x.device)[patch.to(x.device)])
    # Sequence r keeps CLS and every patch token but its patch's (token patch + 1).
    others = torch.arange(1, n_patches, device=x.device).expand(len(rows), -1)
    kept = others + (others > patch[:, None].to(x.device))
    keep = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long, device=x.device), kept], dim=1)
    return model.subset_logits(tokens, image.to(x.device), keep)


def occlusion_drop(model: ViTClassifier, images: torch.Tensor, target, progress: Progress | None = None) -> torch.Tensor:
    """`occlusion` with mode "drop": the patch token is left out of the sequence."""
    return occlusion(model, images, target, mode="drop", progress=progress)


# ----------------------------------------------------------------------------------------------
# Gradient methods

def input_x_gradient(model: ViTClassifier, images: torch.Tensor, target, objective: str = "logit") -> torch.Tensor:
    """Input x gradient of the target's score, summed per patch (over channels and pixels).

    The first-order Taylor estimate of what setting each patch to the dataset mean (0) would
    change; exact only for a model linear in its input. Class-specific; one forward + one
    backward pass.
    """
    images = check_images(model, images)
    target = target_tensor(target, len(images), _n_classes(model))
    with eval_mode(model):
        gradient = _input_gradient(model, images, target, objective)
    return patch_sums(images * gradient, model.patch_size)


def attention_x_gradient(model: ViTClassifier, images: torch.Tensor, target, objective: str = "logit") -> torch.Tensor:
    """Attention x gradient (Grad-SAM, Barkan et al. 2021; the "GradCAM" baseline of Chefer et
    al. 2021): per block, ReLU(dScore/dA * A) averaged over heads; summed over blocks; the
    explained row (CLS for our ViT; see `layout.TokenLayout`), patch columns.

    Class-specific through the gradient; no completeness promise (the values are not in logit
    units). One forward + one backward pass, the attentions being the ones the model's own
    forward pass multiplies the values by (`forward(..., return_attention=True)`).
    """
    images = check_images(model, images)
    target = target_tensor(target, len(images), _n_classes(model))
    with eval_mode(model), torch.enable_grad():
        inputs = images.clone().requires_grad_(True)  # so a graph exists even with frozen weights
        logits, attentions = model(inputs, return_attention=True)
        gradients = torch.autograd.grad(_score(logits, target, objective).sum(), attentions)
    return attention_x_gradient_map(torch.stack([a.detach() for a in attentions], 1), torch.stack(gradients, 1),
                                    model)


def attention_x_gradient_map(attentions: torch.Tensor, gradients: torch.Tensor, model) -> torch.Tensor:
    """`attention_x_gradient` from every block's attentions and their gradients, both [B, L, H, T, T]."""
    return cls_patch_map((gradients * attentions).clamp(min=0).mean(dim=2).sum(dim=1), token_layout(model))


def integrated_gradients(model: ViTClassifier, images: torch.Tensor, target, steps: int = 32,
                         objective: str = "logit", progress: Progress | None = None) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from the dataset-mean image (0 after
    normalisation), Gauss-Legendre quadrature with `steps` points, via Captum; summed per patch.

    Completeness: the map sums to score(image) - score(mean image) up to the quadrature error.
    Class-specific. Costs `steps` forward and backward rows per image, batched;
    `progress(done, total)` is called after each forward pass with the rows done so far.
    """
    from captum.attr import IntegratedGradients  # imported here: captum takes seconds to import

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    images = check_images(model, images)
    target = target_tensor(target, len(images), _n_classes(model))

    total, done = steps * len(images), [0]

    def forward(x):
        logits = model(x)
        if progress is not None:  # Captum runs the path points in passes of `rows`
            done[0] = min(total, done[0] + len(x))
            progress(done[0], total)
        return logits.log_softmax(dim=-1) if objective == "logprob" else logits

    rows = max(len(images), ROWS_PER_PASS // len(images) * len(images))
    with eval_mode(model), torch.enable_grad():
        pixels = IntegratedGradients(forward).attribute(
            images, baselines=torch.zeros_like(images), target=target.to(images.device), n_steps=steps,
            internal_batch_size=rows)
    return patch_sums(pixels.detach(), model.patch_size)


# ----------------------------------------------------------------------------------------------
# Layer-wise relevance propagation through modified gradients
#
# LRP rules are applied by the "modified gradient" trick: a dedicated forward pass computes the
# very same logits, with some factors detached or their gradient rescaled, so that input x
# gradient of that pass equals the relevance the rules would propagate layer by layer
# (`gradient_rules`: the rules per layer, and the pass through our ViT and the adapted timm and
# transformers ViTs). Hand-written because our attention is spelled out by hand, which LRP
# libraries built around Hugging Face or torchvision modules cannot patch.

def lrp_forward(model: ViTClassifier, images: torch.Tensor, rules: str | LRPRules = "attnlrp") -> torch.Tensor:
    """The model's eval-mode logits, computed so that input x gradient of them is the relevance
    `rules` propagate (see `LRPRules`); `gradient_rules.rules_forward`."""
    return rules_forward(model, images, rules)


def lrp(model: ViTClassifier, images: torch.Tensor, target, rules: str | LRPRules = "attnlrp",
        objective: str = "logit") -> torch.Tensor:
    """Relevance of each patch as input x modified gradient (`lrp_forward`), summed per patch.
    Class-specific; one forward + one backward pass. Our ViT, and the timm and transformers ViTs
    of `vit_core.adapters` (their attention, LayerNorm and MLP get the same rules).

    - "attnlrp" (Achtibat et al., ICML 2024): identity rule on LayerNorm and GELU, uniform rule on
      both attention products, softmax rule; linear layers epsilon rule.
    - "cp_lrp" (Ali et al., ICML 2022): the same with the attention probabilities held constant.
      Conservative: the network it differentiates is affine in the input, so for the logit the
      relevance summed over all pixels equals the target logit minus the biases' share (what the
      same frozen network gives the all-zero input: biases, CLS token, position embedding); for a
      model without those, exactly the logit.
    - "lrp_composite": picked on an earlier shipped checkpoint (50 test images) to agree with
      leave-one-patch-out, and checked on other images (benchmarks/trust_probe.py --seed):
      identity rule on the blocks' LayerNorms and GELU, gamma rule (0.05) on the blocks' linear
      layers, and the plain gradient through the attention and the final LayerNorm. Not
      conservative (A @ V passes full relevance to both factors): a ranking, not a budget.
      Its registry entry explains the log-probability, the quantity occlusion measures.
    AttnLRP's softmax rule is not conservative either; its sum only approximates the logit.
    """
    rules = lrp_rules(rules)
    images = check_images(model, images)
    target = target_tensor(target, len(images), _n_classes(model))
    with eval_mode(model):
        gradient = _input_gradient(model, images, target, objective,
                                   forward=lambda x: lrp_forward(model, x, rules))
    return patch_sums(images * gradient, model.patch_size)


@torch.no_grad()
def predicted_class(model: ViTClassifier, images: torch.Tensor) -> torch.Tensor:
    """The model's predicted class [B] (eval mode)."""
    with eval_mode(model):
        return model(check_images(model, images)).argmax(dim=-1)
