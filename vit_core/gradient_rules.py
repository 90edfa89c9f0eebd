"""Modified backward passes for ViTs: the model's own logits, computed so that some gradient paths
are pruned or scaled. LRP (attribution.lrp) and LibraGrad (vit_core.libragrad) both read input x
gradient of such a pass.

A `Step` applies one set of `LRPRules` to the layers a ViT is made of (linear maps, LayerNorm,
GELU, the attention product); a `Walker` runs one kind of ViT through a Step: `embed` gives the
tokens that enter the first block (plain gradient), `logits` the blocks, final norm and head with
the rules. Walkers exist for our ViTClassifier and, by their module structure, for timm's
VisionTransformer and transformers' ViT / DeiT classifiers; the adapters in vit_core.adapters hand
theirs out through a `rule_walker()` method, so this module never imports the wrappers.

Bias shares: with a `probe` (ones [B, T, 1]) every bias inside the blocks and the final norm is
added as bias x probe[token], and with a `pooled_probe` (ones [B, 1]) every bias after the
pooling (fc_norm, the head); their gradients are then each token's and the head's bias share
(FullGrad's bias-gradient terms), taken in the same backward pass. Without probes the fused ops run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .memo import kept_while_unchanged
from .model import ViTClassifier


@dataclass(frozen=True)
class LRPRules:
    """Which rule each kind of layer gets.

    `qk_factor`, `v_factor`: the gradient factors on the attention's queries/keys and values
    (AttnLRP's uniform rule halves the relevance at A @ V and again at Q @ K^T: 0.25 and 0.5;
    CP-LRP holds the softmax constant: 0 and 1; 1 and 1 is the plain gradient). `gamma`: LRP's
    gamma rule on every linear layer inside the blocks (0: epsilon rule, i.e. the plain
    gradient). `final_norm_identity`: the identity rule on the final LayerNorm (and a pooled
    model's fc_norm) too; the blocks' LayerNorms always get it and GELU always gets the identity rule.
    """

    qk_factor: float
    v_factor: float
    gamma: float = 0.0
    final_norm_identity: bool = True


LRP_RULES = {
    "attnlrp": LRPRules(qk_factor=0.25, v_factor=0.5),
    "cp_lrp": LRPRules(qk_factor=0.0, v_factor=1.0),
    "lrp_composite": LRPRules(qk_factor=1.0, v_factor=1.0, gamma=0.05, final_norm_identity=False),
}


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by a constant factor."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return x
    return x.detach() if factor == 0.0 else _ScaleGradient.apply(x, factor)


class _LayerNormIdentity(torch.autograd.Function):
    """LayerNorm whose backward pass holds the standard deviation constant: the identity rule for
    the normalisation (the centring is linear and keeps its gradient). Written out because the
    spelled-out form costs about a dozen small ops forward and back, and one image's LRP is mostly
    such per-op overhead."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        # The kernel's own 1 / std, rather than a second pass over x for it.
        out, _, inverse_std = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.save_for_backward(weight, inverse_std)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, inverse_std = ctx.saved_tensors
        scaled = (grad if weight is None else grad * weight) * inverse_std
        return scaled - scaled.mean(dim=-1, keepdim=True), None, None, None


def gelu_identity(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x) = x * gate(x); holding the gate constant makes x * gradient equal on both sides
    of the activation: the identity rule. The gate is the normal CDF (or its tanh approximation),
    computed directly: no division by x, no special case at 0."""
    if approximate == "tanh":
        gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
    else:
        gate = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * gate.detach()


# Each weight's absolute values (`_absolute_weights`), kept while the weight is the same tensor and
# unchanged in place (its version counter), so repeated explanations do not rebuild them.
_ABSOLUTE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _absolute_weights(weight: torch.Tensor) -> torch.Tensor:
    return kept_while_unchanged(_ABSOLUTE, weight, (weight,), lambda: weight.detach().abs())


class _GammaLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose input gradient is the gamma rule (`linear_gamma`).

    With z = x W^T, the contributions x_j w_kj sum to P_k where positive and N_k where negative, and
    since max(c, 0) = (|c| + c) / 2, P = (A + z) / 2 and N = (z - A) / 2 with A = |x| |W|^T. The
    rule boosts each output's contributions of its own sign s (+1 where the output, bias included,
    is positive, else -1) by (1 + gamma): its denominator is out + gamma P or out + gamma N, that is
    out + gamma/2 (z + s A), which has the output's sign and is at least as large. The relevance per
    unit of output, r = out / denominator, flows back through the denominator's input derivative,
    (1 + gamma/2) W + gamma/2 s sign(x) |W|: two matrix products forward and two back, where
    autograd would walk back through a dozen small ops (an input of exactly 0 passes back only the
    first term)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma):
        out = F.linear(x, weight, bias)
        absolute = _absolute_weights(weight).to(x.dtype)
        linear = out if bias is None else out - bias
        # sign() rather than comparisons and torch.where, whose CPU kernels are many times slower
        # on tensors this small (benchmarks/explain_latency.py).
        own_sign = out.sign().sub_(0.5).sign_()
        denominator = out.add(linear.addcmul(own_sign, F.linear(x.abs(), absolute)), alpha=gamma / 2)
        denominator.add_(own_sign, alpha=1e-9)  # 0 only where the output and its boosted share are: keep r = 0 there
        ctx.gamma = gamma
        ctx.save_for_backward(weight, absolute, x.sign(), out / denominator, own_sign)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, absolute, x_sign, per_unit, own_sign = ctx.saved_tensors
        share = grad * per_unit
        through_abs = x_sign * ((share * own_sign) @ absolute)
        grad_x = (share @ weight.to(grad.dtype)).mul_(1 + ctx.gamma / 2).add_(through_abs, alpha=ctx.gamma / 2)
        return grad_x, None, None, None


def linear_gamma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """F.linear(x, weight, bias) whose input x gradient is the gamma rule for mixed-sign inputs:
    each output shares its relevance among the input contributions x_j w_kj, those of the
    output's own sign boosted by (1 + gamma); the bias keeps its share. gamma = 0: plain gradient."""
    if gamma == 0:
        return F.linear(x, weight, bias)
    return _GammaLinear.apply(x, weight, bias, gamma)


def lrp_rules(rules: str | LRPRules) -> LRPRules:
    """`rules` by name from LRP_RULES, or as given; ValueError naming the choices otherwise."""
    if isinstance(rules, LRPRules):
        return rules
    if rules not in LRP_RULES:
        raise ValueError(f"unknown LRP rules {rules!r}; choose one of {tuple(LRP_RULES)} or pass LRPRules")
    return LRP_RULES[rules]


# ----------------------------------------------------------------------------------------------
# One modified pass: the rules applied layer by layer

class Step:
    """The layers of a ViT with `rules` on their backward pass; `probe` [B, T, 1] and
    `pooled_probe` [B, 1] (ones that require grad), when given, carry the bias shares (see the
    module's docstring). Bias shares are exact with the plain gradient of the linear maps only
    (gamma 0): the gamma rule mixes a bias into its inputs' shares."""

    def __init__(self, rules: LRPRules, probe: torch.Tensor | None = None,
                 pooled_probe: torch.Tensor | None = None):
        if (probe is not None or pooled_probe is not None) and rules.gamma:
            raise ValueError(f"bias shares need gamma 0 (the plain gradient of linear maps), got {rules.gamma}")
        self.rules, self.probe, self.pooled_probe = rules, probe, pooled_probe

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               gamma: float = 0.0, pooled: bool = False) -> torch.Tensor:
        probe = self.pooled_probe if pooled else self.probe
        if probe is None or bias is None:
            return linear_gamma(x, weight, bias, gamma)
        return F.linear(x, weight) + bias * probe

    def norm(self, norm: nn.Module, x: torch.Tensor, identity: bool = True, pooled: bool = False,
             probe: bool = True) -> torch.Tensor:
        """LayerNorm `norm` (or nn.Identity) on x; `identity`: the identity rule (standard deviation
        held constant), else its plain gradient. `probe` False keeps its bias out of the shares
        (norms inside the attention heads, whose rows are not tokens)."""
        if isinstance(norm, nn.Identity):
            return x
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise ValueError(f"no gradient rule for {type(norm).__name__}: LayerNorm over the last dimension only")
        probe_t = (self.pooled_probe if pooled else self.probe) if probe else None
        bias = norm.bias if probe_t is None else None
        if identity:
            out = _LayerNormIdentity.apply(x, norm.weight, bias, norm.eps)
        else:
            out = F.layer_norm(x, norm.normalized_shape, norm.weight, bias, norm.eps)
        return out if probe_t is None or norm.bias is None else out + norm.bias * probe_t

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(q k^T * scale) @ v for heads [B, H, T, d], the rules' factors on q, k and v;
        the heads side by side [B, T, H d]. The softmax keeps its plain gradient, which in
        gradient x input form is AttnLRP's softmax rule."""
        q, k = scale_gradient(q, self.rules.qk_factor), scale_gradient(k, self.rules.qk_factor)
        v = scale_gradient(v, self.rules.v_factor)
        attention = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        return (attention @ v).transpose(1, 2).flatten(2)


