"""Attribution methods against slow loops, hand-computed relevance and their promises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vit_core import attribution as at
from vit_core.attribution import LRPRules
from vit_core.gradient_rules import LRP_RULES
from vit_core.methods import METHOD_NAMES, attribute

from toys import tiny_vit

GRID = 4  # the tiny model here: 16x16 images, 4x4 patches


def make_tiny(seed: int = 0):
    return tiny_vit(seed=seed, image_size=16, sharpen=True)


def log_prob(model, images, target):
    with torch.no_grad():
        return model(images).log_softmax(-1).gather(1, torch.as_tensor(target).view(-1, 1)).squeeze(1)


def zero_patch(images, index, patch=4):
    row, col = divmod(index, images.shape[-1] // patch)
    out = images.clone()
    out[..., row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = 0.0
    return out


def per_patch_sum(pixels, patch=4):
    """[C, S, S] -> [g, g] by explicit slicing (independent of patchify)."""
    grid = pixels.shape[-1] // patch
    return torch.stack([torch.stack([pixels[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].sum()
                                     for c in range(grid)]) for r in range(grid)])


@pytest.fixture
def target():
    return torch.tensor([3, 0, 7])


def test_occlusion_mean_matches_slow_loop(tiny_model, tiny_images, target):
    fast = at.occlusion(tiny_model, tiny_images, target, mode="mean")
    full = log_prob(tiny_model, tiny_images, target)
    slow = torch.stack([full - log_prob(tiny_model, zero_patch(tiny_images, i), target)
                        for i in range(GRID * GRID)], dim=1).view(-1, GRID, GRID)
    assert fast.shape == (3, GRID, GRID)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_occlusion_drop_matches_sequences_without_the_token(tiny_model, tiny_images, target):
    fast = at.occlusion(tiny_model, tiny_images, target, mode="drop")
    full = log_prob(tiny_model, tiny_images, target)
    with torch.no_grad():
        tokens = tiny_model.embed(tiny_images)
        for index in (0, 5, 15):
            sequence = torch.cat([tokens[:, :index + 1], tokens[:, index + 2:]], dim=1)  # patch i = token i+1
            assert sequence.shape[1] == GRID * GRID
            for block in tiny_model.blocks:
                sequence = block(sequence)
            logits = tiny_model.head(tiny_model.norm(sequence)[:, 0])
            removed = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
            torch.testing.assert_close(fast.view(3, -1)[:, index], full - removed, atol=1e-5, rtol=1e-4)


def test_occlusion_drop_agrees_with_the_models_own_patch_dropout(tiny_model, tiny_images, target):
    # The model's forward with patch dropout leaves one random token out (15 of 16 kept): its
    # log-probability drop must be one of the 16 values of the "drop" map.
    fast = at.occlusion(tiny_model, tiny_images, target, mode="drop").view(3, -1)
    full = log_prob(tiny_model, tiny_images, target)
    torch.manual_seed(3)
    with torch.no_grad():
        dropped = tiny_model(tiny_images, drop_patches=1 / 16).log_softmax(-1)
    drop = full - dropped.gather(1, target[:, None]).squeeze(1)
    matches = ((fast - drop[:, None]).abs() < 1e-5).sum(dim=1)
    assert matches.tolist() == [1, 1, 1]


@pytest.mark.parametrize("mode", at.OCCLUSION_MODES)
def test_occlusion_in_small_passes_reports_progress_and_keeps_its_values(tiny_model, tiny_images, target,
                                                                          monkeypatch, mode):
    # 17 tokens, 16 patches, 3 images: the 48 rows fit one pass, too little work to split for
    # progress; with a budget of 10 rows, progress gets PROGRESS_STEPS passes of 2 rows per image.
    whole = at.occlusion(tiny_model, tiny_images, target, mode=mode)
    for budget, done in [(at.TOKENS_PER_PASS, [48]), (10 * 17, list(range(2, 49, 2)))]:
        monkeypatch.setattr(at, "TOKENS_PER_PASS", budget)
        calls = []
        small = at.occlusion(tiny_model, tiny_images, target, mode=mode, progress=lambda d, t: calls.append((d, t)))
        torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-6)
        assert [d for d, _ in calls] == done and {t for _, t in calls} == {48}


def test_integrated_gradients_reports_progress_to_the_end(tiny_model, tiny_images, target):
    calls = []
    at.integrated_gradients(tiny_model, tiny_images, target, steps=8, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (24, 24) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_occlusion_rejects_unknown_mode(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="mean.*drop"):
        at.occlusion(tiny_model, tiny_images, 0, mode="blur")


def test_input_x_gradient_matches_autograd_by_hand(tiny_model, tiny_images, target):
    fast = at.input_x_gradient(tiny_model, tiny_images, target)
    for b in range(3):
        image = tiny_images[b:b + 1].clone().requires_grad_(True)
        tiny_model(image)[0, target[b]].backward()
        torch.testing.assert_close(fast[b], per_patch_sum((image * image.grad)[0].detach()), atol=1e-5, rtol=1e-4)


def test_attention_x_gradient_matches_slow_loop(tiny_model, tiny_images, target):
    fast = at.attention_x_gradient(tiny_model, tiny_images, target)
    for b in range(3):
        logits, attentions = tiny_model(tiny_images[b:b + 1].clone().requires_grad_(True), return_attention=True)
        expected = torch.zeros(GRID * GRID)
        for attention in attentions:
            (grad,) = torch.autograd.grad(logits[0, target[b]], attention, retain_graph=True)
            heads = attention.shape[1]
            for head in range(heads):
                weighted = (grad[0, head] * attention[0, head]).clamp(min=0)
                expected += weighted[0, 1:].detach() / heads
        torch.testing.assert_close(fast[b].flatten(), expected, atol=1e-6, rtol=1e-4)


def test_integrated_gradients_completeness():
    model = make_tiny().double()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ig = at.integrated_gradients(model, images, [1, 6], steps=32)
    with torch.no_grad():
        gap = model(images)[[0, 1], [1, 6]] - model(torch.zeros_like(images))[[0, 1], [1, 6]]
    torch.testing.assert_close(ig.sum(dim=(1, 2)), gap, atol=1e-3 * gap.abs().max().item(), rtol=0)


def test_integrated_gradients_matches_riemann_reference():
    model = make_tiny().double()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = torch.tensor([2, 9])
    ig = at.integrated_gradients(model, images, target, steps=32)
    steps, total = 256, torch.zeros_like(images)
    for k in range(steps):  # midpoint rule, one alpha at a time
        scaled = ((k + 0.5) / steps * images).requires_grad_(True)
        model(scaled).gather(1, target[:, None]).sum().backward()
        total += scaled.grad
    reference = torch.stack([per_patch_sum(p) for p in images * total / steps])
    torch.testing.assert_close(ig, reference, atol=2e-3 * reference.abs().max().item(), rtol=0)


def bias_free(model):
    with torch.no_grad():
        model.cls_token.zero_()
        model.pos_embed.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    return model


@pytest.mark.parametrize("rules", ["cp_lrp", LRPRules(qk_factor=0.0, v_factor=1.0, gamma=0.3)])
def test_cp_lrp_is_complete_without_biases(rules):
    model = bias_free(make_tiny().double())
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    relevance = at.lrp(model, images, [0, 4, 8], rules=rules)
    with torch.no_grad():
        logits = model(images)[[0, 1, 2], [0, 4, 8]]
    torch.testing.assert_close(relevance.sum(dim=(1, 2)), logits, atol=1e-7, rtol=1e-6)


def test_cp_lrp_with_biases_leaves_their_share_out(tiny_model, tiny_images, target):
    # With biases, CLS token and position embedding, part of the logit is theirs: the sums differ.
    relevance = at.lrp(tiny_model, tiny_images, target, rules="cp_lrp").sum(dim=(1, 2))
    logits = tiny_model(tiny_images).detach().gather(1, target[:, None]).squeeze(1)
    assert (relevance - logits).abs().max() > 1e-3


@pytest.mark.parametrize("rules", list(LRP_RULES))
def test_lrp_forward_reproduces_the_logits(tiny_model, tiny_images, rules):
    with torch.no_grad():
        torch.testing.assert_close(at.lrp_forward(tiny_model, tiny_images, rules), tiny_model(tiny_images),
                                   atol=1e-5, rtol=1e-5)


def test_gamma_rule_weights_follow_in_place_changes(tiny_model, tiny_images, target):
    # The absolute weights are cached per weight tensor; an in-place update must not reuse them.
    before = at.lrp(tiny_model, tiny_images, target, rules="lrp_composite")
    with torch.no_grad():
        for block in tiny_model.blocks:
            block.mlp[0].weight.neg_()
    after = at.lrp(tiny_model, tiny_images, target, rules="lrp_composite")
    fresh = at.lrp(copy.deepcopy(tiny_model), tiny_images, target, rules="lrp_composite")
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(before, after)


# ----------------------------------------------------------------------------------------------
# A hand-written LRP in relevance form (each rule written as its textbook formula, relevance
# divided by the layer's own output), to check the modified-gradient implementation against.

def linear_rule(x, weight, bias, relevance, gamma=0.0):
    """z = x W^T + b; R_x[j] = sum_k c'_jk / (sum_j c'_jk + b_k) R_z[k], c' = boosted contributions."""
    contributions = x[:, :, None] * weight.T[None]                       # [T, in, out]
    z = contributions.sum(1) + bias
    same_sign = torch.where(z[:, None, :] > 0, contributions.clamp(min=0), contributions.clamp(max=0))
    modified = contributions + gamma * same_sign
    return (modified * (relevance / (modified.sum(1) + bias))[:, None, :]).sum(-1)


