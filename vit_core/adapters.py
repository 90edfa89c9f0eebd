"""Explaining other Vision Transformers: timm's `VisionTransformer` family and Hugging Face
transformers' ViT / DeiT classifiers through the interface `vit_core.explain` uses.

`adapt(model)` takes a timm ViT (ViT, DeiT including the distilled one, models with register tokens,
models without a CLS token that average their patch tokens, any patch or image size) and returns a
`TimmViT`: `forward(images, return_attention=False)` gives the logits and, when asked, every
block's softmax attention [B, H, T, T] from that same forward pass, kept in the autograd graph.
timm computes attention with `F.scaled_dot_product_attention`, which hands out no weights, so an
explanation pass swaps each block's attention forward for the explicit computation (q kᵀ · scale,
softmax, dropout, @ v, projection) with the module's own parameters, and puts it back afterwards;
plain passes run timm's code untouched. A transformers `ViTForImageClassification` or DeiT
classifier becomes an `HFViT`, whose explanation passes switch the model to its own eager
attention and read its `output_attentions`. Our own `ViTClassifier` already has this interface:
`adapt` returns it unchanged.

`TokenLayout` says where the patch tokens sit and which row an explanation reads:
- a model pooled by its CLS token (timm `global_pool='token'`) is explained by the CLS row;
- distilled DeiT averages its CLS and distillation heads at inference, so its explanation is the
  mean of those two rows;
- a model pooled by averaging its patch tokens (`global_pool='avg'`, with or without CLS) is
  explained by the mean of the patch tokens' rows, the tokens its logits are computed from.
Register tokens are prefix tokens that are never read.

`load_model(source)` loads a timm folder (`config.json` with `architecture` + `model.safetensors`,
as timm's `save_for_hf` / `push_to_hf_hub` write), a transformers folder (`config.json` with
`model_type`, as `save_pretrained` writes), the Hub repo id of either, or one of our own
checkpoints, and returns it adapted. timm and transformers are imported only when such a model is met.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .checkpoints import (CONFIG_NAME, CheckpointError, candidate_folders, hub_file, load_checkpoint,
                          looks_like_repo_id)
from .gradient_rules import Walker, hf_walker, timm_walker
from .layout import TokenLayout
from .model import WEIGHTS_NAME, ViTClassifier
from .scope import forward_override, while_needed

SUPPORTED = ("vit_core ViTClassifier; a timm VisionTransformer (ViT, DeiT incl. distilled, register "
             "tokens, no CLS token) with timm's standard Attention blocks, 'token' or 'avg' pooling, "
             "square images and patches, 3 input channels; or a Hugging Face transformers "
             "ViTForImageClassification, DeiTForImageClassification or DeiTForImageClassificationWithTeacher")
_INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def _why_unsupported(vit: nn.Module) -> str | None:
    """None for a timm ViT the explanations handle, else what is wrong with it."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    name = type(vit).__name__
    if not isinstance(vit, VisionTransformer):
        return f"{name} is not a VisionTransformer"
    odd = sorted({type(b.attn).__name__ for b in vit.blocks if type(getattr(b, "attn", None)) is not Attention})
    if odd:
        return f"{name} has blocks with {', '.join(odd)} instead of timm's Attention"
    if vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
        return f"{name} pools with {vit.global_pool!r}"
    if getattr(vit, "pool_include_prefix", False):
        return f"{name} averages its prefix tokens too"
    embed = vit.patch_embed
    if embed.img_size is None or embed.img_size[0] != embed.img_size[1] or embed.patch_size[0] != embed.patch_size[1]:
        return f"{name} has image size {embed.img_size} and patch size {embed.patch_size}, not square"
    if embed.proj.in_channels != 3:
        return f"{name} takes {embed.proj.in_channels} input channels"
    return None


def _layout_of(vit: nn.Module) -> TokenLayout:
    from timm.models.deit import VisionTransformerDistilled

    if vit.global_pool == "avg":
        return TokenLayout(vit.num_prefix_tokens, None)
    if isinstance(vit, VisionTransformerDistilled):  # eval logits: mean of the CLS and distillation heads
        return TokenLayout(vit.num_prefix_tokens, (0, 1))
    return TokenLayout(vit.num_prefix_tokens, (0,))


def _class_names(cfg: dict, n_classes: int) -> list[str]:
    """pretrained_cfg's label names (with their descriptions when given) if one per class, else "class i"."""
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i))) for i in range(n_classes)]
    if not names or len(names) != n_classes or any(n is None for n in names):
        return [f"class {i}" for i in range(n_classes)]
    descriptions = cfg.get("label_descriptions") or {}
    return [str(descriptions.get(n, n)) for n in names]


