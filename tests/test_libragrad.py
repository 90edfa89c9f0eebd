"""LibraGrad: a toy worked by hand, FullGrad-completeness on our ViT and on timm / transformers ViTs,
and a slow reference that needs no gradient at all (the frozen network's forward passes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_adapters import VARIANTS as TIMM_VARIANTS
from test_adapters import images_for, make_timm
from test_adapters_hf import VARIANTS as HF_VARIANTS
from test_adapters_hf import images_for as hf_images
from test_adapters_hf import make_hf
from toys import tiny_vit
from vit_core import ViTClassifier
from vit_core.adapters import adapt
from vit_core.libragrad import libragrad, libragrad_terms


def hand_toy() -> ViTClassifier:
    """One block, 2 channels, one head, a 2x2 one-channel image in 1-pixel patches, every norm
    without eps: pixel p becomes the token (p, -p); CLS is (1, -1); queries and keys are 0
    (uniform attention), values and output projection the identity, fc1 is 0 and fc2 adds its
    bias (0.3, 0); the final norm adds (0, 0.1) and the head reads class 0 as 2 y0 + y1 + 0.3."""
    model = ViTClassifier(image_size=2, patch_size=1, in_channels=1, emb_size=2, depth=1, n_heads=1,
                          mlp_ratio=1.0, dropout=0.0, n_classes=2, class_names=("a", "b"), mean=(0.0,), std=(1.0,))
    block = model.blocks[0]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.patch_embed.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.cls_token.copy_(torch.tensor([1.0, -1.0]))
        block.attn.in_proj_weight[4:].copy_(torch.eye(2))  # values: identity
        block.attn.out_proj.weight.copy_(torch.eye(2))
        block.mlp[3].bias.copy_(torch.tensor([0.3, 0.0]))
        model.norm.bias.copy_(torch.tensor([0.0, 0.1]))
        model.head.weight[0].copy_(torch.tensor([2.0, 1.0]))
        model.head.bias[0] = 0.3
        for norm in (block.norm1, block.norm2, model.norm):
            norm.weight.fill_(1.0)
            norm.eps = 0.0
    return model.eval()


def test_hand_worked_toy():
    # Pixels [[1, 2], [-1, 3]]: norm1 makes each token (s, -s), s its sign; uniform attention over
    # the 5 tokens averages them: (3/5)(1, -1). The MLP adds (0.3, 0). CLS leaves the block as
    # (1, -1) + (0.6, -0.6) + (0.3, 0) = (1.9, -1.6): centred (1.75, -1.75), std 7/4, normed
    # (1, -1), plus (0, 0.1): logit = 2 - 0.9 + 0.3 = 1.4.
    # Backward with the std held: (2, 1) centred / (7/4) = (2/7, -2/7) at CLS. The values pass
    # 1/5 of it to every token: (2/35, -2/35), and norm1 (std |p|, held) turns token (p, -p)'s
    # share into 2 (2/35) sign(p) = +-4/35. CLS also keeps (1, -1) . (2/7, -2/7) = 4/7 = 20/35.
    # Biases: fc2's (0.3, 0) . (2/7, -2/7) = 3/35 and the final norm's (0, 0.1) . (2, 1) = 0.1,
    # both at CLS; the head's 0.3 is pooled. Sum: 8/35 + 24/35 + 3/35 + 0.1 + 0.3 = 1.4.
    model = hand_toy()
    image = torch.tensor([[[[1.0, 2.0], [-1.0, 3.0]]]])
    assert model(image)[0, 0].item() == pytest.approx(1.4)
    terms = libragrad_terms(model, image, 0)
    expected_patches = torch.tensor([[4.0, 4.0], [-4.0, 4.0]]) / 35
    torch.testing.assert_close(libragrad(model, image, 0)[0], expected_patches)
    torch.testing.assert_close(terms.tokens[0, 0], torch.tensor(24 / 35 + 3 / 35 + 0.1))
    torch.testing.assert_close(terms.pooled[0], torch.tensor(0.3))
    torch.testing.assert_close(terms.explained[0], torch.tensor(1.4))


def with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero biases everywhere, so every bias share is exercised."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.2)
    return model


def assert_complete(model, images, target, atol):
    terms = libragrad_terms(model, images, target)
    with torch.no_grad():
        logits = model(images).gather(1, torch.as_tensor(target).view(-1, 1)).squeeze(1)
    torch.testing.assert_close(terms.explained, logits.to(terms.explained.dtype), atol=atol, rtol=0)
    residual = (terms.tokens.sum(dim=-1) + terms.pooled - logits).abs().max().item()
    assert residual < atol, residual
    # the bias shares matter: the tokens' input x gradient alone would miss the logit
    assert (terms.tokens.sum(dim=-1) - logits).abs().max().item() > 10 * atol


def test_complete_on_our_vit():
    model = with_random_biases(tiny_vit(seed=3, image_size=16, sharpen=True))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert_complete(model, images, torch.tensor([1, 5, 9]), atol=1e-5)
    assert_complete(model.double(), images.double(), torch.tensor([1, 5, 9]), atol=1e-12)


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_complete_on_timm_vits(variant):
    model = adapt(with_random_biases(make_timm(variant)))
    assert_complete(model, images_for(model), torch.tensor([0, 3]), atol=1e-5)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_complete_on_transformers_vits(variant):
    model = adapt(with_random_biases(make_hf(variant)))
    assert_complete(model, hf_images(), torch.tensor([4, 2]), atol=1e-5)


def test_map_holds_the_patch_tokens_after_the_prefix():
    model = adapt(make_timm("registers"))  # CLS + 3 registers before the 16 patch tokens
    images = images_for(model)
    terms = libragrad_terms(model, images, 1)
    torch.testing.assert_close(libragrad(model, images, 1), terms.tokens[:, 4:].reshape(2, 4, 4))


# ----------------------------------------------------------------------------------------------
# Slow reference: with LayerNorm's std, GELU's gate and the attention probabilities frozen at
# their values in the real forward pass, our ViT is affine in its first tokens and its biases.
# Token t's share is then what that frozen network outputs from token t's own input alone, with
# only the biases added at token t switched on: one forward pass per token, no gradient.

def frozen_constants(model, x0):
    """Each block's std of norm1 and norm2 inputs, attention probabilities and GELU gates, and
    the final norm's std, from the real forward pass of tokens x0 [T, E]."""
    def std(t, norm):
        return (t.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()

    constants, x = [], x0
    for block in model.blocks:
        h = block.norm1(x)
        attended, probs = block.attention_with_weights(h[None])
        gate_in = block.mlp[0](block.norm2(x + attended[0]))
        constants.append((std(x, block.norm1), probs[0], std(x + attended[0], block.norm2),
                          0.5 * (1 + torch.erf(gate_in / 2 ** 0.5))))
        x = block(x[None])[0]
    return constants, std(x, model.norm)


def frozen_logit(model, x0, constants, final_std, bias_on, head_on, target):
    """The frozen network's target logit; bias_on [T, 1] switches the per-token biases."""
    def norm(layer, x, std):
        return layer.weight * (x - x.mean(-1, keepdim=True)) / std + layer.bias * bias_on

    def linear(layer_w, layer_b, x):
        return x @ layer_w.T + layer_b * bias_on

    x = x0
    for block, (std1, probs, std2, gate) in zip(model.blocks, constants):
        mha, heads = block.attn, block.attn.num_heads
        v = linear(mha.in_proj_weight[-x.shape[1]:], mha.in_proj_bias[-x.shape[1]:], norm(block.norm1, x, std1))
        v = v.view(len(x), heads, -1).transpose(0, 1)                           # [H, T, d]
        mixed = (probs @ v).transpose(0, 1).reshape(len(x), -1)
        x = x + linear(mha.out_proj.weight, mha.out_proj.bias, mixed)
        hidden = linear(block.mlp[0].weight, block.mlp[0].bias, norm(block.norm2, x, std2)) * gate
        x = x + linear(block.mlp[3].weight, block.mlp[3].bias, hidden)
    y = norm(model.norm, x, final_std)
    return y[0] @ model.head.weight[target] + model.head.bias[target] * head_on


def test_matches_the_frozen_networks_forward_passes():
    model = with_random_biases(tiny_vit(seed=4, image_size=16, sharpen=True)).double()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = [2, 7]
    terms = libragrad_terms(model, images, targets)
    with torch.no_grad():
        for b, target in enumerate(targets):
            x0 = model.embed(images[b:b + 1])[0]
            constants, final_std = frozen_constants(model, x0)
            whole = frozen_logit(model, x0, constants, final_std, torch.ones(len(x0), 1), 1.0, target)
            torch.testing.assert_close(whole, model(images[b:b + 1])[0, target])   # frozen = real, forward
            for t in range(len(x0)):
                alone = torch.zeros_like(x0)
                alone[t] = x0[t]
                switch = F.one_hot(torch.tensor(t), len(x0)).double()[:, None]
                share = frozen_logit(model, alone, constants, final_std, switch, 0.0, target)
                torch.testing.assert_close(terms.tokens[b, t], share, atol=1e-10, rtol=1e-8)
            torch.testing.assert_close(terms.pooled[b], model.head.bias[target])


def test_batch_equals_singles_and_leaves_the_model_as_it_was(tiny_images):
    model = tiny_vit(image_size=16, sharpen=True).train()
    model.head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    target = torch.tensor([3, 0, 7])
    batched = libragrad(model, tiny_images, target)
    singles = torch.cat([libragrad(model, tiny_images[b:b + 1], target[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_bad_input_is_a_clear_error(tiny_model, tiny_images):
    with pytest.raises(ValueError, match=r"class index in \[0, 10\)"):
        libragrad(tiny_model, tiny_images, 10)
    with pytest.raises(ValueError, match=r"\[B, C, 16, 16\]"):
        libragrad(tiny_model, tiny_images[0], 0)
    with pytest.raises(ValueError, match="pass it through vit_core.adapters.adapt"):
        libragrad(torch.nn.Linear(2, 2), tiny_images, 0)


def test_logprob_objective_is_the_chain_rule_over_the_logits(tiny_model, tiny_images):
    # d log p_t = d z_t - sum_k p_k d z_k: the log-probability's map is the target logit's map
    # minus every class's map weighted by its probability.
    target = torch.tensor([3, 0, 7])
    with torch.no_grad():
        probs = tiny_model(tiny_images).softmax(-1)
    per_class = torch.stack([libragrad(tiny_model, tiny_images, k) for k in range(10)], dim=1)  # [B, K, g, g]
    expected = per_class[torch.arange(3), target] - (probs[:, :, None, None] * per_class).sum(1)
    torch.testing.assert_close(libragrad(tiny_model, tiny_images, target, objective="logprob"), expected,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("adapted", [False, True])
def test_the_registry_entry_is_the_log_probabilitys_map_on_our_vit_and_an_adapted_one(adapted, tiny_model,
                                                                                       tiny_images):
    from vit_core.methods import METHOD, attribute, supported_methods

    model = adapt(make_timm("vit_p4")) if adapted else tiny_model
    images = images_for(model) if adapted else tiny_images
    entry = METHOD["libragrad"]
    assert entry.fast and entry.class_specific and not entry.rollout_settings and entry.picker is not None
    assert "libragrad" in supported_methods(model)
    target = torch.arange(len(images)) % 2
    torch.testing.assert_close(attribute(model, images, "libragrad", target),
                               libragrad(model, images, target, objective="logprob"))
    assert "libragrad" not in supported_methods(torch.nn.Linear(2, 2))  # no layers to put its rules on