def layer_norm_rule(norm, x, relevance, identity=True):
    y = norm(x)
    if not identity:  # plain gradient x input of the whole LayerNorm
        jacobian = torch.stack([torch.autograd.functional.jacobian(norm, row) for row in x])  # [T, out, in]
        return x * torch.einsum("tk,tkj->tj", relevance / y, jacobian)
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    c = centred / std
    rel_c = norm.weight * c / y * relevance                              # y = gamma c + beta
    d = x.shape[-1]
    centring = (torch.eye(d, dtype=x.dtype) - 1.0 / d)[None] / std[:, :, None]  # c_k = sum_j x_j M_jk
    return (x[:, :, None] * centring * (rel_c / c)[:, None, :]).sum(-1)


def attention_rule(block, h, relevance, f_a, f_qk, f_v, gamma):
    mha, (tokens, emb) = block.attn, h.shape
    heads = mha.num_heads
    hd = emb // heads
    qkv = h @ mha.in_proj_weight.T + mha.in_proj_bias
    q, k, v = qkv.view(tokens, 3, heads, hd).permute(1, 2, 0, 3)        # [H, T, hd] each
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    a = scores.softmax(-1)
    o = a @ v
    rel_o = linear_rule(o.transpose(0, 1).reshape(tokens, emb), mha.out_proj.weight, mha.out_proj.bias,
                        relevance, gamma).view(tokens, heads, hd).transpose(0, 1)
    share = a[..., None] * v[:, None, :, :] / o[:, :, None, :] * rel_o[:, :, None, :]  # [H, i, j, c]
    rel_a, rel_v = f_a * share.sum(-1), f_v * share.sum(1)
    rel_s = scores * (rel_a - a * rel_a.sum(-1, keepdim=True))           # AttnLRP's softmax rule
    terms = q[:, :, None, :] * k[:, None, :, :] / math.sqrt(hd) / scores[..., None] * rel_s[..., None]
    rel_q, rel_k = f_qk * terms.sum(2), f_qk * terms.sum(1)
    rel_qkv = torch.stack([rel_q, rel_k, rel_v]).permute(2, 0, 1, 3).reshape(tokens, 3 * emb)
    return linear_rule(h, mha.in_proj_weight, mha.in_proj_bias, rel_qkv, gamma)


