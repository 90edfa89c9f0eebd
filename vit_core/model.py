"""The Vision Transformer of the 2022 report the README follows, written to be read top to bottom.

An image is cut into square patches with `Tensor.unfold`, each patch is flattened and linearly
embedded, a learnable CLS token and position embedding are added, and `depth` pre-norm blocks of
`nn.MultiheadAttention` + MLP follow. The classifier reads the CLS token.

On CUDA, plain forward passes use the fused attention kernel (`need_weights=False`); on a CPU the
attention is spelled out with matrix products, which for 65 tokens trains faster than the CPU's
fused kernel (benchmarks/attention_path.py measures both), except in eval passes without
gradients (scoring many perturbed inputs), where `F.scaled_dot_product_attention` is the faster
one. For explanations the blocks also return each head's softmax attention, computed from the
very same parameters inside one forward pass, with the probabilities kept in the autograd graph
so gradients can reach them.

Two optional starting points help a ViT learn from a dataset as small as CIFAR-10:
`mimetic_attention_init_` and `sincos_position_init_` (train.py's `--attn-init`, `--pos-init`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .layout import TokenLayout

WEIGHTS_NAME = "model.safetensors"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Per-channel statistics of the CIFAR-10 training set, in [0, 1] pixel units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Named configurations. `seed` is the report's network; `wide` is the one the app ships, trained over
# several sessions, its fp32 weights still small enough for a Space without LFS (its model card gives
# the run); `cpu` is narrower so that a short CPU run sees more epochs, the size of the checkpoints
# before it (benchmarks/train_throughput.py --preset NAME times a step); `tiny` is for tests.
PRESETS: dict[str, dict] = {
    "seed": dict(emb_size=256, depth=6, n_heads=8, mlp_ratio=2.0, dropout=0.2),
    "cpu": dict(emb_size=128, depth=6, n_heads=4, mlp_ratio=2.0, dropout=0.0),
    "wide": dict(emb_size=192, depth=6, n_heads=6, mlp_ratio=2.0, dropout=0.0),
    "tiny": dict(emb_size=32, depth=2, n_heads=2, mlp_ratio=2.0, dropout=0.0),
}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut a batch [B, C, H, W] into patches [B, H/p, W/p, C, p, p] with `Tensor.unfold`.

    Patches come in row-major order: flattening dims 1 and 2 gives token i = row * (W/p) + col,
    the order every attention map of this package uses.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
    _, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    patches = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    return patches.permute(0, 2, 3, 1, 4, 5)  # [B, C, gh, gw, p, p] -> [B, gh, gw, C, p, p]


def drop_patch_tokens(tokens: torch.Tensor, drop: float) -> torch.Tensor:
    """Keep the CLS token and a random `1 - drop` share of the patch tokens of each image.

    A training-time speed-up and regulariser (PatchDropout, Liu et al. 2023): tokens already carry
    their position embedding, so the blocks see a valid, shorter sequence. Uses the global RNG.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"patch drop must be in [0, 1), got {drop}")
    batch, tokens_in, emb = tokens.shape
    n_patches = tokens_in - 1
    keep = max(1, round(n_patches * (1.0 - drop)))
    if keep == n_patches:
        return tokens
    kept = torch.rand(batch, n_patches, device=tokens.device).argsort(dim=1)[:, :keep] + 1
    patches = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, emb))
    return torch.cat([tokens[:, :1], patches], dim=1)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, emb_size: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(emb_size)
        self.attn = nn.MultiheadAttention(emb_size, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(emb_size)
        hidden = int(emb_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(emb_size, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, emb_size),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        h = self.norm1(x)
        if h.is_cuda and not return_attention:
            attn_out, attention = self.fused_attention(h), None
        elif return_attention or self.training or torch.is_grad_enabled():
            attn_out, attention = self.attention_with_weights(h)
        else:  # a CPU eval pass without gradients (scoring, removal curves, evaluation)
            attn_out, attention = self.attend(self.project(h), weights=False)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return (x, attention) if return_attention else x

    def fused_attention(self, h: torch.Tensor) -> torch.Tensor:
        """`nn.MultiheadAttention`'s own fused path (what a CUDA forward uses); same parameters."""
        return self.attn(h, h, h, need_weights=False)[0]

    def attention_with_weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MHA computation spelled out with its own parameters.

        Returns the attention output and the per-head softmax probabilities [B, heads, T, T].
        `nn.MultiheadAttention(need_weights=True)` returns a detached-from-output copy of the
        probabilities, so gradient methods could not reach them; here they are the tensor that
        multiplies the values.
        """
        return self.attend(self.project(h))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The packed query, key and value projections [B, T, 3 E] of normalised tokens h [B, T, E]."""
        return F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)

    def attend(self, qkv: torch.Tensor, cls_only: bool = False,
               weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output [B, T, E] and probabilities [B, heads, T, T] from packed projections;
        with `cls_only`, for the CLS query alone ([B, 1, E] and [B, heads, 1, T]). `weights` False
        (eval mode only) returns None for the probabilities and computes the output with
        `F.scaled_dot_product_attention`, whose CPU kernel reads the strided heads without
        copying them: the faster path for the many-row passes that only score
        (benchmarks/explain_latency.py)."""
        mixed, attention = self.mix(qkv, cls_only, weights)
        return self.attn.out_proj(mixed), attention

    def mix(self, qkv: torch.Tensor, cls_only: bool = False,
            weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attend` before the output projection: the heads' mixed values side by side [B, T, E]."""
        mha = self.attn
        batch, tokens, _ = qkv.shape
        heads, head_dim = mha.num_heads, mha.embed_dim // mha.num_heads
        q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if cls_only:
            q = q[:, :, :1]
        if not weights:
            if self.training and mha.dropout:
                raise RuntimeError("attention without weights is for eval mode (no attention dropout)")
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(batch, q.shape[2], mha.embed_dim), None
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        attention = scores.softmax(dim=-1)
        probs = F.dropout(attention, mha.dropout, self.training)
        return (probs @ v).transpose(1, 2).reshape(batch, q.shape[2], mha.embed_dim), attention

    def forward_packed(self, x: torch.Tensor, qkv: torch.Tensor, shapes: Sequence[tuple[int, int]],
                       cls_only: bool = False) -> torch.Tensor:
        """The block's output for sequences packed one after another: x [N, E] holds groups of
        sequences, group g being `shapes[g]` = (sequences, tokens each), and qkv [N, 3 E] their
        attention projections (`project(norm1(x))`, per token, so they may be computed once and
        gathered). Attention runs per group; the per-token layers run once over all N tokens,
        in larger matrix products, which a CPU runs faster per token than one per length
        (benchmarks/explain_latency.py). With `cls_only`, the CLS (first) outputs alone [R, E]."""
        sizes = [rows * tokens for rows, tokens in shapes]
        # Eval passes need no probabilities (the faster path); training keeps attention dropout.
        mixed = torch.cat([self.mix(part.view(rows, tokens, -1), cls_only, weights=self.training)[0].flatten(0, 1)
                           for part, (rows, tokens) in zip(qkv.split(sizes), shapes)])
        if cls_only:
            x = x[_sequence_starts(shapes, x.device)]
        x = x + self.attn.out_proj(mixed)
        return x + self.mlp(self.norm2(x))


def _sequence_lengths(shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The length of every sequence of a packing of groups `shapes` [(sequences, tokens each)]."""
    counts, lengths = zip(*shapes) if shapes else ((), ())
    return torch.tensor(lengths, dtype=torch.long).repeat_interleave(torch.tensor(counts, dtype=torch.long))


def _sequence_starts(shapes: Sequence[tuple[int, int]], device) -> torch.Tensor:
    """Where each sequence of a packing of groups `shapes` begins."""
    lengths = _sequence_lengths(shapes)
    return (lengths.cumsum(0) - lengths).to(device)


def mimetic_attention_init_(model: nn.Module, qk: tuple[float, float] = (0.7, 0.7),
                             vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation (Trockman & Kolter, ICML 2023) of every `nn.MultiheadAttention`.

    Trained ViTs have W_q W_k^T close to +identity and W_v W_o close to -identity; starting there
    (plus a random part) lets a small ViT learn from a small dataset faster. For each head,
    W_q W_k^T ~ a Z + b I with (a, b) = `qk`, and for the layer, W_v W_o ~ a Z - b I with
    (a, b) = `vo`, Z ~ N(0, 1/d). Each target is split into two factors by SVD: the square root of
    the singular values goes to each side (a head keeps the top head_dim singular directions).
    Uses the global torch RNG, so `torch.manual_seed` makes it reproducible.
    """
    for mha in (m for m in model.modules() if isinstance(m, nn.MultiheadAttention)):
        d, heads = mha.embed_dim, mha.num_heads
        head_dim = d // heads
        eye = torch.eye(d)
        with torch.no_grad():
            # nn.Linear weights are [out, in], so q = x W_q with W_q = in_proj_weight[:d].T.
            for h in range(heads):
                u, s, vh = torch.linalg.svd(qk[0] * torch.randn(d, d) / math.sqrt(d) + qk[1] * eye)
                root = s[:head_dim].sqrt()
                rows = slice(h * head_dim, (h + 1) * head_dim)
                mha.in_proj_weight[rows] = (u[:, :head_dim] * root).T  # W_q^h = U S^1/2
                mha.in_proj_weight[d:2 * d][rows] = (vh[:head_dim].T * root).T  # W_k^h = V S^1/2
            u, s, vh = torch.linalg.svd(vo[0] * torch.randn(d, d) / math.sqrt(d) - vo[1] * eye)
            root = s.sqrt()
            mha.in_proj_weight[2 * d:] = (u * root).T  # W_v = U S^1/2
            mha.out_proj.weight.copy_((root[:, None] * vh).T)  # W_o = S^1/2 V^T, stored as its transpose


def sincos_position_init_(model: "ViTClassifier", scale: float = 0.2) -> None:
    """Start the learnable position embedding as a 2D sine-cosine code, `scale` times its unit size.

    Nearby patches get similar codes, so with attention that starts near the identity (mimetic
    init) each token first attends to its neighbourhood, much like a convolution. CLS gets zeros.
    """
    grid, emb = model.grid_size, model.pos_embed.shape[-1]
    quarter = emb // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    angles_y = rows.flatten()[:, None] * freqs  # token order is row-major, as in `patchify`
    angles_x = cols.flatten()[:, None] * freqs
    code = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, :4 * quarter] = scale * code


class ViTClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="vit-attention-explorer",
    tags=["image-classification", "vision-transformer", "cifar10"],
    license="mit",
):
    """ViT for small images. Constructor arguments are saved to `config.json` by `save_pretrained`."""

    layout = TokenLayout()  # one CLS token, the row explanations read (vit_core.layout)

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        emb_size: int = 256,
        depth: int = 6,
        n_heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.2,
        n_classes: int = 10,
        class_names: Sequence[str] | None = CIFAR10_CLASSES,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if emb_size % n_heads:
            raise ValueError(f"emb_size {emb_size} is not divisible by n_heads {n_heads}")
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values each")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.n_heads = n_heads
        self.depth = depth
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

        n_patches = self.grid_size**2
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, emb_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, emb_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, emb_size))
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(emb_size, n_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(emb_size)
        self.head = nn.Linear(emb_size, n_classes)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ViTClassifier":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images: torch.Tensor, drop_patches: float = 0.0) -> torch.Tensor:
        """Normalised images [B, C, S, S] -> tokens [B, 1 + patches, emb]; with `drop_patches`,
        a random share of each image's patch tokens is left out (training only)."""
        patches = patchify(images, self.patch_size).flatten(1, 2).flatten(2)
        tokens = self.patch_embed(patches)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        if drop_patches > 0:
            tokens = drop_patch_tokens(tokens, drop_patches)
        return self.input_dropout(tokens)

    def forward_features(self, images: torch.Tensor, return_attention: bool = False,
                         drop_patches: float = 0.0):
        """Final normalised tokens; with `return_attention`, also a tuple with every block's
        per-head softmax attention [B, heads, T, T] from this same forward pass. They stay in the
        autograd graph, so gradients with respect to them can be taken."""
        x = self.embed(images, drop_patches)
        attentions = []
        for block in self.blocks:
            if return_attention:
                x, attention = block(x, return_attention=True)
                attentions.append(attention)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, tuple(attentions)) if return_attention else x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])

    def forward(self, images: torch.Tensor, return_attention: bool = False, drop_patches: float = 0.0):
        if return_attention:
            features, attentions = self.forward_features(images, return_attention=True,
                                                         drop_patches=drop_patches)
            return self.forward_head(features), attentions
        return self.forward_head(self.forward_features(images, drop_patches=drop_patches))

    def subset_logits(self, tokens: torch.Tensor, rows: torch.Tensor,
                      index: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits [R, classes] of sequences cut from `embed`'s tokens [B, T, E]: sequence r holds
        tokens `index[r]` (CLS = 0 first) of image `rows[r]`, as in training with patch dropout
        (each token carries its position embedding). `index` is [R, K], or a list of such blocks
        [R_g, K_g] for sequences of several lengths (R = the sum of the R_g, in that order), which
        then run in one packed pass (`Block.forward_packed`).

        The same numbers as running the blocks on the gathered sequences, for less work when many
        sequences share an image (removal curves, leave-one-patch-out): the first block's LayerNorm
        and projections act per token, so they run once per image and are gathered, and the last
        block runs for the CLS query alone, the only token the head reads."""
        groups = [index] if torch.is_tensor(index) else list(index)
        shapes = [tuple(group.shape) for group in groups]
        if sum(r for r, _ in shapes) != len(rows):
            raise ValueError(f"{len(rows)} rows for index blocks of shapes {shapes}")
        image = rows.repeat_interleave(_sequence_lengths(shapes).to(rows.device))
        token = torch.cat([group.flatten() for group in groups])
        first, last = self.blocks[0], len(self.blocks) - 1
        x = first.forward_packed(tokens[image, token], first.project(first.norm1(tokens))[image, token], shapes,
                                 cls_only=last == 0)
        for i, block in enumerate(self.blocks[1:], start=1):
            x = block.forward_packed(x, block.project(block.norm1(x)), shapes, cls_only=i == last)
        return self.forward_head(self.norm(x)[:, None])  # x: the CLS outputs [R, E]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only,
                         token, map_location="cpu", strict=True, **model_kwargs):
        # Replaces the mixin's loader: safetensors only (never a pickle), and strict key and shape
        # checks, so a checkpoint that does not fit this class fails with a clear message.
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights_file = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights_file):
                raise FileNotFoundError(f"{model_id} holds no {WEIGHTS_NAME}")
        else:
            weights_file = hf_hub_download(
                repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only)
        state = load_safetensors(weights_file, device=str(map_location))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong_shape:
            raise CheckpointMismatchError(
                f"{weights_file} does not fit this model config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong_shape[:5]}")
        model.load_state_dict(state, strict=True)  # fp16-stored weights are upcast by copy_
        return model.to(map_location).eval()


class CheckpointMismatchError(ValueError):
    """The weights file does not match the architecture described by config.json."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Inside, `model` is in eval mode; after, in the mode it came in (even on an error)."""
    if not any(module.training for module in model.modules()):
        yield  # already in eval mode throughout: switching back and forth costs a pass over every module
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
