"""Rollout, gradient rollout and `explain`: hand-worked examples, invariants, and agreement with
slow, obviously-correct loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit_core import (Explanation, MapCache, attention_rollout, cls_patch_map, discard_weakest, explain, fuse_heads,
                      gradient_rollout, patchify, token_map)

from toys import tiny_vit

A1 = [[0.5, 0.3, 0.2],
      [0.1, 0.6, 0.3],
      [0.2, 0.2, 0.6]]
A2 = [[0.2, 0.4, 0.4],
      [0.3, 0.3, 0.4],
      [0.0, 0.5, 0.5]]


def as_attn(*layers) -> torch.Tensor:
    """Single-head layers [T, T] -> [B=1, L, H=1, T, T] (float64 for exact comparisons)."""
    return torch.tensor(layers, dtype=torch.float64)[None, :, None]


# ----------------------------------------------------------------------------------------------
# attention_rollout on hand-built matrices

def test_one_layer_adds_identity_and_renormalises():
    # (A1 + I): rows [1.5, .3, .2], [.1, 1.6, .3], [.2, .2, 1.6], each summing to 2.
    expected = [[0.75, 0.15, 0.10],
                [0.05, 0.80, 0.15],
                [0.10, 0.10, 0.80]]
    torch.testing.assert_close(attention_rollout(as_attn(A1))[0], torch.tensor(expected, dtype=torch.float64))


def test_two_layers_multiply_later_layer_on_the_left():
    # Â1 as above; Â2 = (A2 + I) / 2 = [[.6, .2, .2], [.15, .65, .2], [0, .25, .75]].
    # joint = Â2 @ Â1, worked out row by row, e.g. row 0 = .6*[.75,.15,.1] + .2*[.05,.8,.15] + .2*[.1,.1,.8].
    expected = [[0.48, 0.27, 0.25],
                [0.165, 0.5625, 0.2725],
                [0.0875, 0.275, 0.6375]]
    torch.testing.assert_close(attention_rollout(as_attn(A1, A2))[0], torch.tensor(expected, dtype=torch.float64))
    # The other order (Â1 @ Â2) has first row [.4725, .2725, .255]: the test tells them apart.
    assert not torch.allclose(attention_rollout(as_attn(A1, A2))[0, 0],
                              torch.tensor([0.4725, 0.2725, 0.255], dtype=torch.float64))


def test_start_layer_skips_earlier_layers():
    expected = [[0.6, 0.2, 0.2], [0.15, 0.65, 0.2], [0.0, 0.25, 0.75]]
    got = attention_rollout(as_attn(A1, A2), start_layer=1)[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_fusions_on_two_heads():
    heads = torch.tensor([[[0.9, 0.1], [0.4, 0.6]],
                          [[0.5, 0.5], [0.2, 0.8]]], dtype=torch.float64)
    torch.testing.assert_close(fuse_heads(heads, "mean"), torch.tensor([[0.7, 0.3], [0.3, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(fuse_heads(heads, "max"), torch.tensor([[0.9, 0.5], [0.4, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(fuse_heads(heads, "min"), torch.tensor([[0.5, 0.1], [0.2, 0.6]], dtype=torch.float64))
    # Rollout with max fusion: max + I = [[1.9, .5], [.4, 1.8]], row sums 2.4 and 2.2.
    got = attention_rollout(heads[None, None], head_fusion="max")[0]
    torch.testing.assert_close(got, torch.tensor([[19 / 24, 5 / 24], [4 / 22, 18 / 22]], dtype=torch.float64))
    got = attention_rollout(heads[None, None], head_fusion="min")[0]  # min + I = [[1.5, .1], [.2, 1.6]]
    torch.testing.assert_close(got, torch.tensor([[15 / 16, 1 / 16], [2 / 18, 16 / 18]], dtype=torch.float64))


def test_discard_zeroes_smallest_patch_entries_never_cls():
    rows = torch.tensor([[0.10, 0.50, 0.20, 0.15, 0.05],
                         [0.01, 0.30, 0.29, 0.20, 0.20]])
    # T - 1 = 4 patch columns; ratio 0.5 drops floor(2.0) = 2 per row, ratio 0.3 drops floor(1.2) = 1.
    # Row 0: CLS (0.10) is smaller than 0.15 but is never discarded. Row 1: CLS is the smallest.
    torch.testing.assert_close(discard_weakest(rows, 0.5),
                               torch.tensor([[0.10, 0.50, 0.20, 0.0, 0.0], [0.01, 0.30, 0.29, 0.0, 0.0]]))
    # Row 1 has a tie (0.20, 0.20) for the one entry to drop: either may go, but only one.
    assert discard_weakest(rows, 0.3)[0].tolist() == pytest.approx([0.10, 0.50, 0.20, 0.15, 0.0])
    assert sorted(discard_weakest(rows, 0.3)[1].tolist()) == pytest.approx([0.0, 0.01, 0.20, 0.29, 0.30])
    torch.testing.assert_close(discard_weakest(rows, 0.0), rows)
    assert rows[0, 4] == 0.05  # the input is not modified


def test_discard_inside_rollout():
    # ratio 0.5 with 2 patch columns drops 1 per row: A1 row 0 [.5, .3, .2] -> [.5, .3, 0],
    # + I -> [1.5, .3, 0], / 1.8 -> [5/6, 1/6, 0].
    got = attention_rollout(as_attn(A1), discard_ratio=0.5)[0, 0]
    torch.testing.assert_close(got, torch.tensor([5 / 6, 1 / 6, 0.0], dtype=torch.float64))


def test_identity_attention_gives_identity():
    eye = torch.eye(5).expand(2, 3, 4, 5, 5)
    for fusion in ("mean", "max", "min"):
        for ratio in (0.0, 0.5):
            torch.testing.assert_close(attention_rollout(eye, fusion, ratio), torch.eye(5).expand(2, 5, 5))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_rows_of_joint_sum_to_one(fusion, ratio):
    scores = torch.randn(2, 4, 3, 17, 17, generator=torch.Generator().manual_seed(0))
    attentions = scores.softmax(-1)
    for start in range(4):
        joint = attention_rollout(attentions, fusion, ratio, start_layer=start)
        torch.testing.assert_close(joint.sum(-1), torch.ones(2, 17))
        assert (joint >= 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_fusion="median"), "head_fusion"),
    (dict(discard_ratio=1.0), "discard_ratio"),
    (dict(discard_ratio=-0.1), "discard_ratio"),
    (dict(start_layer=5), "start_layer"),
])
def test_rollout_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_rollout(torch.rand(1, 2, 2, 5, 5), **kwargs)


def test_rollout_wrong_rank():
    with pytest.raises(ValueError, match=r"\[B, L, H, T, T\]"):
        attention_rollout(torch.rand(2, 2, 5, 5))


# ----------------------------------------------------------------------------------------------
# gradient_rollout

def test_gradient_rollout_hand_example():
    # T = 5 (a 2x2 grid), two heads, A = 0.5 everywhere, so grad * A = 0.5 * grad.
    attentions = torch.full((1, 2, 2, 5, 5), 0.5, dtype=torch.float64)
    grads = torch.zeros_like(attentions)
    grads[0, 0, 0, 0] = torch.tensor([2.0, 4.0, -2.0, 0.0, 0.0])  # layer 1 head 0 -> [1, 2, 0(neg), 0, 0]
    grads[0, 0, 1, 0] = torch.tensor([0.0, 0.0, 2.0, 0.0, 2.0])   # layer 1 head 1 -> [0, 0, 1, 0, 1]
    grads[0, 0, 0, 1, 4] = 4.0                                     # layer 1 head 0, token 1 -> token 4: 2
    grads[0, 1, 0, 0, 1] = 2.0                                     # layer 2 head 0, CLS -> token 1: 1
    # Ā1 (head mean): row 0 = [.5, 1, .5, 0, .5], row 1 = [0, 0, 0, 0, 1]; R1 = I + Ā1:
    #   R1[0] = [1.5, 1, .5, 0, .5], R1[1] = [0, 1, 0, 0, 1].
    # Ā2: row 0 = [0, .5, 0, 0, 0]; R2 = R1 + Ā2 R1: R2[0] = R1[0] + .5 R1[1] = [1.5, 1.5, .5, 0, 1].
    relevance = gradient_rollout(attentions, grads)
    torch.testing.assert_close(relevance[0, 0], torch.tensor([1.5, 1.5, 0.5, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(cls_patch_map(relevance)[0], torch.tensor([[1.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(relevance[0, 1], torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(relevance[0, 2:], torch.eye(5, dtype=torch.float64)[2:])


def test_gradient_rollout_is_zero_when_target_ignores_attention(tiny_model, tiny_images):
    # The target logit is a constant (its head row is zero), so every gradient is 0 and R = I.
    with torch.no_grad():
        tiny_model.head.weight[4] = 0.0
    result = explain(tiny_model, tiny_images, target=4)
    assert torch.equal(result.grad_rollout, torch.zeros_like(result.grad_rollout))
    assert result.rollout.abs().sum() > 0  # plain rollout does not depend on the class


def test_gradient_rollout_is_class_specific_one_block():
    # One block; classes 0 and 1 have opposite head rows, so their attention gradients are
    # opposite: G1 = -G0. Then max(0, G0 A) - max(0, -G0 A) = G0 A, hence (R = I + Ā, one layer)
    # map(class 0) - map(class 1) = mean_h(G0 * A)[CLS, patches] - a known, signed answer.
    model = tiny_vit(image_size=16, sharpen=True, depth=1)
    with torch.no_grad():
        model.head.weight[1] = -model.head.weight[0]
        model.head.bias[1] = model.head.bias[0]
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    m0, m1 = explain(model, images, target=0), explain(model, images, target=1)
    logits, (attention,) = model(images, return_attention=True)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), attention)
    expected = cls_patch_map((grad * attention).mean(dim=1)).detach()
    torch.testing.assert_close(m0.grad_rollout - m1.grad_rollout, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(m0.grad_rollout, m1.grad_rollout)
    torch.testing.assert_close(m0.rollout, m1.rollout)


# ----------------------------------------------------------------------------------------------
# explain against a slow, obviously-correct loop

def slow_explain(model, image: torch.Tensor, target: int | None, fusion: str, ratio: float):
    """One image [3, S, S]: explicit per-patch, per-head loops using the model's parameters."""
    p, g = model.patch_size, model.grid_size
    patches = [image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1) for r in range(g) for c in range(g)]
    x = torch.stack(patches) @ model.patch_embed.weight.T + model.patch_embed.bias
    x = torch.cat([model.cls_token[0], x]) + model.pos_embed[0]
    heads_per_layer = []
    for block in model.blocks:
        h = block.norm1(x)
        mha = block.attn
        emb, n_heads = x.shape[-1], mha.num_heads
        d = emb // n_heads
        outputs, probs = [], []
        for head in range(n_heads):
            rows = slice(head * d, (head + 1) * d)
            q = h @ mha.in_proj_weight[:emb][rows].T + mha.in_proj_bias[:emb][rows]
            k = h @ mha.in_proj_weight[emb:2 * emb][rows].T + mha.in_proj_bias[emb:2 * emb][rows]
            v = h @ mha.in_proj_weight[2 * emb:][rows].T + mha.in_proj_bias[2 * emb:][rows]
            a = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            a.retain_grad()
            probs.append(a)
            outputs.append(a @ v)
        x = x + mha.out_proj(torch.cat(outputs, dim=-1))
        x = x + block.mlp(block.norm2(x))
        heads_per_layer.append(probs)
    logits = model.head(model.norm(x)[0])
    target = int(logits.argmax()) if target is None else target
    logits[target].backward()

    attn = np.array([[a.detach().numpy() for a in probs] for probs in heads_per_layer], dtype=np.float64)
    grads = np.array([[a.grad.numpy() for a in probs] for probs in heads_per_layer], dtype=np.float64)
    return dict(probs=torch.softmax(logits.detach(), -1).numpy(), target=target, attentions=attn,
                **slow_maps(attn, grads, fusion, ratio, g))


