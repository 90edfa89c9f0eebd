"""The LRP family on timm and transformers ViTs (vit_core.gradient_rules' walkers) against LRP written
out in relevance form: each layer's rule as its textbook formula (lxt's rules: identity on LayerNorm
and GELU, AttnLRP's uniform and softmax rules, CP-LRP's constant attention, epsilon and gamma rules on
linear maps), relevance divided by each layer's own output, on tiny random models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from test_adapters import VARIANTS as TIMM_VARIANTS
from test_adapters import images_for, make_timm
from test_adapters_hf import VARIANTS as HF_VARIANTS
from test_adapters_hf import images_for as hf_images
from test_adapters_hf import make_hf
from test_attribution import layer_norm_rule, linear_rule, residual_rule
from vit_core.adapters import adapt
from vit_core.attribution import lrp, lrp_forward
from vit_core.methods import attribute

# name -> the relevance factors of test_attribution's reference (f_a: the share of A @ V's relevance
# the probabilities get, f_qk: of Q K^T's, f_v: the values'), gamma, final norm's identity rule
RULES = {
    "attnlrp": dict(f_a=0.5, f_qk=0.5, f_v=0.5),
    "cp_lrp": dict(f_a=0.0, f_qk=1.0, f_v=1.0),
    "lrp_composite": dict(f_a=1.0, f_qk=1.0, f_v=1.0, gamma=0.05, final_identity=False),
}


def float64_with_biases(model: nn.Module) -> nn.Module:
    """The model in float64 with non-zero biases everywhere (every rule's bias term is exercised)."""
    model = model.double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# Each model as plain parts: embedding, blocks, final norm, pooling and heads

def timm_parts(model) -> SimpleNamespace:
    """An adapted timm ViT's parts (timm's own modules for every forward computation)."""
    vit = model.vit

    def block(b):
        assert isinstance(b.attn.norm, nn.Identity) and isinstance(b.mlp.norm, nn.Identity)
        return SimpleNamespace(norm1=b.norm1, norm2=b.norm2, heads=b.attn.num_heads, scale=b.attn.scale,
                               qkv=list(zip(b.attn.qkv.weight.chunk(3), b.attn.qkv.bias.chunk(3))),
                               o=(b.attn.proj.weight, b.attn.proj.bias), q_norm=b.attn.q_norm, k_norm=b.attn.k_norm,
                               ls1=b.ls1, ls2=b.ls2, fc1=(b.mlp.fc1.weight, b.mlp.fc1.bias),
                               fc2=(b.mlp.fc2.weight, b.mlp.fc2.bias), approximate=b.mlp.act.approximate)

    heads = [(0, vit.head)] + ([(1, vit.head_dist)] if hasattr(vit, "head_dist") else [])
    return SimpleNamespace(embed=lambda image: vit._pos_embed(vit.patch_embed(image[None]))[0],
                           projection=vit.patch_embed.proj, blocks=[block(b) for b in vit.blocks], norm=vit.norm,
                           avg=vit.global_pool == "avg", prefix=model.n_prefix_tokens, fc_norm=vit.fc_norm, heads=heads)


def hf_parts(model) -> SimpleNamespace:
    """An adapted transformers ViT / DeiT classifier's parts."""
    hf = model.hf
    encoder = hf.vit if hasattr(hf, "vit") else hf.deit

    def block(layer):
        a = layer.attention
        return SimpleNamespace(norm1=layer.layernorm_before, norm2=layer.layernorm_after,
                               heads=hf.config.num_attention_heads, scale=a.scaling,
                               qkv=[(p.weight, p.bias) for p in (a.q_proj, a.k_proj, a.v_proj)],
                               o=(a.o_proj.weight, a.o_proj.bias), q_norm=nn.Identity(), k_norm=nn.Identity(),
                               ls1=nn.Identity(), ls2=nn.Identity(), fc1=(layer.mlp.fc1.weight, layer.mlp.fc1.bias),
                               fc2=(layer.mlp.fc2.weight, layer.mlp.fc2.bias), approximate="none")

    heads = ([(0, hf.cls_classifier), (1, hf.distillation_classifier)]
             if hasattr(hf, "distillation_classifier") else [(0, hf.classifier)])
    return SimpleNamespace(embed=lambda image: encoder.embeddings(image[None])[0],
                           projection=encoder.embeddings.patch_embeddings.projection,
                           blocks=[block(layer) for layer in encoder.layers], norm=encoder.layernorm, avg=False,
                           prefix=model.n_prefix_tokens, fc_norm=nn.Identity(), heads=heads)


# ----------------------------------------------------------------------------------------------
# Relevance, layer by layer

def norm_rule(norm, x, relevance, identity=True):
    return relevance if isinstance(norm, nn.Identity) else layer_norm_rule(norm, x, relevance, identity)


def split_heads(t, heads):
    """[T, H d] -> [H, T, d]"""
    return t.view(len(t), heads, -1).transpose(0, 1)


def merge_heads(t):
    """[H, T, d] -> [T, H d]"""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def attention_rule(block, h, relevance, f_a, f_qk, f_v, gamma):
    """Relevance of the normalised tokens h [T, E] from the attention output's relevance [T, E]."""
    heads = block.heads
    q_in, k_in, v = (split_heads(h @ w.T + b, heads) for w, b in block.qkv)
    q, k = block.q_norm(q_in), block.k_norm(k_in)
    scores = q @ k.transpose(-1, -2) * block.scale
    a = scores.softmax(-1)
    o = a @ v
    rel_o = split_heads(linear_rule(merge_heads(o), *block.o, relevance, gamma), heads)
    share = a[..., None] * v[:, None, :, :] / o[:, :, None, :] * rel_o[:, :, None, :]  # [H, i, j, c]
    rel_a, rel_v = f_a * share.sum(-1), f_v * share.sum(1)
    rel_s = scores * (rel_a - a * rel_a.sum(-1, keepdim=True))                       # AttnLRP's softmax rule
    terms = q[:, :, None, :] * k[:, None, :, :] * block.scale / scores[..., None] * rel_s[..., None]
    rel_q, rel_k = f_qk * terms.sum(2), f_qk * terms.sum(1)
    if not isinstance(block.q_norm, nn.Identity):  # qk-norm: the identity rule per head row
        rel_q = torch.stack([norm_rule(block.q_norm, q_in[i], rel_q[i]) for i in range(heads)])
        rel_k = torch.stack([norm_rule(block.k_norm, k_in[i], rel_k[i]) for i in range(heads)])
    return sum(linear_rule(h, w, b, merge_heads(r), gamma) for (w, b), r in zip(block.qkv, (rel_q, rel_k, rel_v)))


def mlp_rule(block, h2, relevance, gamma):
    u = h2 @ block.fc1[0].T + block.fc1[1]
    activated = F.gelu(u, approximate=block.approximate)
    rel_u = linear_rule(activated, *block.fc2, relevance, gamma)                     # GELU: identity rule
    return linear_rule(h2, *block.fc1, rel_u, gamma)


def head_relevance(parts, x, target, final_identity):
    """Relevance of the last block's output [T, E] from the target's logit (heads averaged)."""
    y = parts.norm(x)
    rel_y = torch.zeros_like(y)
    for token, head in parts.heads:
        if parts.avg:
            pooled_in = y[parts.prefix:].mean(0)
            pooled = parts.fc_norm(pooled_in)
        else:
            pooled = y[token]
        out = head(pooled)
        rel_out = (out * F.one_hot(torch.tensor(target), len(out)) / len(parts.heads))[None]
        rel_pooled = linear_rule(pooled[None], head.weight, head.bias, rel_out)[0]
        if parts.avg:  # fc_norm, then the mean over the patch tokens (epsilon rule, no bias)
            rel_in = norm_rule(parts.fc_norm, pooled_in[None], rel_pooled[None], final_identity)[0]
            count = len(y) - parts.prefix
            rel_y[parts.prefix:] += y[parts.prefix:] / count / pooled_in * rel_in
        else:
            rel_y[token] += rel_pooled
    return norm_rule(parts.norm, x, rel_y, final_identity)


def reference_lrp(parts, image, target, f_a, f_qk, f_v, gamma=0.0, final_identity=True):
    """Per-patch relevance [g, g] of one image [C, S, S] for the target's logit."""
    x = parts.embed(image)
    stream = []
    for block in parts.blocks:
        h = block.norm1(x)
        attended = x + block.ls1(attention_output(block, h))
        stream.append((x, h, attended))
        x = attended + block.ls2(mlp_output(block, block.norm2(attended)))
    rel = head_relevance(parts, x, target, final_identity)
    for block, (x_in, h, attended) in zip(reversed(parts.blocks), reversed(stream)):
        h2 = block.norm2(attended)
        rel_attended, rel_m = residual_rule(attended, block.ls2(mlp_output(block, h2)), rel)  # LayerScale: R passes
        rel_attended = rel_attended + norm_rule(block.norm2, attended, mlp_rule(block, h2, rel_m, gamma))
        rel_x, rel_branch = residual_rule(x_in, attended - x_in, rel_attended)
        rel = rel_x + norm_rule(block.norm1, x_in, attention_rule(block, h, rel_branch, f_a, f_qk, f_v, gamma))
    # Embedding, epsilon rule: each token's channel k splits between the patch's pixels (W x)_k and
    # the rest (embedding bias, position embedding) in proportion; the pixels' part summed per patch.
    projection = parts.projection
    pixels = F.conv2d(image[None], projection.weight, None, stride=projection.stride).flatten(2)[0].T  # [N, E]
    x0 = parts.embed(image)[parts.prefix:]
    relevance = (pixels / x0 * rel[parts.prefix:]).sum(-1)
    grid = int(len(relevance) ** 0.5)
    return relevance.view(grid, grid)


def attention_output(block, h):
    q, k, v = (split_heads(h @ w.T + b, block.heads) for w, b in block.qkv)
    o = (block.q_norm(q) @ block.k_norm(k).transpose(-1, -2) * block.scale).softmax(-1) @ v
    return merge_heads(o) @ block.o[0].T + block.o[1]


def mlp_output(block, h2):
    hidden = F.gelu(h2 @ block.fc1[0].T + block.fc1[1], approximate=block.approximate)
    return hidden @ block.fc2[0].T + block.fc2[1]


# ----------------------------------------------------------------------------------------------
# The walkers against the reference

TIMM_MODELS = list(TIMM_VARIANTS) + ["layerscale"]


def timm_model(variant: str):
    if variant != "layerscale":
        return make_timm(variant)
    torch.manual_seed(5)  # LayerScale (init_values) scales each branch before the residual sum
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5, img_size=16, patch_size=4, init_values=0.5).eval()


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("variant", TIMM_MODELS)
def test_timm_lrp_matches_hand_written_relevance_propagation(variant, name):
    model = adapt(float64_with_biases(timm_model(variant)))
    images, targets = images_for(model).double(), [1, 3]
    fast = lrp(model, images, targets, rules=name)
    parts = timm_parts(model)
    for b, target in enumerate(targets):
        expected = reference_lrp(parts, images[b], target, **RULES[name])
        torch.testing.assert_close(fast[b], expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_transformers_lrp_matches_hand_written_relevance_propagation(variant, name):
    model = adapt(float64_with_biases(make_hf(variant)))
    images, targets = hf_images().double(), [4, 0]
    fast = lrp(model, images, targets, rules=name)
    parts = hf_parts(model)
    for b, target in enumerate(targets):
        expected = reference_lrp(parts, images[b], target, **RULES[name])
        torch.testing.assert_close(fast[b], expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("model", [adapt(make_timm("deit_distilled")), adapt(make_hf("vit"))],
                         ids=["timm", "transformers"])
def test_the_registry_entries_run_on_adapted_models(model):
    images = images_for(model) if hasattr(model, "vit") else hf_images()
    with torch.no_grad():
        for name in RULES:
            torch.testing.assert_close(lrp_forward(model, images, name), model(images), atol=1e-5, rtol=1e-5)
    composite = attribute(model, images, "lrp_composite", [2, 1])
    torch.testing.assert_close(composite, lrp(model, images, [2, 1], "lrp_composite", objective="logprob"))
    assert composite.shape == (2, 4, 4) and composite.abs().sum() > 0


def test_unsupported_timm_blocks_are_a_clear_error():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=1, num_heads=2,
                            num_classes=5, img_size=16, patch_size=4, mlp_layer=timm.layers.SwiGLUPacked,
                            act_layer=nn.SiLU)
    model = adapt(vit)
    with pytest.raises(ValueError, match="MLP is a GluMlp with SiLU, not Mlp with GELU"):
        lrp(model, images_for(model), 0)