def residual_rule(x, branch, relevance):
    total = x + branch
    return x / total * relevance, branch / total * relevance


def explicit_lrp(model, image, target, f_a, f_qk, f_v, gamma=0.0, final_identity=True):
    """Per-patch relevance [g, g] of one image [C, S, S] for the target logit."""
    patches = image.unfold(1, 4, 4).unfold(2, 4, 4).permute(1, 2, 0, 3, 4).reshape(-1, 3 * 16)
    embedded = patches @ model.patch_embed.weight.T + model.patch_embed.bias
    x = torch.cat([model.cls_token[0], embedded]) + model.pos_embed[0]
    stream = []
    for block in model.blocks:                                           # forward, keeping inputs
        h = block.norm1(x)
        attended = x + block.attn(h[None], h[None], h[None], need_weights=False)[0][0]
        stream.append((x, h, attended))
        x = attended + block.mlp(block.norm2(attended))
    logits = model.head(model.norm(x)[0])
    rel_y = torch.zeros_like(x)
    rel_y[0] = linear_rule(model.norm(x)[:1], model.head.weight, model.head.bias,
                           (logits * F.one_hot(torch.tensor(target), len(logits)))[None])[0]
    rel = layer_norm_rule(model.norm, x, rel_y, identity=final_identity)
    for block, (x_in, h, attended) in zip(reversed(model.blocks), reversed(stream)):
        h2 = block.norm2(attended)
        u = h2 @ block.mlp[0].weight.T + block.mlp[0].bias
        m = block.mlp(h2)
        rel_attended, rel_m = residual_rule(attended, m, rel)
        rel_u = linear_rule(F.gelu(u), block.mlp[3].weight, block.mlp[3].bias, rel_m, gamma)  # GELU: identity
        rel_attended = rel_attended + layer_norm_rule(block.norm2, attended, linear_rule(
            h2, block.mlp[0].weight, block.mlp[0].bias, rel_u, gamma))
        rel_x, rel_branch = residual_rule(x_in, attended - x_in, rel_attended)
        rel = rel_x + layer_norm_rule(block.norm1, x_in, attention_rule(block, h, rel_branch, f_a, f_qk, f_v, gamma))
    rel_embedded = embedded / (embedded + model.pos_embed[0, 1:]) * rel[1:]
    rel_pixels = linear_rule(patches, model.patch_embed.weight, model.patch_embed.bias, rel_embedded)
    return rel_pixels.sum(-1).view(GRID, GRID)