def slow_maps(attn: np.ndarray, grads: np.ndarray, fusion: str, ratio: float, g: int, n_prefix: int = 1,
              explained: tuple[int, ...] | None = (0,)) -> dict:
    """Rollout, gradient rollout and per-layer maps of one image's attentions and gradients
    [L, H, T, T] by explicit loops. Patch tokens follow `n_prefix` prefix tokens; the map reads the
    mean of the `explained` rows (None: of the patch rows)."""
    n_layers, n_heads, tokens = attn.shape[0], attn.shape[1], attn.shape[-1]
    n_drop = math.floor(ratio * (tokens - n_prefix))
    joint = np.eye(tokens)
    fused_layers = []
    for layer in range(n_layers):
        fused = np.zeros((tokens, tokens))
        for i in range(tokens):
            for j in range(tokens):
                values = [attn[layer, h, i, j] for h in range(n_heads)]
                fused[i, j] = {"mean": sum(values) / n_heads, "max": max(values), "min": min(values)}[fusion]
        fused_layers.append(fused.copy())
        for i in range(tokens):
            weakest = sorted(range(n_prefix, tokens), key=lambda j: fused[i, j])[:n_drop]
            for j in weakest:
                fused[i, j] = 0.0
        a = fused + np.eye(tokens)
        a = a / a.sum(axis=1, keepdims=True)
        joint = a @ joint
    relevance = np.eye(tokens)
    for layer in range(n_layers):
        bar = np.maximum(grads[layer] * attn[layer], 0).mean(axis=0)
        relevance = relevance + bar @ relevance
    rows = list(range(n_prefix, tokens)) if explained is None else list(explained)
    as_grid = lambda m: (sum(m[r] for r in rows) / len(rows))[n_prefix:].reshape(g, g)  # noqa: E731
    return dict(rollout=as_grid(joint), grad_rollout=as_grid(relevance),
                layer_maps=np.stack([as_grid(f) for f in fused_layers]))