@dataclass(frozen=True)
class Walker:
    """One ViT's modified pass in two parts: `embed(images)` -> the tokens entering the first block
    [B, T, E] (plain gradient), `logits(tokens, step)` -> the logits [B, classes] through `step`."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor, Step], torch.Tensor]


def has_rules(model: nn.Module) -> bool:
    """Whether `rule_walker` has a Walker for `model`: our ViTClassifier or an adapted model."""
    return isinstance(model, ViTClassifier) or callable(getattr(model, "rule_walker", None))


def rule_walker(model: nn.Module) -> Walker:
    """The Walker of our ViTClassifier or of an adapted model (its `rule_walker()`); ValueError otherwise."""
    if isinstance(model, ViTClassifier):
        return Walker(model.embed, lambda tokens, step: _own_logits(model, tokens, step))
    if not has_rules(model):
        raise ValueError(f"no gradient rules for a {type(model).__name__}; pass it through "
                         f"vit_core.adapters.adapt first")
    return model.rule_walker()


def rules_forward(model: nn.Module, images: torch.Tensor, rules: str | LRPRules) -> torch.Tensor:
    """The model's eval-mode logits, computed so that input x gradient of them is the relevance
    `rules` propagate. Only the backward pass differs from `model(images)`; additions, the
    residual stream, the embedding and the head keep their plain gradient."""
    walker = rule_walker(model)
    return walker.logits(walker.embed(images), Step(lrp_rules(rules)))


# ----------------------------------------------------------------------------------------------
# Our ViTClassifier

def _own_logits(model: ViTClassifier, x: torch.Tensor, step: Step) -> torch.Tensor:
    for block in model.blocks:
        x = x + _own_attention(block.attn, step.norm(block.norm1, x), step)
        x = x + _own_mlp(block.mlp, step.norm(block.norm2, x), step)
    x = step.norm(model.norm, x, identity=step.rules.final_norm_identity)
    return step.linear(x[:, 0], model.head.weight, model.head.bias, pooled=True)


def _own_attention(mha: nn.MultiheadAttention, h: torch.Tensor, step: Step) -> torch.Tensor:
    """`Block.attention_with_weights` (eval mode) through the Step."""
    batch, tokens, emb = h.shape
    gamma, heads = step.rules.gamma, mha.num_heads
    qkv = step.linear(h, mha.in_proj_weight, mha.in_proj_bias, gamma)
    q, k, v = qkv.view(batch, tokens, 3, heads, emb // heads).permute(2, 0, 3, 1, 4)
    out = step.attention(q, k, v, 1 / math.sqrt(emb // heads))
    return step.linear(out, mha.out_proj.weight, mha.out_proj.bias, gamma)


def _own_mlp(mlp: nn.Sequential, x: torch.Tensor, step: Step) -> torch.Tensor:
    for layer in mlp:
        if isinstance(layer, nn.GELU):
            x = gelu_identity(x, layer.approximate)
        elif isinstance(layer, nn.Linear):
            x = step.linear(x, layer.weight, layer.bias, step.rules.gamma)
        elif not isinstance(layer, nn.Dropout):
            raise TypeError(f"no LRP rule for {type(layer).__name__} in the MLP")
    return x


# ----------------------------------------------------------------------------------------------
# timm's VisionTransformer (standard blocks: pre-norm attention and GELU MLP, optional LayerScale)

def timm_walker(vit: nn.Module) -> Walker:
    """The Walker of a timm VisionTransformer; ValueError naming what has no rule here."""
    reason = _timm_without_rules(vit)
    if reason is not None:
        raise ValueError(f"no gradient rules for this timm model: {reason}")
    return Walker(lambda images: vit.patch_drop(vit._pos_embed(vit.patch_embed(images))),
                  lambda tokens, step: _timm_logits(vit, tokens, step))


def _timm_without_rules(vit: nn.Module) -> str | None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    for i, block in enumerate(vit.blocks):
        if type(block) is not Block:
            return f"block {i} is a {type(block).__name__}, not timm's Block"
        if getattr(block.attn, "gate", None) is not None:
            return f"block {i} has gated attention"
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.act, nn.GELU):
            return (f"block {i}'s MLP is a {type(block.mlp).__name__} with {type(block.mlp.act).__name__}, "
                    f"not Mlp with GELU")
    return None


def _timm_logits(vit: nn.Module, x: torch.Tensor, step: Step) -> torch.Tensor:
    x = step.norm(vit.norm_pre, x)
    for block in vit.blocks:  # drop path and dropout do nothing in eval mode; LayerScale is linear
        x = x + block.ls1(_timm_attention(block.attn, step.norm(block.norm1, x), step))
        x = x + block.ls2(_timm_mlp(block.mlp, step.norm(block.norm2, x), step))
    final = step.rules.final_norm_identity
    x = step.norm(vit.norm, x, identity=final)
    if hasattr(vit, "head_dist"):  # distilled DeiT: eval logits average the CLS and distillation heads
        return (step.linear(x[:, 0], vit.head.weight, vit.head.bias, pooled=True)
                + step.linear(x[:, 1], vit.head_dist.weight, vit.head_dist.bias, pooled=True)) / 2
    pooled = x[:, vit.num_prefix_tokens:].mean(dim=1) if vit.global_pool == "avg" else x[:, 0]
    pooled = step.norm(vit.fc_norm, pooled, identity=final, pooled=True)
    return step.linear(pooled, vit.head.weight, vit.head.bias, pooled=True)


def _timm_attention(attn: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
    batch, tokens, _ = h.shape
    gamma = step.rules.gamma
    qkv = step.linear(h, attn.qkv.weight, attn.qkv.bias, gamma)
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = step.norm(attn.q_norm, q, probe=False), step.norm(attn.k_norm, k, probe=False)
    out = step.norm(attn.norm, step.attention(q, k, v, attn.scale))
    return step.linear(out, attn.proj.weight, attn.proj.bias, gamma)


def _timm_mlp(mlp: nn.Module, x: torch.Tensor, step: Step) -> torch.Tensor:
    gamma = step.rules.gamma
    x = gelu_identity(step.linear(x, mlp.fc1.weight, mlp.fc1.bias, gamma), mlp.act.approximate)
    return step.linear(step.norm(mlp.norm, x), mlp.fc2.weight, mlp.fc2.bias, gamma)


# ----------------------------------------------------------------------------------------------
# transformers' ViT / DeiT image classifiers

# config.hidden_act -> the GELU approximation it computes
HF_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


def hf_walker(model: nn.Module, base: str) -> Walker:
    """The Walker of a transformers ViT / DeiT classifier whose encoder is `model.<base>`."""
    act = model.config.hidden_act
    if act not in HF_GELU:
        raise ValueError(f"no gradient rules for hidden_act {act!r}; rules exist for {tuple(HF_GELU)}")
    encoder = getattr(model, base)
    return Walker(lambda images: encoder.embeddings(images),
                  lambda tokens, step: _hf_logits(model, encoder, HF_GELU[act], tokens, step))


def _hf_logits(model: nn.Module, encoder: nn.Module, approximate: str, x: torch.Tensor, step: Step) -> torch.Tensor:
    gamma = step.rules.gamma
    for layer in encoder.layers:  # dropout does nothing in eval mode
        x = x + _hf_attention(layer.attention, step.norm(layer.layernorm_before, x), step)
        mlp = layer.mlp
        hidden = gelu_identity(step.linear(step.norm(layer.layernorm_after, x), mlp.fc1.weight, mlp.fc1.bias, gamma),
                               approximate)
        x = x + step.linear(hidden, mlp.fc2.weight, mlp.fc2.bias, gamma)
    x = step.norm(encoder.layernorm, x, identity=step.rules.final_norm_identity)
    if hasattr(model, "distillation_classifier"):  # DeiT with teacher: the mean of both heads
        cls, dist = model.cls_classifier, model.distillation_classifier
        return (step.linear(x[:, 0], cls.weight, cls.bias, pooled=True)
                + step.linear(x[:, 1], dist.weight, dist.bias, pooled=True)) / 2
    return step.linear(x[:, 0], model.classifier.weight, model.classifier.bias, pooled=True)


def _hf_attention(attention: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
    batch, tokens, _ = h.shape
    gamma = step.rules.gamma

    def heads(proj: nn.Linear) -> torch.Tensor:
        return step.linear(h, proj.weight, proj.bias, gamma).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)

    out = step.attention(heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj), attention.scaling)
    return step.linear(out, attention.o_proj.weight, attention.o_proj.bias, gamma)
