"""vit_core.adapters: timm ViTs (plain, no CLS, registers, distilled DeiT) explained like our own model.

Tiny randomly initialised timm models; every reference is recomputed here by slow explicit loops
(a per-head forward pass written out, and `test_rollout.slow_maps` for the maps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from test_rollout import slow_maps
from toys import tiny_vit
from vit_core import explain, preprocess
from vit_core.adapters import TimmViT, adapt, capture_attention, load_model
from vit_core.attribution import attention_x_gradient, input_x_gradient, integrated_gradients, occlusion
from vit_core.checkpoints import CheckpointError
from vit_core.faithfulness import _cascade, _fresh_weights, cascading_randomization
from vit_core.layout import TokenLayout, token_layout
from vit_core.methods import METHOD_NAMES, METHODS, OWN_VIT, attribute, supported_methods
from vit_core.preprocessing import normalize
from vit_core.trust import trust_figures

SMALL = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
# name -> (timm model name, its arguments, expected layout)
VARIANTS = {
    "vit_p4": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4), TokenLayout(1, (0,))),
    "vit_p16": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=16), TokenLayout(1, (0,))),
    "no_cls_avg": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, class_token=False,
                                                global_pool="avg"), TokenLayout(0, None)),
    "registers": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, reg_tokens=3), TokenLayout(4, (0,))),
    "registers_avg_qknorm": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, reg_tokens=2, class_token=False,
                                                          global_pool="avg", qk_norm=True), TokenLayout(2, None)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=4), TokenLayout(2, (0, 1))),
}


def make_timm(variant: str, seed: int = 0) -> torch.nn.Module:
    """A tiny timm model in eval mode, its weights jittered so attention and logits are not flat."""
    name, kwargs, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **SMALL, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def images_for(model: TimmViT, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))


def slow_forward(vit, image: torch.Tensor):
    """One image through the timm ViT with each head's attention written out (timm's own embedding,
    MLP, norms and head): logits [C] and the per-head probabilities, which keep their gradients."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image[None]))))[0]
    heads_per_layer = []
    for block in vit.blocks:
        h, attn = block.norm1(x), block.attn
        d = attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        outputs, probs = [], []
        for head in range(attn.num_heads):
            q, k, v = (h @ weight[part * attn.attn_dim + head * d:][:d].T + bias[part * attn.attn_dim + head * d:][:d]
                       for part in range(3))
            q, k = attn.q_norm(q), attn.k_norm(k)
            a = torch.softmax(q @ k.T / d ** 0.5, dim=-1)
            a.retain_grad()
            probs.append(a)
            outputs.append(a @ v)
        x = x + block.ls1(attn.proj(torch.cat(outputs, dim=-1)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
        heads_per_layer.append(probs)
    return vit.forward_head(vit.norm(x)[None])[0], heads_per_layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_and_attributes(variant):
    vit = make_timm(variant)
    model = adapt(vit)
    kwargs = VARIANTS[variant][1]
    assert isinstance(model, TimmViT) and not model.training
    assert token_layout(model) == model.layout == VARIANTS[variant][2]
    assert model.n_prefix_tokens == vit.num_prefix_tokens
    assert (model.image_size, model.patch_size) == (kwargs["img_size"], kwargs["patch_size"])
    assert model.grid_size == kwargs["img_size"] // kwargs["patch_size"]
    assert (model.depth, model.n_heads) == (2, 2)
    assert model.class_names == [f"class {i}" for i in range(5)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_capture_changes_no_number_and_restores_timm(variant):
    model = adapt(make_timm(variant))
    images = images_for(model)
    attns = [block.attn for block in model.vit.blocks]
    assert all(a.fused_attn for a in attns)  # the path that exposes no weights is the one compared against
    with torch.no_grad():
        plain = model(images)
        captured, attentions = model(images, return_attention=True)
        again = model(images)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, plain)
    assert len(attentions) == 2
    tokens = model.grid_size ** 2 + model.n_prefix_tokens
    assert all(a.shape == (2, 2, tokens, tokens) for a in attentions)
    assert all("forward" not in a.__dict__ for a in attns)


def test_capture_restores_after_an_error():
    vit = make_timm("vit_p4")
    with pytest.raises(AssertionError, match="Input height"):
        with capture_attention(vit):
            vit(torch.randn(1, 3, 8, 8))  # wrong size: timm refuses
    assert all("forward" not in block.attn.__dict__ for block in vit.blocks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_explain_equals_slow_loops(variant):
    model = adapt(make_timm(variant))
    images = images_for(model)
    layout = model.layout
    for fusion, ratio, target in (("mean", 0.0, None), ("max", 0.5, 3)):
        result = explain(model, images, target=target, head_fusion=fusion, discard_ratio=ratio)
        assert result.layout == layout
        for b in range(len(images)):
            assert_matches_slow_loops(result, b, *slow_forward(model.vit, images[b]), target, model)


def assert_matches_slow_loops(result, b: int, logits, heads, target, model) -> None:
    """Image b of `result` (an Explanation) against a slow forward pass's logits and per-head
    probabilities: the target, probabilities, attentions and the maps of `test_rollout.slow_maps`."""
    wanted = int(logits.argmax()) if target is None else target
    logits[wanted].backward()
    attn = np.array([[a.detach().numpy() for a in probs] for probs in heads], dtype=np.float64)
    grads = np.array([[a.grad.numpy() for a in probs] for probs in heads], dtype=np.float64)
    assert int(result.target[b]) == wanted
    np.testing.assert_allclose(result.probs[b].numpy(), torch.softmax(logits.detach(), -1).numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.attentions[b].numpy(), attn, rtol=1e-4, atol=1e-6)
    layout = model.layout
    slow = slow_maps(attn, grads, result.head_fusion, result.discard_ratio, model.grid_size,
                     layout.n_prefix_tokens, layout.explained_tokens)
    for name in ("rollout", "grad_rollout", "layer_maps"):
        np.testing.assert_allclose(getattr(result, name)[b].numpy(), slow[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert np.abs(slow["grad_rollout"]).sum() > 0


def test_settings_and_token_attention_follow_the_layout():
    model = adapt(make_timm("registers"))
    images = images_for(model)
    result = explain(model, images)
    fresh = explain(model, images, head_fusion="min", discard_ratio=0.25)
    redrawn = result.with_settings("min", 0.25)
    for name in ("rollout", "layer_maps", "last_layer", "grad_rollout"):
        torch.testing.assert_close(getattr(redrawn, name), getattr(fresh, name))
    prefix, g = model.n_prefix_tokens, model.grid_size
    row = result.attentions[:, 1, 0, prefix + 5, prefix:].reshape(-1, g, g)  # patch 5's row
    torch.testing.assert_close(result.token_attention(prefix + 5, layer=1, head=0), row)


def test_methods_that_read_our_modules_ask_for_our_own_model():
    model = adapt(make_timm("vit_p4"))
    images = images_for(model)
    own_model_methods = [method.name for method in METHODS if method.models is OWN_VIT]
    assert supported_methods(model) == tuple(m for m in METHOD_NAMES if m not in own_model_methods)
    assert supported_methods(tiny_vit()) == METHOD_NAMES
    result = explain(model, images)
    with pytest.raises(ValueError, match="occlusion_drop need vit_core's own ViTClassifier; for TimmViT choose from"):
        result.with_maps(model, images, ["input_x_gradient", "occlusion_drop"])
    for method in own_model_methods:
        with pytest.raises(ValueError, match="reads the modules of vit_core's own ViTClassifier"):
            attribute(model, images, method)


def explained_row(matrix: np.ndarray, layout: TokenLayout, grid: int) -> np.ndarray:
    """The layout's explained row of a [T, T] matrix over the patch columns, as [g, g], by hand."""
    prefix = layout.n_prefix_tokens
    rows = list(layout.explained_tokens) if layout.explained_tokens is not None else range(prefix, len(matrix))
    return np.mean([matrix[r, prefix:] for r in rows], axis=0).reshape(grid, grid)


@pytest.mark.parametrize("variant", ["vit_p4", "no_cls_avg", "deit_distilled"])
def test_attention_x_gradient_reads_the_explained_rows(variant):
    model = adapt(make_timm(variant))
    images = images_for(model)
    result = attention_x_gradient(model, images, 3)
    for b in range(len(images)):
        logits, heads = slow_forward(model.vit, images[b])
        logits[3].backward()
        total = sum(np.mean([np.maximum(a.grad.numpy() * a.detach().numpy(), 0) for a in probs], axis=0)
                    for probs in heads)
        expected = explained_row(total, model.layout, model.grid_size)
        assert np.abs(expected).sum() > 0
        np.testing.assert_allclose(result[b].numpy(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant", ["vit_p4", "registers_avg_qknorm"])
def test_occlusion_and_gradients_of_a_timm_model_match_timm_itself(variant):
    model = adapt(make_timm(variant))
    images, target = images_for(model), torch.tensor([1, 4])
    p, g = model.patch_size, model.grid_size
    with torch.no_grad():
        full = model.vit(images).log_softmax(-1)
        for i in range(g * g):  # one patch filled with the mean (0), through timm's own forward
            masked = images.clone()
            masked[:, :, i // g * p:(i // g + 1) * p, i % g * p:(i % g + 1) * p] = 0
            removed = model.vit(masked).log_softmax(-1)
            expected = (full - removed).gather(1, target[:, None])[:, 0]
            torch.testing.assert_close(occlusion(model, images, target)[:, i // g, i % g], expected,
                                       rtol=1e-4, atol=1e-6)
    inputs = images.clone().requires_grad_(True)
    model.vit(inputs).gather(1, target[:, None]).sum().backward()
    by_hand = (images * inputs.grad).view(2, 3, g, p, g, p).sum(dim=(1, 3, 5))
    torch.testing.assert_close(input_x_gradient(model, images, target), by_hand, rtol=1e-4, atol=1e-6)
    # Integrated Gradients' completeness: the map sums to logit(image) - logit(mean image)
    ig = integrated_gradients(model, images, target, steps=64)
    with torch.no_grad():
        gap = (model.vit(images) - model.vit(torch.zeros_like(images))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(ig.sum(dim=(1, 2)), gap, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("variant", ["vit_p4", "registers", "deit_distilled"])
def test_the_randomisation_cascade_reinitialises_every_timm_weight_once(variant):
    model = adapt(make_timm(variant))
    stages = _cascade(model)
    assert [s for s, _ in stages] == ["head", "block 2", "block 1", "embedding"]
    names = list(model.state_dict())
    covered = [n for n in names for _, prefixes in stages
               if any(n == q or n.startswith(q + ".") for q in prefixes)]
    assert sorted(covered) == sorted(names)  # each name in exactly one stage
    fresh, trained = _fresh_weights(model, seed=0), model.state_dict()
    assert all(not torch.equal(fresh[n], trained[n]) for n in names)  # the jittered weights all redrawn
    before = {n: t.clone() for n, t in trained.items()}
    images = images_for(model)
    results = cascading_randomization(model, images, ["grad_rollout", "input_x_gradient"])
    assert [r["stage"] for r in results["grad_rollout"]] == ["head", "block 2", "block 1", "embedding"]
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # the given model untouched


def test_trust_figures_of_a_timm_model():
    model = adapt(make_timm("registers"))
    images, target = images_for(model), torch.tensor([0, 2])
    maps = {"grad_rollout": explain(model, images, target=target).grad_rollout,
            "occlusion": occlusion(model, images, target)}
    figures = trust_figures(model, images, maps, target)
    torch.testing.assert_close(figures["occlusion"].spearman_occlusion, torch.ones(2, dtype=torch.float64))
    for result in figures.values():
        for name in ("deletion_percentile", "insertion_percentile"):
            values = getattr(result, name)
            assert ((values >= 0) & (values <= 100)).all()


def test_our_model_goes_through_as_it_is():
    model = tiny_vit()
    assert adapt(model) is model
    assert token_layout(model) == TokenLayout(1, (0,))
    with pytest.raises(TypeError, match="adapt"):
        token_layout(torch.nn.Linear(2, 2))


def test_preprocessing_and_class_names_come_from_pretrained_cfg():
    vit = make_timm("vit_p4")
    vit.pretrained_cfg = {**vit.pretrained_cfg, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                          "interpolation": "bilinear", "label_names": ["n1", "n2", "n3", "n4", "n5"],
                          "label_descriptions": {"n1": "tench", "n3": "goldfish"}}
    model = adapt(vit)
    assert (model.mean, model.std, model.interpolation) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")
    assert model.class_names == ["tench", "n2", "goldfish", "n4", "n5"]
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    batch = preprocess([picture, picture], model)
    resized = np.array(picture.resize((16, 16), Image.Resampling.BILINEAR))
    expected = normalize(torch.from_numpy(resized).permute(2, 0, 1)[None], model.mean, model.std)
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[1:], expected)


@pytest.mark.parametrize("variant", ["registers_avg_qknorm", "deit_distilled"])
def test_a_timm_folder_loads_through_load_model(variant, tmp_path):
    from timm.models import save_for_hf

    vit = make_timm(variant)
    save_for_hf(vit, tmp_path / "m", safe_serialization=True)
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, TimmViT) and not loaded.training
    assert loaded.layout == VARIANTS[variant][2]
    images = images_for(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), vit(images), rtol=0, atol=0)


def test_timm_folders_that_cannot_load_say_why(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(make_timm("vit_p4"), tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        load_model(tmp_path / "pickle")
    save_for_hf(make_timm("vit_p4"), tmp_path / "m", safe_serialization=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_args"]["depth"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit vit_tiny_patch16_224.*blocks.2"):
        load_model(tmp_path / "m")


def test_our_checkpoints_load_through_load_model(tmp_path):
    model = tiny_vit(sharpen=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and torch.equal(loaded.head.weight, model.head.weight)


def test_hub_id_offline_fails_fast(monkeypatch):
    import time

    from huggingface_hub.errors import LocalEntryNotFoundError

    import vit_core.checkpoints as checkpoints

    def download(repo_id, filename, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        pytest.fail("the network must not be used")

    monkeypatch.setattr(checkpoints, "hf_hub_download", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"'timm/vit_tiny_patch16_224'.*HF_HUB_OFFLINE is set.*local model folder"):
        load_model("timm/vit_tiny_patch16_224")
    assert time.monotonic() - start < 2


def test_unsupported_models_get_one_line_naming_what_is_supported(tmp_path):
    from timm.models import save_for_hf

    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3)
    attention_pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                         **SMALL, global_pool="map")
    for model, why in ((resnet, "ResNet is not a VisionTransformer"),
                       (swin, "SwinTransformer is not a VisionTransformer"),
                       (attention_pooled, "VisionTransformer pools with 'map'")):
        with pytest.raises(ValueError, match=f"unsupported model: {why}; supported: vit_core ViTClassifier") as info:
            adapt(model)
        assert "\n" not in str(info.value)
    save_for_hf(resnet, tmp_path / "resnet", safe_serialization=True)
    with pytest.raises(CheckpointError, match="unsupported model: ResNet is not a VisionTransformer; supported"):
        load_model(tmp_path / "resnet")