@pytest.mark.parametrize("fusion, ratio, target", [("mean", 0.0, None), ("max", 0.5, 3), ("min", 0.25, 7)])
def test_explain_equals_slow_loop(tiny_model, tiny_images, fusion, ratio, target):
    result = explain(tiny_model, tiny_images, target=target, head_fusion=fusion, discard_ratio=ratio)
    assert isinstance(result, Explanation)
    for b in range(2):  # two images keep the pure-Python loop quick; batch = singles is tested below
        slow = slow_explain(tiny_model, tiny_images[b], target, fusion, ratio)
        assert int(result.target[b]) == slow["target"]
        for name in ("probs", "attentions", "rollout", "grad_rollout", "layer_maps"):
            np.testing.assert_allclose(getattr(result, name)[b].numpy(), slow[name], rtol=1e-4, atol=1e-5,
                                       err_msg=name)
        np.testing.assert_allclose(result.last_layer[b].numpy(), slow["layer_maps"][-1], rtol=1e-4, atol=1e-6)


def test_explain_shapes_and_dtypes(tiny_model, tiny_images):
    result = explain(tiny_model, tiny_images.double())
    B, L, H, T, g = 3, 2, 4, 17, 4
    assert result.probs.shape == (B, 10) and result.target.shape == (B,)
    assert result.attentions.shape == (B, L, H, T, T)
    assert result.rollout.shape == result.grad_rollout.shape == result.last_layer.shape == (B, g, g)
    assert result.layer_maps.shape == (B, L, g, g)
    for name in ("probs", "attentions", "rollout", "grad_rollout", "layer_maps", "last_layer"):
        tensor = getattr(result, name)
        assert tensor.dtype == torch.float32 and not tensor.requires_grad, name
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(B))
    torch.testing.assert_close(result.attentions.sum(-1), torch.ones(B, L, H, T))
    assert set(result.maps()) == {"rollout", "grad_rollout", "last_layer"}
    assert set(result.as_numpy()) >= {"probs", "attentions", "rollout", "grad_rollout", "head_fusion"}