def _explicit_attention(attn: nn.Module, store: list[torch.Tensor]):
    """A stand-in for timm `Attention.forward` that spells the attention out with the module's own
    parameters and appends the softmax probabilities [B, H, T, T] to `store`."""
    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention capture handles unmasked self-attention only")
        batch, tokens, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        store.append(probs)
        out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))
    return forward


@contextmanager
def capture_attention(vit: nn.Module):
    """Inside, every forward pass of the timm ViT `vit` in this thread appends each block's softmax
    attention to the list yielded, in block order; other threads' passes run the model as it is
    (`vit_core.scope`). Gradient checkpointing is paused (it would run blocks twice)."""
    store: list[torch.Tensor] = []
    checkpointing = vit.grad_checkpointing
    vit.grad_checkpointing = False
    try:
        with ExitStack() as overrides:
            for block in vit.blocks:
                overrides.enter_context(forward_override(block.attn, _explicit_attention(block.attn, store)))
            yield store
    finally:
        vit.grad_checkpointing = checkpointing


class TimmViT(nn.Module):
    """A timm VisionTransformer with the attributes and `forward` that `vit_core.explain` uses.

    `image_size`, `patch_size`, `grid_size`, `depth`, `n_heads`, `n_prefix_tokens`, `layout`,
    `class_names`; preprocessing from the model's `pretrained_cfg`: `mean`, `std`, `interpolation`
    (as `resample`, which `vit_core.preprocess` uses; `crop_pct` is kept for reference: the
    explorer explains the whole picture, so it is resized without a centre crop). The input size
    is the one the model was built for."""

    def __init__(self, vit: nn.Module, class_names: Sequence[str] | None = None):
        super().__init__()
        reason = _why_unsupported(vit)
        if reason is not None:
            raise ValueError(f"unsupported model: {reason}; supported: {SUPPORTED}")
        self.vit = vit
        cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        self.name = cfg.get("architecture") or type(vit).__name__
        self.blocks_path = "vit.blocks"  # where the blocks sit in the state dict (the randomisation check)
        self.image_size = int(vit.patch_embed.img_size[0])
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid_size = int(vit.patch_embed.grid_size[0])
        self.depth = len(vit.blocks)
        self.n_heads = int(vit.blocks[0].attn.num_heads)
        self.layout = _layout_of(vit)
        self.n_prefix_tokens = self.layout.n_prefix_tokens
        names = list(class_names) if class_names is not None else _class_names(cfg, vit.num_classes)
        if len(names) != vit.num_classes:
            raise ValueError(f"{len(names)} class names for {vit.num_classes} classes")
        self.class_names = names
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean = tuple(float(m) for m in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(s) for s in cfg.get("std", IMAGENET_DEFAULT_STD))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.resample = _INTERPOLATIONS.get(self.interpolation, Image.Resampling.BICUBIC)  # model.resampling
        self.crop_pct = cfg.get("crop_pct")

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        if not return_attention:
            return self.vit(images)
        with capture_attention(self.vit) as store:
            logits = self.vit(images)
        if len(store) != self.depth:
            raise RuntimeError(f"captured {len(store)} attention maps from {self.depth} blocks")
        return logits, tuple(store)

    def reset_parameters(self) -> None:
        """timm's own initialisation of this architecture (the model-randomisation check uses it)."""
        self.vit.init_weights()

    def rule_walker(self) -> Walker:
        """The model's pass with LRP / LibraGrad gradient rules (`vit_core.gradient_rules`)."""
        return timm_walker(self.vit)


# transformers classes explained: (the attribute holding the encoder, the token layout: DeiT puts a
# distillation token after CLS; its plain classifier reads CLS, the one "with teacher" averages both heads)
HF_CLASSES = {
    "ViTForImageClassification": ("vit", TokenLayout(1, (0,))),
    "DeiTForImageClassification": ("deit", TokenLayout(2, (0,))),
    "DeiTForImageClassificationWithTeacher": ("deit", TokenLayout(2, (0, 1))),
}
PROCESSOR_NAME = "preprocessor_config.json"


@contextmanager
def eager_attention(model: nn.Module):
    """Inside, the transformers `model` computes attention explicitly (softmax weights it can return
    with `output_attentions=True`) instead of its fused kernel; the setting is put back once no
    thread needs it any more (the model's other users meanwhile get the same numbers, more slowly)."""
    def switch_on():
        before = model.config._attn_implementation
        model.set_attn_implementation("eager")
        return lambda: model.set_attn_implementation(before)
    with while_needed(("eager attention", id(model)), switch_on):
        yield


