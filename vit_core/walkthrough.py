"""The Walkthrough: one image's whole way through a ViT, as the numbers an app draws step by step.

pixels -> patches -> tokens (a 3-component PCA of the patch tokens) -> position embedding -> the
prefix (CLS) token -> each block (where the read token attends, and a logit lens: the model's own
final norm and head applied to the tokens after that block) -> which heads matter (each head
knocked out alone) -> the decision and a relevance map -> what if the most relevant patches go.

`walkthrough(model, images)` takes every per-block number from one forward pass that keeps each
block's input and attention; the L x H head knock-outs then run as one batch in which a head's
rows join at its own block, starting from that block's kept input (the blocks before it are
unchanged, so they need not run again). `walkthrough_payload` adds the map, the what-if curves
(one batched pass) and the narration (`vit_core.narration`) as plain JSON for a browser.

Our ViTClassifier and the timm / transformers ViTs of `vit_core.adapters` are all read through a
small `_Stack` per kind: how to embed, run one block, find a block's attention output projection
(a head is knocked out by a forward pre-hook that zeroes its slice of the projection's input, so
the projection's bias stays; it acts on the calling thread's passes only, so the app's other
requests may use the same model meanwhile) and read the logits off the tokens.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import narration
from .adapters import HF_CLASSES, HFViT, TimmViT, capture_attention, eager_attention
from .layout import TokenLayout, cls_patch_map
from .faithfulness import kept_class_probabilities, moved_counts
from .model import ViTClassifier, eval_mode, patchify
from .narration import whatif_sentence  # noqa: F401  (the UI phrases any k with it)
from .explanation import explain
from .methods import METHOD
from .scope import pre_hook
from .trust import bfloat16_copy

PAYLOAD_VERSION = 1
REMOVAL_NAMES = {"drop": "token drop", "mean": "mean fill"}
NO_LENS = ("This model has no final norm before its head, so the head cannot be applied to the tokens "
           "inside the network: the logit lens is left out.")


# ----------------------------------------------------------------------------------------------
# One interface over the three kinds of model

class _OwnStack:
    """Our ViTClassifier, its blocks run by their own explicit attention (`Block.attend`)."""

    def __init__(self, model: ViTClassifier):
        self.model, self.layout, self.prefix_names = model, TokenLayout(), ("CLS",)
        self.depth, self.heads = model.depth, model.n_heads

    def embed(self, images):
        return self.model.embed(images)

    def patch_tokens(self, images):
        return self.model.patch_embed(patchify(images, self.model.patch_size).flatten(1, 2).flatten(2))

    def positions(self):
        return self.model.pos_embed[0, 1:]

    def step(self, layer: int, x, weights: bool = False):
        """Block `layer` on tokens x; without `weights` the last block runs for the CLS query
        alone (the only token the head reads)."""
        block = self.model.blocks[layer]
        cls_only = not weights and layer == self.depth - 1
        out, attention = block.attend(block.project(block.norm1(x)), cls_only=cls_only, weights=weights)
        x = (x[:, :1] if cls_only else x) + out
        x = x + block.mlp(block.norm2(x))
        return (x, attention) if weights else x

    def trace(self, x):
        hidden, attentions = [x], []
        for layer in range(self.depth):
            x, attention = self.step(layer, x, weights=True)
            hidden.append(x)
            attentions.append(attention)
        return hidden, attentions

    def out_proj(self, layer: int) -> nn.Linear:
        return self.model.blocks[layer].attn.out_proj

    def readout(self, x):
        return self.model.forward_head(self.model.norm(x))

    def lens_parts(self):
        return self.model.norm, (self.model.head,)


class _TimmStack:
    """A timm VisionTransformer (`adapters.TimmViT`); attention captured by `capture_attention`."""

    def __init__(self, model: TimmViT):
        self.vit, self.layout = model.vit, model.layout
        self.depth, self.heads = model.depth, model.n_heads
        self.distilled = hasattr(self.vit, "head_dist")
        self.prefix_names = (("CLS",) * (self.vit.cls_token is not None) + ("distillation",) * self.distilled
                             + ("register",) * int(getattr(self.vit, "num_reg_tokens", 0)))

    def embed(self, images):
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def patch_tokens(self, images):
        tokens = self.vit.patch_embed(images)
        return tokens.flatten(1, 2) if tokens.ndim == 4 else tokens  # a dynamic-size model gives NHWC

    def positions(self):
        pos = getattr(self.vit, "pos_embed", None)
        n = self.vit.patch_embed.num_patches
        return None if pos is None or pos.shape[1] < n else pos[0, -n:]

    def step(self, layer: int, x):
        return self.vit.blocks[layer](x)

    def trace(self, x):
        hidden = [x]
        with capture_attention(self.vit) as store:
            for block in self.vit.blocks:
                hidden.append(block(hidden[-1]))
        return hidden, list(store)

    def out_proj(self, layer: int) -> nn.Linear:
        return self.vit.blocks[layer].attn.proj

    def readout(self, x):
        return self.vit.forward_head(self.vit.norm(x))

    def lens_parts(self):
        norms = [n for n in (self.vit.norm, self.vit.fc_norm) if not isinstance(n, nn.Identity)]
        if not norms:
            return None
        heads = (self.vit.head, self.vit.head_dist) if self.distilled else (self.vit.head,)
        return nn.Sequential(*norms), heads


class _HFStack:
    """A transformers ViT / DeiT classifier (`adapters.HFViT`); attention from its eager kernel."""

    def __init__(self, model: HFViT):
        self.hf, self.layout = model.hf, model.layout
        self.base = getattr(self.hf, HF_CLASSES[type(self.hf).__name__][0])
        self.depth, self.heads = model.depth, model.n_heads
        self.prefix_names = ("CLS", "distillation")[:model.layout.n_prefix_tokens]
        teacher = hasattr(self.hf, "cls_classifier")
        self.heads_out = (self.hf.cls_classifier, self.hf.distillation_classifier) if teacher else (self.hf.classifier,)

    def embed(self, images):
        return self.base.embeddings(images)

    def patch_tokens(self, images):
        return self.base.embeddings.patch_embeddings(images)

    def positions(self):
        n = self.base.embeddings.patch_embeddings.num_patches
        return self.base.embeddings.position_embeddings[0, -n:]

    def step(self, layer: int, x):
        return self.base.layers[layer](x)

    def trace(self, x):
        hidden, store = [x], []
        hooks = [layer.attention.register_forward_hook(lambda module, args, out: store.append(out[1]))
                 for layer in self.base.layers]
        try:
            with eager_attention(self.hf):
                for layer in self.base.layers:
                    hidden.append(layer(hidden[-1]))
        finally:
            for hook in hooks:
                hook.remove()
        return hidden, store

    def out_proj(self, layer: int) -> nn.Linear:
        return self.base.layers[layer].attention.o_proj

    def readout(self, x):
        normed = self.base.layernorm(x)
        tokens = self.layout.explained_tokens
        return sum(head(normed[:, t]) for head, t in zip(self.heads_out, tokens)) / len(tokens)

    def lens_parts(self):
        return self.base.layernorm, self.heads_out


def _stack(model: nn.Module):
    if isinstance(model, ViTClassifier):
        return _OwnStack(model)
    if isinstance(model, TimmViT):
        return _TimmStack(model)
    if isinstance(model, HFViT):
        return _HFStack(model)
    raise TypeError(f"cannot walk through a {type(model).__name__}; pass it through vit_core.adapters.adapt first")


def reads_what(layout: TokenLayout) -> str:
    """What the prediction (and the logit lens's CLS row) reads, in words."""
    if layout.explained_tokens is None:
        return "the mean of the patch tokens"
    return "the CLS token" if len(layout.explained_tokens) == 1 else "the mean of the CLS and distillation tokens"


# ----------------------------------------------------------------------------------------------
# The numbers of every step

@dataclass(frozen=True)
class Walkthrough:
    """Every step's numbers for a batch of B images (float32 CPU tensors; probabilities after
    softmax). L blocks, H heads, T patches (row-major), C classes."""

    probs: torch.Tensor                # [B, C] the model's prediction
    predicted: torch.Tensor            # [B] its class
    cls_lens: torch.Tensor | None      # [B, L, C] final norm + head on the read token(s) after each block
    patch_lens: torch.Tensor | None    # [B, L, T, C] the same on each patch token
    head_knockout: torch.Tensor        # [B, L, H] prob of `predicted` with head h of block l knocked out
    knockout_probs: torch.Tensor       # [B, L, H, C] every class's probability with that head out
    cls_attention: torch.Tensor        # [B, L, H, T] the read row's attention to each patch
    token_pca: torch.Tensor            # [B, T, 3] patch tokens after the linear embedding, PCA, 0..1
    token_pca_share: torch.Tensor      # [B, 3] share of the tokens' variance each component holds
    position_similarity: torch.Tensor | None  # [T, T] cosine similarity of the patches' position embeddings
    reads: str                         # what the prediction reads ("the CLS token", ...)
    lens_note: str | None              # why the lens is None, else None
    prefix_names: tuple[str, ...]      # the tokens put before the patches ("CLS", "distillation", "register")
    embed_dim: int

    def knockout(self, layer: int, head: int, image: int = 0) -> torch.Tensor:
        """Class probabilities [C] of image `image` with head `head` of block `layer` knocked out
        (0-based); ValueError naming the allowed range otherwise."""
        batch, depth, heads = self.head_knockout.shape
        for name, value, limit in (("image", image, batch), ("layer", layer, depth), ("head", head, heads)):
            if not isinstance(value, (int, np.integer)) or not 0 <= value < limit:
                raise ValueError(f"{name} must be an integer in [0, {limit}), got {value!r}")
        return self.knockout_probs[image, layer, head]


def check_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A normalised batch [B, 3, S, S] for `model`, else ValueError (one image [3, S, S] is batched)."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != (3, model.image_size, model.image_size):
        raise ValueError(f"images must be [B, 3, {model.image_size}, {model.image_size}] from "
                         f"vit_core.preprocess, got shape {tuple(images.shape)}")
    return images.detach().float()


def zeroed_heads(projection: nn.Linear, mask: torch.Tensor):
    """Inside, the input of `projection` (the heads' outputs side by side) is multiplied by `mask`
    ([rows, 1, features] of ones and zeros) in this thread's passes; its bias is untouched. Other
    threads' passes through the same model are not (`vit_core.scope`)."""
    return pre_hook(projection, lambda module, args: (args[0] * mask, *args[1:]))


def _knockout_logits(stack, hidden: list[torch.Tensor]) -> torch.Tensor:
    """Logits [B, L, H, C] with each head of each block knocked out alone, in one growing batch:
    block l's H * B new rows (head-major) start from its kept input `hidden[l]`."""
    batch, heads = hidden[0].shape[0], stack.heads
    x = hidden[0][:0]
    for layer in range(stack.depth):
        x = torch.cat([x, hidden[layer].repeat(heads, 1, 1)])
        projection = stack.out_proj(layer)
        width = projection.in_features // heads
        mask = torch.ones(len(x), 1, projection.in_features, dtype=x.dtype, device=x.device)
        fresh = mask[len(x) - heads * batch:].view(heads, batch, 1, heads, width)
        for head in range(heads):
            fresh[head, :, :, head] = 0
        with zeroed_heads(projection, mask):
            x = stack.step(layer, x)
    logits = stack.readout(x)
    return logits.view(stack.depth, heads, batch, -1).permute(2, 0, 1, 3)


def _lens(stack, hidden: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """CLS lens [B, L, C] and patch lens [B, L, T, C], or (None, None) without a final norm."""
    parts = stack.lens_parts()
    if parts is None:
        return None, None
    norm, heads = parts
    cls = torch.stack([stack.readout(h) for h in hidden[1:]], dim=1).softmax(dim=-1)
    normed = norm(torch.stack([h[:, stack.layout.n_prefix_tokens:] for h in hidden[1:]], dim=1))
    patch = (sum(head(normed) for head in heads) / len(heads)).softmax(dim=-1)
    return cls, patch


def token_pca(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's tokens [B, T, D] projected on their first three principal components, each
    scaled to 0..1 over the image ([B, T, 3]; a missing or constant component gives 0.5), and the
    share of the variance each component holds [B, 3]. Signs are fixed so each component's
    largest-magnitude loading is positive."""
    centred = (tokens - tokens.mean(dim=1, keepdim=True)).double()
    _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    k = min(3, singular.shape[-1])
    components = components[:, :k]
    largest = components.abs().argmax(dim=-1, keepdim=True)
    components = components * components.gather(-1, largest).sign()
    projected = centred @ components.transpose(-1, -2)
    low, high = projected.amin(dim=1, keepdim=True), projected.amax(dim=1, keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (projected - low) / spread.clamp_min(1e-300), torch.full_like(projected, 0.5))
    variance = singular ** 2
    share = variance[:, :k] / variance.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    pad = 3 - k
    return (F.pad(scaled, (0, pad), value=0.5).float(), F.pad(share, (0, pad)).float())


def position_similarity(positions: torch.Tensor | None) -> torch.Tensor | None:
    """[T, T] cosine similarity of the patches' position embeddings [T, D] (None stays None)."""
    if positions is None:
        return None
    unit = F.normalize(positions.detach().double(), dim=-1)
    return (unit @ unit.T).float().cpu()


def _knockout_probs(model: nn.Module, hidden: list[torch.Tensor], bf16: bool) -> torch.Tensor:
    """`_knockout_logits` as probabilities; with `bf16` on the model's bfloat16 copy under autocast."""
    if not bf16:
        return _knockout_logits(_stack(model), hidden).softmax(dim=-1)
    scorer = bfloat16_copy(model)
    with eval_mode(scorer), torch.autocast(hidden[0].device.type, dtype=torch.bfloat16):
        logits = _knockout_logits(_stack(scorer), [h.to(torch.bfloat16) for h in hidden])
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def walkthrough(model: nn.Module, images: torch.Tensor, bf16: bool = False) -> Walkthrough:
    """Every step's numbers for normalised `images` [B, 3, S, S] (`vit_core.preprocess`) and our
    ViTClassifier or a model from `vit_core.adapters.adapt` / `load_model`: one forward pass keeping
    the hidden states, then one batch of all L x H head knock-outs (see the module docstring).
    `bf16` runs the knock-outs on a bfloat16 copy of the model: faster on CPUs with bf16 units
    (`vit_core.devices.uses_bf16`; benchmarks/walkthrough_latency.py times both), less exact
    (bfloat16 keeps 8 bits of mantissa); everything else stays float32."""
    stack = _stack(model)
    images = check_images(model, images)
    with eval_mode(model):
        hidden, attentions = stack.trace(stack.embed(images))
        logits = stack.readout(hidden[-1])
        knocked = _knockout_probs(model, hidden, bf16)
        cls_lens, patch_lens = _lens(stack, hidden)
        pca, share = token_pca(stack.patch_tokens(images))
        similarity = position_similarity(stack.positions())
    probs = logits.softmax(dim=-1)
    predicted = probs.argmax(dim=-1)
    attention = cls_patch_map(torch.stack(attentions, dim=1), stack.layout).flatten(-2)
    cpu = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
    return Walkthrough(
        probs=cpu(probs), predicted=predicted.cpu(), cls_lens=cpu(cls_lens), patch_lens=cpu(patch_lens),
        head_knockout=cpu(knocked.gather(-1, predicted[:, None, None, None].expand(*knocked.shape[:3], 1))[..., 0]),
        knockout_probs=cpu(knocked), cls_attention=cpu(attention), token_pca=cpu(pca), token_pca_share=cpu(share),
        position_similarity=similarity, reads=reads_what(stack.layout),
        lens_note=NO_LENS if cls_lens is None else None, prefix_names=tuple(stack.prefix_names),
        embed_dim=int(hidden[0].shape[-1]))


# ----------------------------------------------------------------------------------------------
# What if patches were removed

def removal_for(model: nn.Module) -> str:
    """"drop" (tokens left out) for our ViT, which can run on fewer tokens; "mean" (patches filled
    with the dataset mean) for other models."""
    return "drop" if isinstance(model, ViTClassifier) else "mean"


def _one_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    image = check_images(model, image)
    if image.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
    return image


def _patch_indices(indices, n_patches: int, what: str) -> torch.Tensor:
    """Distinct patch indices as a long tensor, else ValueError naming the allowed range."""
    values = torch.as_tensor(list(indices) if isinstance(indices, (set, frozenset)) else indices)
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{what} must be integer patch indices in [0, {n_patches}), got dtype {values.dtype}")
    values = values.long().flatten()
    if ((values < 0) | (values >= n_patches)).any():
        raise ValueError(f"{what} must be patch indices in [0, {n_patches}), got {values.tolist()}")
    if len(values.unique()) != len(values):
        raise ValueError(f"{what} repeats a patch: {values.tolist()}")
    return values


def what_if(model: nn.Module, image: torch.Tensor, removed) -> torch.Tensor:
    """Class probabilities [C] of one normalised image [3, S, S] (or [1, 3, S, S]) with the
    patches `removed` (indices, row-major) taken away as `removal_for(model)` says."""
    image = _one_image(model, image)
    n_patches = model.grid_size ** 2
    keep = torch.ones(1, n_patches, dtype=torch.bool)
    keep[0, _patch_indices(removed, n_patches, "removed")] = False
    return kept_class_probabilities(model, image, keep, torch.zeros(1, dtype=torch.long), removal_for(model))[0]


def what_if_curves(model: nn.Module, image: torch.Tensor, order, ks: Sequence[int] | None = None,
                   bf16: bool = False) -> torch.Tensor:
    """Class probabilities after removing the first k patches of `order` for every k in `ks`
    (default 0 .. len(order)), all in one batch: [K, C] for one order [N], [M, K, C] for M orders
    [M, N]. k = 0 is the untouched image. `bf16` scores the rows with a bfloat16 copy of the model
    under autocast, as `trust.TrustContext` can (faster on CPUs with bf16 units, less exact)."""
    image = _one_image(model, image)
    n_patches = model.grid_size ** 2
    orders = torch.as_tensor(order)
    single = orders.ndim == 1
    orders = torch.stack([_patch_indices(row, n_patches, "order") for row in orders.reshape(-1, orders.shape[-1])])
    ks = list(range(orders.shape[-1] + 1)) if ks is None else [int(k) for k in ks]
    bad = [k for k in ks if not 0 <= k <= orders.shape[-1]]
    if bad:
        raise ValueError(f"k must be in [0, {orders.shape[-1]}] (patches in the order), got {bad}")
    keep = torch.ones(len(orders), len(ks), n_patches, dtype=torch.bool)
    for i, k in enumerate(ks):
        keep[torch.arange(len(orders))[:, None], i, orders[:, :k]] = False
    rows = torch.zeros(keep[..., 0].numel(), dtype=torch.long)
    scorer = bfloat16_copy(model) if bf16 else model
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = kept_class_probabilities(scorer, image, keep.flatten(0, 1), rows, removal_for(model))
    probs = probs.view(len(orders), len(ks), -1)
    return probs[0] if single else probs


# ----------------------------------------------------------------------------------------------
# The payload: one JSON-ready dict per image, everything a browser needs to draw every step

def default_k(n_patches: int) -> int:
    """The what-if step's first k: a few patches, at most an eighth of them (at least 1)."""
    return max(1, min(6, n_patches // 8))


def _rounded(values, digits: int = 4):
    """Nested plain lists of floats rounded to `digits` decimals."""
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def pixels_data_url(model: nn.Module, image: torch.Tensor) -> str:
    """The model's view of a normalised image [3, S, S] as a PNG data URL (de-normalised RGB)."""
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    pixels = ((image.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def default_relevance(model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """The map the decision step shows when the caller gives none: gradient rollout of the
    predicted class (one forward and one backward pass; any adapted model has it)."""
    explanation = explain(model, image, gradients=True)
    return explanation.grad_rollout[0].flatten().float().cpu(), "grad_rollout", METHOD["grad_rollout"].label


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Min-max to 0..1 (a constant map gives zeros)."""
    low, high = values.min(), values.max()
    return torch.zeros_like(values) if high <= low else (values - low) / (high - low)


def _relevance(model, image, relevance, method, label) -> tuple[torch.Tensor, str, str]:
    n_patches = model.grid_size ** 2
    if relevance is None:
        return default_relevance(model, image)
    values = (relevance.detach().cpu() if torch.is_tensor(relevance)
              else torch.as_tensor(np.asarray(relevance, dtype=np.float64))).flatten().float()
    if values.numel() != n_patches:
        raise ValueError(f"relevance must hold one value per patch ({n_patches}, or a "
                         f"{model.grid_size} x {model.grid_size} grid), got shape {tuple(np.shape(relevance))}")
    if not torch.isfinite(values).all():
        raise ValueError("relevance holds NaN or infinite values")
    method = method or "given"
    return values, method, label or method.replace("_", " ")


def _whatif(model, image, values: torch.Tensor, seed: int, bf16: bool, ks: Sequence[int] | None = None) -> dict:
    """The what-if curves along the map's order and a random one, at every k of `ks` (default
    0..T; k = 0 is always included: the sentences compare with it)."""
    order = values.argsort(descending=True, stable=True)  # ties keep row-major order, as faithfulness.ranks
    random_order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    ks = list(range(len(values) + 1)) if ks is None else sorted({0, *(int(k) for k in ks)})
    curves = what_if_curves(model, image, torch.stack([order, random_order]), ks, bf16=bf16)
    return {"order": order.tolist(), "ks": ks, "relevant": _rounded(curves[0]), "random": _rounded(curves[1]),
            "random_order": random_order.tolist(), "removal": REMOVAL_NAMES[removal_for(model)]}


def coarse_ks(n_patches: int, steps: int) -> list[int]:
    """What-if ks for a large model: `steps` + 1 evenly spaced counts (as the faithfulness curves
    move patches) and the default k, so each curve costs steps + 2 forward rows instead of T + 1."""
    return sorted({*moved_counts(n_patches, steps).tolist(), default_k(n_patches)})


def _finite_or_none(value) -> float | None:
    """A plain float, or None for a missing or non-finite figure (JSON has no NaN)."""
    return None if value is None or not np.isfinite(float(value)) else float(value)


def _lens_payload(w: Walkthrough) -> dict | None:
    if w.cls_lens is None:
        return None
    top_prob, top = w.patch_lens[0].max(dim=-1)  # [L, T]
    return {"cls": _rounded(w.cls_lens[0]), "patch_top": top.tolist(), "patch_top_prob": _rounded(top_prob)}


def _knockout_payload(w: Walkthrough) -> dict:
    top_prob, top = w.knockout_probs[0].max(dim=-1)  # [L, H]
    return {"prob": _rounded(w.head_knockout[0]), "top": top.tolist(), "top_prob": _rounded(top_prob)}


def _narration(model, w: Walkthrough, payload: dict) -> dict[str, str]:
    """Every step's sentences, from the numbers in `payload` and `w` (image 0)."""
    grid, classes, predicted = model.grid_size, payload["classes"], payload["predicted"]
    text = {"pixels": narration.pixels_sentence(model.image_size, model.patch_size),
            "tokens": narration.tokens_sentence(model.patch_size, w.embed_dim, w.token_pca_share[0].tolist()),
            "position": narration.position_sentence(payload["position_similarity"], grid),
            "cls": narration.cls_sentence(w.prefix_names, grid * grid, w.reads)}
    attention = np.asarray(payload["cls_attention"])  # the rounded numbers the browser shows
    for layer in range(payload["layers"]):
        lens = None if payload["lens"] is None else payload["lens"]["cls"][layer]
        text[f"block{layer + 1}"] = narration.block_sentence(layer + 1, w.reads, lens, predicted, classes,
                                                             attention[layer].mean(axis=0), grid, payload["heads"],
                                                             last=layer == payload["layers"] - 1)
    knockout = payload["knockout"]
    text["heads"] = narration.heads_sentence(knockout["prob"], payload["probs"][predicted], predicted,
                                             knockout["top"], classes)
    shown = payload["map"]
    text["decision"] = narration.decision_sentence(payload["probs"], classes, shown["label"], shown["values"], grid,
                                                   payload["trust"])
    ks = [k for k in payload["whatif"]["ks"] if k > 0] or [0]
    text["whatif"] = narration.whatif_sentence(payload, min(ks, key=lambda k: abs(k - default_k(grid * grid))))
    return text


def walkthrough_payload(model: nn.Module, image: torch.Tensor, classes: Sequence[str] | None = None,
                        relevance=None, method: str | None = None, label: str | None = None,
                        trust: dict | None = None, seed: int = 0, bf16: bool = False,
                        whatif_ks: Sequence[int] | None = None) -> dict:
    """Everything the Walkthrough draws for one normalised image [3, S, S] (or [1, 3, S, S]), as
    plain JSON (lists, floats rounded to 4 decimals; keys in the project's walkthrough contract).
    `relevance` [T] (or [g, g]) is the decision step's map, named `method` and shown as `label`
    (the caller picks the most faithful one); None computes gradient rollout (`default_relevance`).
    `trust` (that map's trust figures on this image, optional) goes into the decision's narration.
    The what-if curves remove patches in the map's order and in a random order drawn from `seed`.
    `bf16` scores the knock-outs and the what-if rows with a bfloat16 copy (see `walkthrough`).
    `whatif_ks` limits the curves to those k (default every k = 0..T; `coarse_ks` for large models,
    whose T + 1 rows per curve would take seconds); "whatif"["ks"] lists the k of each row."""
    image = _one_image(model, image)
    classes = list(model.class_names if classes is None else classes)
    w = walkthrough(model, image, bf16=bf16)
    if len(classes) != w.probs.shape[-1]:
        raise ValueError(f"{len(classes)} class names for {w.probs.shape[-1]} classes")
    values, method, label = _relevance(model, image, relevance, method, label)
    shown = _unit(values)
    grid = model.grid_size
    payload = {
        "version": PAYLOAD_VERSION, "classes": classes, "image_size": model.image_size,
        "patch_size": model.patch_size, "grid": [grid, grid], "layers": w.cls_attention.shape[1],
        "heads": w.cls_attention.shape[2], "patch_dim": 3 * model.patch_size ** 2, "embed_dim": w.embed_dim,
        "reads": w.reads, "pixels": pixels_data_url(model, image[0]),
        "token_pca": _rounded(w.token_pca[0]),
        "position_similarity": None if w.position_similarity is None else _rounded(w.position_similarity),
        "cls_attention": _rounded(w.cls_attention[0]),
        "lens": _lens_payload(w), "lens_note": w.lens_note,
        "probs": _rounded(w.probs[0]), "predicted": int(w.predicted[0]),
        "knockout": _knockout_payload(w),
        "map": {"method": method, "label": label, "values": _rounded(shown)},
        "whatif": _whatif(model, image, values, seed, bf16, whatif_ks),
        "trust": None if trust is None else {k: _finite_or_none(v) for k, v in trust.items()},
    }
    payload["narration"] = _narration(model, w, payload)
    return payload


def walkthrough_arrays(model: nn.Module, image: torch.Tensor, relevance=None, seed: int = 0,
                       bf16: bool = False) -> dict[str, np.ndarray]:
    """One normalised image's Walkthrough numbers as numpy arrays by name (what
    `python -m vit_core.cli.explain --walkthrough` saves): `walkthrough`'s tensors for that image
    (the lens left out when the model has none), "reads", and the what-if curves [T + 1, C]
    "whatif_relevant" / "whatif_random" along "whatif_order" (`relevance`'s order, as in
    `walkthrough_payload`; default gradient rollout) and "whatif_random_order"."""
    image = _one_image(model, image)
    w = walkthrough(model, image, bf16=bf16)
    values, method, _ = _relevance(model, image, relevance, None, None)
    whatif = _whatif(model, image, values, seed, bf16)
    arrays = {name: getattr(w, name)[0].numpy() for name in
              ("probs", "cls_lens", "patch_lens", "head_knockout", "knockout_probs", "cls_attention", "token_pca",
               "token_pca_share") if getattr(w, name) is not None}
    if w.position_similarity is not None:
        arrays["position_similarity"] = w.position_similarity.numpy()
    arrays.update(reads=np.array(w.reads), removal=np.array(whatif["removal"]), map_method=np.array(method),
                  whatif_order=np.array(whatif["order"]), whatif_random_order=np.array(whatif["random_order"]),
                  whatif_relevant=np.array(whatif["relevant"], dtype=np.float32),
                  whatif_random=np.array(whatif["random"], dtype=np.float32))
    return arrays