def test_attentions_equal_qk_recomputation_and_mha_weights(tiny_model, tiny_images):
    result = explain(tiny_model, tiny_images)
    inputs = []
    hooks = [block.norm1.register_forward_hook(lambda m, args, out: inputs.append(out.detach()))
             for block in tiny_model.blocks]
    try:
        with torch.no_grad():
            tiny_model(tiny_images)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, (block, h) in enumerate(zip(tiny_model.blocks, inputs)):
        mha = block.attn
        emb, heads = h.shape[-1], mha.num_heads
        d = emb // heads
        with torch.no_grad():
            q = F.linear(h, mha.in_proj_weight[:emb], mha.in_proj_bias[:emb])
            k = F.linear(h, mha.in_proj_weight[emb:2 * emb], mha.in_proj_bias[emb:2 * emb])
            q = q.view(*h.shape[:2], heads, d).transpose(1, 2)
            k = k.view(*h.shape[:2], heads, d).transpose(1, 2)
            recomputed = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            _, mha_weights = mha(h, h, h, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(result.attentions[:, layer], recomputed, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.attentions[:, layer], mha_weights, atol=1e-6, rtol=1e-5)


def test_exactly_one_forward_and_one_backward(tiny_model, tiny_images):
    calls = {"model": 0, "blocks": [0] * len(tiny_model.blocks), "backward": 0}

    def count_model(*_):
        calls["model"] += 1

    def count_block(i):
        def hook(*_):
            calls["blocks"][i] += 1
        return hook

    def count_backward(*_):
        calls["backward"] += 1

    handles = [tiny_model.register_forward_hook(count_model),
               tiny_model.head.register_full_backward_hook(count_backward)]
    handles += [block.register_forward_hook(count_block(i)) for i, block in enumerate(tiny_model.blocks)]
    try:
        explain(tiny_model, tiny_images)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["model"] == 1
    assert calls["blocks"] == [1] * len(tiny_model.blocks)
    assert calls["backward"] == 1


def test_batch_equals_single_calls(tiny_model, tiny_images):
    for target in (None, 2, torch.tensor([1, 5, 9])):
        batched = explain(tiny_model, tiny_images, target=target, head_fusion="max", discard_ratio=0.2)
        for b in range(len(tiny_images)):
            single_target = target[b:b + 1] if isinstance(target, torch.Tensor) else target
            single = explain(tiny_model, tiny_images[b:b + 1], target=single_target, head_fusion="max",
                             discard_ratio=0.2)
            for name in ("probs", "target", "attentions", "rollout", "grad_rollout", "layer_maps", "last_layer"):
                torch.testing.assert_close(getattr(batched, name)[b:b + 1], getattr(single, name),
                                           atol=1e-5, rtol=1e-4, msg=name)


def test_explain_restores_training_mode_and_leaves_no_grads(tiny_model, tiny_images):
    tiny_model.train()
    explain(tiny_model, tiny_images)
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(head_fusion="sum"), ValueError, "head_fusion"),
    (dict(discard_ratio=1.0), ValueError, "discard_ratio"),
    (dict(discard_ratio=-0.5), ValueError, "discard_ratio"),
    (dict(target=10), ValueError, "target"),
    (dict(target=-1), ValueError, "target"),
])
def test_explain_bad_arguments(tiny_model, tiny_images, kwargs, error, message):
    with pytest.raises(error, match=message):
        explain(tiny_model, tiny_images, **kwargs)


