"""LibraGrad (Mehri, Soleymani Baghshah & Pilehvar, CVPR 2025, arXiv 2411.16760): gradients made
FullGrad-complete by pruning backward paths, read out as FullGrad on the tokens.

The forward pass is the model's own; only the backward pass changes (`gradient_rules`), as the
paper's public code sets it for a ViT with GELU MLPs (its "LibraGrad" preset):
- LayerNorm: the standard deviation's gradient is pruned (the centring keeps its gradient);
- GELU(x) = x * gate(x): the gate's gradient is pruned;
- attention: the gradient to the queries and keys is pruned, so the softmax probabilities act as
  constant weights on the values, which keep their gradient;
- linear maps, LayerScale, residual additions, pooling and the head keep their plain gradient.
(The paper's scaling of N-factor products by 1/N, for gated MLPs such as SwiGLU, does not arise in
these blocks. The code's preset also has a rule for the patch embedding, which only maps on pixels
use, and by default explains the target's softmax probability: `objective="logprob"` gives that
map up to a factor per image, d log p = dp / p.) Given those frozen factors the network is affine
in the tokens entering the first block and in its biases, so one backward pass gives an exact
decomposition of the explained logit.

The map is FullGrad on the tokens entering the first block, channels summed (the paper's FullGrad
at block 0, "sum" channel mixing): token t gets

    R[t] = sum_c x0[t, c] g[t, c]  +  sum over the biases b added at token t of  sum_c b_c g_b[t, c]

where x0 are the tokens (patch embedding plus position embedding; CLS, distillation and register
tokens are tokens too), g the pruned gradient of the target's logit with respect to them, and g_b
that of each bias inside the blocks and in the final norm. The biases applied after pooling (the
head's, a pooled model's fc_norm) belong to no token: their share is kept apart. FullGrad-
completeness: the shares of all tokens plus that pooled share sum to the logit exactly (up to
rounding). The map `libragrad` returns holds the patch tokens' shares [B, g, g]; the prefix
tokens' shares are in `libragrad_terms`.

Same modified backward pass as CP-LRP with the identity rule on every LayerNorm and GELU
(`gradient_rules.LRP_RULES["cp_lrp"]`); LibraGrad differs in what it reads: the tokens with every
bias's share, not the pixels alone. Our ViTClassifier and the adapted timm / transformers ViTs
(`vit_core.adapters`). One forward and one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attribution import _score, check_images, target_tensor
from .gradient_rules import LRPRules, Step, rule_walker
from .model import eval_mode

# Queries and keys pruned (softmax held), values kept, plain gradient through the linear maps,
# the identity rule on every LayerNorm (the final one too) and on GELU.
LIBRAGRAD_RULES = LRPRules(qk_factor=0.0, v_factor=1.0, gamma=0.0, final_norm_identity=True)


@dataclass(frozen=True)
class LibraGradTerms:
    """One LibraGrad decomposition: `tokens` [B, T] each token's share (input x gradient plus the
    biases added at it), `pooled` [B] the share of the biases applied after pooling, `explained`
    [B] the score explained. For the logit, tokens.sum(-1) + pooled == explained."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    explained: torch.Tensor


def libragrad_terms(model: nn.Module, images: torch.Tensor, target, objective: str = "logit") -> LibraGradTerms:
    """The whole decomposition of the target's score for `images` (normalised [B, C, S, S])."""
    walker = rule_walker(model)
    images = check_images(model, images)
    target = target_tensor(target, len(images), len(model.class_names))
    with eval_mode(model):
        with torch.no_grad():
            tokens = walker.embed(images)
        with torch.enable_grad():
            tokens.requires_grad_(True)
            probe = tokens.new_ones(*tokens.shape[:2], 1).requires_grad_(True)
            pooled_probe = tokens.new_ones(len(images), 1).requires_grad_(True)
            logits = walker.logits(tokens, Step(LIBRAGRAD_RULES, probe, pooled_probe))
            score = _score(logits, target, objective)
            gradient, bias_share, pooled_share = torch.autograd.grad(score.sum(), (tokens, probe, pooled_probe))
    shares = (tokens.detach() * gradient).sum(dim=-1) + bias_share[..., 0]
    return LibraGradTerms(shares, pooled_share[:, 0], score.detach())


def libragrad(model: nn.Module, images: torch.Tensor, target, objective: str = "logit") -> torch.Tensor:
    """LibraGrad's map [B, g, g]: each patch token's share of the target's logit (see the module's
    docstring), row-major patches. Class-specific; one forward + one backward pass. `objective`
    "logprob" explains the log-probability instead, through the softmax's plain gradient
    (completeness is the logit's)."""
    shares = libragrad_terms(model, images, target, objective).tokens
    n_patches = model.grid_size ** 2  # the patch tokens come after every prefix token
    return shares[:, -n_patches:].reshape(len(shares), model.grid_size, model.grid_size)