def _hf_square(value, what: str) -> int:
    sizes = {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
    if len(sizes) != 1:
        raise ValueError(f"unsupported model: {what} {value} is not square; supported: {SUPPORTED}")
    return sizes.pop()


class HFViT(nn.Module):
    """A Hugging Face transformers ViT or DeiT image classifier (`HF_CLASSES`) with the attributes
    and `forward` that `vit_core.explain` uses, like `TimmViT`. The attentions come from the
    model's own `output_attentions`, computed by its eager attention (`eager_attention`) in the same
    forward pass as the logits; plain passes keep the model's own attention kernel. Preprocessing
    from the model's image processor settings (`PROCESSOR_NAME`: image_mean, image_std, resample),
    else ViTImageProcessor's defaults; class names from the config's id2label."""

    def __init__(self, model: nn.Module, processor: dict | None = None, class_names: Sequence[str] | None = None):
        super().__init__()
        kind = type(model).__name__
        if kind not in HF_CLASSES:
            raise ValueError(f"unsupported model: {kind}; supported: {SUPPORTED}")
        base, self.layout = HF_CLASSES[kind]
        cfg = model.config
        if int(getattr(cfg, "num_channels", 3)) != 3:
            raise ValueError(f"unsupported model: {kind} takes {cfg.num_channels} input channels")
        self.hf = model
        self.name = getattr(cfg, "_name_or_path", "") or kind
        self.blocks_path = f"hf.{base}.layers"
        self.image_size = _hf_square(cfg.image_size, "image size")
        self.patch_size = _hf_square(cfg.patch_size, "patch size")
        self.grid_size = self.image_size // self.patch_size
        self.depth, self.n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        self.n_prefix_tokens = self.layout.n_prefix_tokens
        labels = {int(k): str(v) for k, v in (cfg.id2label or {}).items()}
        self.class_names = list(class_names or [labels.get(i, f"class {i}") for i in range(cfg.num_labels)])
        processor = processor or {}
        self.mean = tuple(float(m) for m in processor.get("image_mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(s) for s in processor.get("image_std", (0.5, 0.5, 0.5)))
        self.resample = Image.Resampling(int(processor.get("resample", Image.Resampling.BILINEAR)))
        self.interpolation = self.resample.name.lower()

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        if not return_attention:
            return self.hf(pixel_values=images).logits
        with eager_attention(self.hf):
            output = self.hf(pixel_values=images, output_attentions=True)
        if len(output.attentions) != self.depth:
            raise RuntimeError(f"got {len(output.attentions)} attention maps from {self.depth} blocks")
        return output.logits, tuple(output.attentions)

    def reset_parameters(self) -> None:
        """transformers' own initialisation of every module (the model-randomisation check uses it)."""
        self.hf.apply(self.hf._init_weights)

    def rule_walker(self) -> Walker:
        """The model's pass with LRP / LibraGrad gradient rules (`vit_core.gradient_rules`)."""
        return hf_walker(self.hf, HF_CLASSES[type(self.hf).__name__][0])


def adapt(model: nn.Module, class_names: Sequence[str] | None = None) -> nn.Module:
    """A model `vit_core.explain` can explain: a ViTClassifier as it is, a timm ViT wrapped in
    TimmViT, a transformers ViT / DeiT classifier in HFViT (in eval mode, like the loaded
    checkpoints). ValueError naming what is supported otherwise."""
    if isinstance(model, (ViTClassifier, TimmViT, HFViT)):
        return model
    if type(model).__module__.startswith("transformers."):
        return HFViT(model, class_names=class_names).eval()
    try:
        import timm  # noqa: F401  (only needed for timm models)
    except ImportError as error:
        raise ValueError(f"unsupported model {type(model).__name__} (timm is not installed); "
                         f"supported: {SUPPORTED}") from error
    return TimmViT(model, class_names).eval()


def _build_timm(config: dict, weights_file: str | os.PathLike, where: str) -> TimmViT:
    """timm model from a timm `config.json` dict and its safetensors weights, strict keys."""
    import timm

    name = config["architecture"]
    # older exports keep the preprocessing fields at the top level instead of under pretrained_cfg
    cfg = dict(config.get("pretrained_cfg") or {k: v for k, v in config.items() if k != "architecture"})
    for key in ("label_names", "label_descriptions"):
        if key in config:
            cfg[key] = config[key]
    kwargs = dict(config.get("model_args") or {})
    if "num_classes" in config:
        kwargs.setdefault("num_classes", config["num_classes"])
    try:
        vit = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as error:  # an unknown name, arguments it does not take
        raise CheckpointError(f"{where}: {error}") from error
    reason = _why_unsupported(vit)
    if reason is not None:
        raise CheckpointError(f"{where}: unsupported model: {reason}; supported: {SUPPORTED}")
    try:
        state = load_safetensors(str(weights_file), device="cpu")
        vit.load_state_dict(state, strict=True)
    except SafetensorError as error:
        raise CheckpointError(f"{where}: {WEIGHTS_NAME} is not a readable safetensors file ({error}).") from error
    except RuntimeError as error:  # missing / unexpected keys, wrong shapes
        raise CheckpointError(f"{where}: the weights do not fit {name} "
                              f"({' '.join(str(error).split())[:400]}).") from error
    vit.pretrained_cfg = {**getattr(vit, "pretrained_cfg", {}), **cfg}
    return TimmViT(vit).eval()


def _build_hf(config: dict, folder: Path, where: str) -> HFViT:
    """transformers model from a folder written by `save_pretrained` (config.json, model.safetensors
    and, when there, the image processor's settings), strict keys."""
    import transformers

    kind = (config.get("architectures") or [config.get("model_type")])[0]
    if kind not in HF_CLASSES:
        raise CheckpointError(f"{where}: unsupported model {kind}; supported: {SUPPORTED}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{where}: it holds no {WEIGHTS_NAME} (only safetensors weights are read; "
                              f"save with save_pretrained(..., safe_serialization=True)).")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a tiny load needs no bar; the tools print their own
    try:
        model, info = getattr(transformers, kind).from_pretrained(folder, use_safetensors=True,
                                                                   output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{where}: {' '.join(str(error).split())[:400]}") from error
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    wrong = {key: sorted(names)[:5] for key, names in info.items() if names}
    if wrong:  # missing, unexpected or mismatched keys: the weights are not this model's
        raise CheckpointError(f"{where}: the weights do not fit {kind} ({wrong}).")
    processor = folder / PROCESSOR_NAME
    settings = _read_config(processor, where) if processor.is_file() else None
    return HFViT(model, settings).eval()


def _read_config(path: str | os.PathLike, where: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{where}: {CONFIG_NAME} is not readable JSON ({error}).") from error


def _load_timm_folder(folder: Path, config: dict) -> TimmViT:
    where = f"Cannot load the timm model in {folder}"
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{where}: it holds no {WEIGHTS_NAME} (only safetensors weights are read; "
                              f"save with timm's save_for_hf(..., safe_serialization=True)).")
    return _build_timm(config, folder / WEIGHTS_NAME, where)


def _load_from_hub(repo_id: str) -> nn.Module:
    where = f"Cannot load {repo_id!r}"
    try:
        config = _read_config(hub_file(repo_id, CONFIG_NAME), where)
        if "architecture" in config:  # timm
            return _build_timm(config, hub_file(repo_id, WEIGHTS_NAME), where)
        if "model_type" in config:  # transformers: its files land side by side in one snapshot folder
            folder = Path(hub_file(repo_id, WEIGHTS_NAME)).parent
            try:
                hub_file(repo_id, PROCESSOR_NAME)
            except EntryNotFoundError:  # no image processor settings: HFViT's defaults
                pass
            return _build_hf(config, folder, where)
        return load_checkpoint(repo_id)  # one of our own checkpoints
    except CheckpointError:
        raise
    except Exception as error:  # the Hub client raises many kinds (HTTP, validation, I/O); all end here
        raise CheckpointError(f"Cannot load {repo_id!r} from the Hugging Face Hub "
                              f"({type(error).__name__}: {error}).") from error


def load_model(source: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> nn.Module:
    """A model folder or Hub repo id -> an adapted model in eval mode on the CPU, ready for `explain`.

    A folder whose config.json names a timm `architecture` (timm's `save_for_hf` format) is built
    with timm, one naming a transformers `model_type` (`save_pretrained`) with transformers, each
    loading its model.safetensors with strict keys; any other folder, and `search_dirs`, go to
    `load_checkpoint`. A Hub id (`timm/<name>`, `user/name`) is read from the local cache
    first and fails within seconds when offline. Raises CheckpointError."""
    text = str(source)
    candidates = candidate_folders(text, search_dirs)
    for folder in candidates:
        if folder.is_dir() and (folder / CONFIG_NAME).is_file():
            config = _read_config(folder / CONFIG_NAME, f"Cannot load the model in {folder}")
            if "architecture" in config:
                return _load_timm_folder(folder, config)
            if "model_type" in config:
                return _build_hf(config, folder, f"Cannot load the transformers model in {folder}")
            break
    if not any(c.is_dir() for c in candidates) and looks_like_repo_id(text):
        return _load_from_hub(text)
    return load_checkpoint(source, search_dirs)