def test_explain_wrong_image_shape(tiny_model):
    with pytest.raises(ValueError, match="images must be"):
        explain(tiny_model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images must be"):
        explain(tiny_model, torch.randn(3, 16, 16))


# ----------------------------------------------------------------------------------------------
# Patch order and token_map

def test_token_order_is_row_major_like_patchify(tiny_model):
    # Only patch (row 1, col 2) is non-zero: exactly token 1 + 1 * 4 + 2 = 7 changes its embedding.
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 4:8, 8:12] = 1.0
    assert torch.equal(patchify(image, 4)[0, 1, 2], image[0, :, 4:8, 8:12])
    with torch.no_grad():
        changed = (tiny_model.embed(image) - tiny_model.embed(torch.zeros_like(image))).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [7]


def test_cls_patch_map_places_patch_i_at_row_major_cell():
    matrix = torch.zeros(17, 17)
    matrix[0, 1 + 6] = 1.0  # CLS attends to patch 6 = row 1, col 2 of a 4x4 grid
    grid = cls_patch_map(matrix)
    assert grid.shape == (4, 4) and grid[1, 2] == 1.0 and grid.sum() == 1.0


def test_token_map_hand_example():
    attentions = torch.zeros(2, 3, 5, 5)  # L=2, H=3, T=5 (2x2 grid)
    attentions[1, 0, 3] = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.9])  # layer 2, head 0: patch 2 -> patch 3
    attentions[1, 1, 3] = torch.tensor([0.4, 0.6, 0.0, 0.0, 0.0])  # head 1: patch 2 -> patch 0
    attentions[0, 2, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # layer 1, head 2: CLS -> patch 1
    torch.testing.assert_close(token_map(attentions, token=3, layer=1, head=0), torch.tensor([[0.0, 0.0], [0.0, 0.9]]))
    torch.testing.assert_close(token_map(attentions, token=3, layer=-1), torch.tensor([[0.2, 0.0], [0.0, 0.3]]))
    torch.testing.assert_close(token_map(attentions, token=0, layer=0, head=2), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_token_map_matches_explanation(tiny_model, tiny_images):
    result = explain(tiny_model, tiny_images[:1])
    torch.testing.assert_close(token_map(result.attentions[0], token=0, layer=-1), result.last_layer[0])
    torch.testing.assert_close(token_map(result.attentions[0], token=0, layer=0), result.layer_maps[0, 0])
    row = result.attentions[0, 1, 2, 5, 1:].reshape(4, 4)
    torch.testing.assert_close(token_map(result.attentions[0], token=5, layer=1, head=2), row)


@pytest.mark.parametrize("kwargs, message", [
    (dict(token=17, layer=0), "token"), (dict(token=-1, layer=0), "token"),
    (dict(token=0, layer=2), "layer"), (dict(token=0, layer=-3), "layer"),
    (dict(token=0, layer=0, head=4), "head"),
])
def test_token_map_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_map(torch.rand(2, 4, 17, 17), **kwargs)
    with pytest.raises(ValueError, match=r"\[L, H, T, T\]"):
        token_map(torch.rand(1, 2, 4, 17, 17), token=0, layer=0)


def test_with_settings_equals_a_fresh_explanation_without_a_forward_pass(tiny_model):
    import torch

    images = torch.randn(2, 3, tiny_model.image_size, tiny_model.image_size)
    cached = explain(tiny_model, images)
    calls = []
    handle = tiny_model.register_forward_hook(lambda *a: calls.append(1))
    redrawn = cached.with_settings("max", 0.5)
    handle.remove()
    fresh = explain(tiny_model, images, head_fusion="max", discard_ratio=0.5)
    assert calls == []
    for name in ("rollout", "layer_maps", "last_layer", "grad_rollout"):
        torch.testing.assert_close(getattr(redrawn, name), getattr(fresh, name))
    assert redrawn.head_fusion == "max" and redrawn.discard_ratio == 0.5
    assert not torch.allclose(redrawn.rollout, cached.rollout)


# ----------------------------------------------------------------------------------------------
# Explanation.head_attention, token_attention and retarget (what the app draws from one explanation)

def count_forwards(model, fn):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, len(calls)


def test_head_attention_is_one_head_or_the_plain_mean_of_heads(tiny_model, tiny_images):
    result = explain(tiny_model, tiny_images, head_fusion="max")  # the rollout fusion must not matter
    attn = result.attentions.numpy()
    B, L, H, T, _ = attn.shape
    mean = result.head_attention().numpy()
    for b, layer, i, j in [(0, 0, 0, 3), (2, 1, 5, 0), (1, 1, 16, 16)]:  # spot checks against the sum
        assert mean[b, layer, i, j] == pytest.approx(sum(attn[b, layer, h, i, j] for h in range(H)) / H, rel=1e-6)
    torch.testing.assert_close(result.head_attention(None), fuse_heads(result.attentions, "mean"))
    for head in range(H):
        torch.testing.assert_close(result.head_attention(head), result.attentions[:, :, head])
    assert result.head_attention(1).shape == (B, L, T, T)
    # The matrices and the token maps are the same numbers: row `token` of a layer, patch columns.
    row = result.head_attention(2)[1, 1, 5, 1:].reshape(4, 4)
    torch.testing.assert_close(row, token_map(result.attentions[1], token=5, layer=1, head=2))
    for bad in (-1, H):
        with pytest.raises(ValueError, match="head"):
            result.head_attention(bad)


def test_token_attention_is_token_map_for_every_image(tiny_model, tiny_images):
    result = explain(tiny_model, tiny_images)
    for token, layer, head in [(0, -1, None), (0, 0, 3), (7, 1, None), (16, -2, 1)]:
        maps = result.token_attention(token, layer, head)
        assert maps.shape == (3, 4, 4)
        for b in range(3):
            torch.testing.assert_close(maps[b], token_map(result.attentions[b], token, layer, head))
    torch.testing.assert_close(result.token_attention(0, -1), result.last_layer)  # CLS, mean fusion
    for kwargs, message in [(dict(token=17, layer=0), "token"), (dict(token=0, layer=2), "layer"),
                            (dict(token=0, layer=0, head=4), "head")]:
        with pytest.raises(ValueError, match=message):
            result.token_attention(**kwargs)


def test_retarget_equals_a_fresh_explanation_and_runs_the_model_once_per_target(tiny_model, tiny_images):
    base, cache = explain(tiny_model, tiny_images), MapCache()
    for target in (3, torch.tensor([1, 5, 9])):
        retargeted, forwards = count_forwards(tiny_model, lambda: base.retarget(tiny_model, tiny_images, target, cache))
        fresh = explain(tiny_model, tiny_images, target=target)
        assert forwards == 1
        torch.testing.assert_close(retargeted.grad_rollout, fresh.grad_rollout)
        assert torch.equal(retargeted.target, fresh.target)
        for name in ("probs", "attentions", "rollout", "layer_maps", "last_layer"):
            assert torch.equal(getattr(retargeted, name), getattr(base, name)), name
        assert not torch.allclose(retargeted.grad_rollout, base.grad_rollout)
        # Asked again, from the original or from anything derived from it: no model run.
        again, forwards = count_forwards(tiny_model, lambda: base.with_settings("min", 0.3).retarget(
            tiny_model, tiny_images, target, cache))
        assert forwards == 0 and torch.equal(again.grad_rollout, retargeted.grad_rollout)
    back, forwards = count_forwards(tiny_model, lambda: base.retarget(tiny_model, tiny_images, 3, cache).retarget(
        tiny_model, tiny_images, base.target, cache))
    assert forwards == 0 and torch.equal(back.grad_rollout, base.grad_rollout)
    assert base.retarget(tiny_model, tiny_images, base.target) is base


def test_retarget_then_settings_equals_one_fresh_explanation(tiny_model, tiny_images):
    base = explain(tiny_model, tiny_images)
    fresh = explain(tiny_model, tiny_images, target=4, head_fusion="max", discard_ratio=0.5)
    one_way = base.retarget(tiny_model, tiny_images, 4).with_settings("max", 0.5)
    other_way = base.with_settings("max", 0.5).retarget(tiny_model, tiny_images, 4)
    for result in (one_way, other_way):
        for name in ("target", "rollout", "grad_rollout", "layer_maps", "last_layer"):
            torch.testing.assert_close(getattr(result, name), getattr(fresh, name), msg=name)
        assert (result.head_fusion, result.discard_ratio) == ("max", 0.5)
    assert set(one_way.maps()) == {"rollout", "grad_rollout", "last_layer"}


@pytest.mark.parametrize("target, images, message", [
    (10, None, "target must be a class index"), (-1, None, "target must be a class index"),
    (torch.tensor([1, 2]), None, "one per image"), (1, 2, "images must be the 3"),
])
def test_retarget_bad_arguments(tiny_model, tiny_images, target, images, message):
    base = explain(tiny_model, tiny_images)
    with pytest.raises(ValueError, match=message):
        base.retarget(tiny_model, tiny_images if images is None else tiny_images[:images], target)


# ----------------------------------------------------------------------------------------------
# Attribution maps through explain / Explanation.maps (vit_core.attribution does the computing)

def test_explain_offers_attribution_maps_equal_to_attribute(tiny_model, tiny_images):
    from vit_core.methods import attribute

    result = explain(tiny_model, tiny_images, methods=["lrp_composite", "attention_x_gradient"])
    assert list(result.maps()) == ["rollout", "grad_rollout", "last_layer", "lrp_composite", "attention_x_gradient"]
    for name in ("lrp_composite", "attention_x_gradient"):
        torch.testing.assert_close(result.maps()[name], attribute(tiny_model, tiny_images, name, result.target))
    arrays = result.as_numpy()
    assert arrays["lrp_composite"].shape == (3, 4, 4) and "attentions" in arrays
    with pytest.raises(ValueError, match="choose from rollout, grad_rollout"):
        explain(tiny_model, tiny_images, methods=["saliency"])


def test_with_maps_computes_once_per_target_and_follows_retarget(tiny_model, tiny_images):
    from vit_core.methods import attribute

    base, cache = explain(tiny_model, tiny_images), MapCache()
    _, forwards = count_forwards(tiny_model, lambda: base.with_maps(tiny_model, tiny_images, ["occlusion"], cache))
    assert forwards > 0
    derived = base.with_settings("max", 0.2)
    derived, forwards = count_forwards(tiny_model, lambda: derived.with_maps(tiny_model, tiny_images,
                                                                             ["occlusion", "rollout"], cache))
    assert forwards == 0 and "occlusion" in derived.maps()  # shared with everything derived
    other = base.retarget(tiny_model, tiny_images, 7, cache)
    assert "occlusion" not in other.maps()  # a class-specific map belongs to its target
    other = other.with_maps(tiny_model, tiny_images, ["occlusion"], cache)
    torch.testing.assert_close(other.maps()["occlusion"], attribute(tiny_model, tiny_images, "occlusion", 7))
    assert not torch.allclose(other.maps()["occlusion"], derived.maps()["occlusion"])
    assert base.retarget(tiny_model, tiny_images, 7, cache).maps().keys() == other.maps().keys()
    with pytest.raises(ValueError, match="images must be the 3"):
        base.with_maps(tiny_model, tiny_images[:1], ["attnlrp"])
    with pytest.raises(ValueError, match="unknown method"):
        base.with_maps(tiny_model, tiny_images, ["occlusion", "nope"])
    assert "nope" not in base.maps()


def test_slow_methods_are_registered_methods():
    from vit_core.explanation import HELD_METHODS
    from vit_core.methods import METHOD_NAMES, METHODS

    slow = {method.name for method in METHODS if not method.fast}
    assert slow and slow <= set(METHOD_NAMES) and not slow & set(HELD_METHODS)


def test_the_three_gradient_maps_come_from_one_pass_and_equal_their_own_methods(tiny_model, tiny_images, monkeypatch):
    from vit_core.attribution import attention_x_gradient, input_x_gradient

    explanation = explain(tiny_model, tiny_images, target=torch.tensor([1, 0, 2]), gradients=False)
    forward, calls = tiny_model.forward, []
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    explanation = explanation.with_maps(tiny_model, tiny_images, ["input_x_gradient", "attention_x_gradient",
                                                                  "grad_rollout"])
    assert len(calls) == 1
    monkeypatch.undo()
    maps = explanation.maps()
    target = explanation.target
    torch.testing.assert_close(maps["grad_rollout"], explain(tiny_model, tiny_images, target=target).grad_rollout)
    torch.testing.assert_close(maps["attention_x_gradient"], attention_x_gradient(tiny_model, tiny_images, target))
    torch.testing.assert_close(maps["input_x_gradient"], input_x_gradient(tiny_model, tiny_images, target))
    assert maps["input_x_gradient"].abs().sum() > 0 and maps["attention_x_gradient"].abs().sum() > 0