@pytest.mark.parametrize("name, factors", [
    ("attnlrp", dict(f_a=0.5, f_qk=0.5, f_v=0.5)),
    ("cp_lrp", dict(f_a=0.0, f_qk=1.0, f_v=1.0)),
    ("lrp_composite", dict(f_a=1.0, f_qk=1.0, f_v=1.0, gamma=0.05, final_identity=False)),
])
def test_lrp_matches_hand_written_relevance_propagation(name, factors):
    model = make_tiny(seed=2).double()
    with torch.no_grad():  # non-zero biases everywhere, so the bias terms of every rule are exercised
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.normal_(0, 0.1)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fast = at.lrp(model, images, [5, 1], rules=name)
    for b, target in enumerate([5, 1]):
        torch.testing.assert_close(fast[b], explicit_lrp(model, images[b], target, **factors),
                                   atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Registry, batching, errors and side effects

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_batch_equals_singles(tiny_model, tiny_images, target, method):
    batched = attribute(tiny_model, tiny_images, method, target)
    assert batched.shape == (3, GRID, GRID)
    singles = torch.cat([attribute(tiny_model, tiny_images[b:b + 1], method, target[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)


def test_attribute_defaults_to_the_predicted_class(tiny_model, tiny_images):
    predicted = tiny_model(tiny_images).argmax(-1)
    torch.testing.assert_close(attribute(tiny_model, tiny_images, "input_x_gradient"),
                               at.input_x_gradient(tiny_model, tiny_images, predicted))


def test_unknown_method_lists_the_choices(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="unknown attribution method 'nope'.*occlusion.*lrp_composite"):
        attribute(tiny_model, tiny_images, "nope")


@pytest.mark.parametrize("target, message", [
    (10, r"class index in \[0, 10\)"), (-1, r"class index in \[0, 10\)"), ([1, 2], r"\[B\] = \[3\]"),
    (1.5, "integer class indices"),
])
def test_bad_target_is_a_clear_error(tiny_model, tiny_images, target, message):
    for method in ("occlusion", "lrp_composite"):
        with pytest.raises(ValueError, match=message):
            attribute(tiny_model, tiny_images, method, target)


def test_bad_images_are_a_clear_error(tiny_model, tiny_images):
    with pytest.raises(ValueError, match=r"\[B, C, 16, 16\]"):
        attribute(tiny_model, tiny_images[0], "input_x_gradient", 0)
    with pytest.raises(ValueError, match="normalised floats"):
        attribute(tiny_model, tiny_images.to(torch.uint8), "input_x_gradient", 0)


def test_gradient_methods_leave_the_model_as_they_found_it(tiny_images, target):
    model = make_tiny().train()
    model.head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for method in ("integrated_gradients", "input_x_gradient", "attention_x_gradient", "attnlrp",
                   "cp_lrp", "lrp_composite", "occlusion"):
        attribute(model, tiny_images, method, target)
        assert model.training
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters()), method
