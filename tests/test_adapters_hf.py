"""vit_core.adapters with Hugging Face transformers: tiny randomly initialised ViT and DeiT
classifiers explained like our own model, every reference recomputed here by a slow explicit
forward pass (each head written out) and `test_rollout.slow_maps`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, SwinConfig,
                          SwinForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor)

from test_adapters import assert_matches_slow_loops
from vit_core import explain, preprocess
from vit_core.adapters import HFViT, adapt, load_model
from vit_core.layout import TokenLayout
from vit_core.attribution import occlusion
from vit_core.checkpoints import CheckpointError
from vit_core.faithfulness import _cascade, _fresh_weights, cascading_randomization
from vit_core.methods import attribute, supported_methods
from vit_core.trust import trust_figures

SMALL = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, num_labels=5, id2label={i: f"n{i}" for i in range(5)},
             label2id={f"n{i}": i for i in range(5)})
# name -> (config class, model class, expected layout)
VARIANTS = {
    "vit": (ViTConfig, ViTForImageClassification, TokenLayout(1, (0,))),
    "deit": (DeiTConfig, DeiTForImageClassification, TokenLayout(2, (0,))),
    "deit_teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher, TokenLayout(2, (0, 1))),
}


def make_hf(variant: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers classifier in eval mode, its weights jittered so nothing is flat."""
    config_class, model_class, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_class(config_class(**SMALL))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def images_for(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def slow_forward(model, image: torch.Tensor):
    """One image through the model with each head's attention written out from the layers' own
    projections: logits [C] and the per-head probabilities, which keep their gradients."""
    base = model.vit if hasattr(model, "vit") else model.deit
    x = base.embeddings(image[None])[0]
    heads_per_layer = []
    for layer in base.layers:
        h, attention = layer.layernorm_before(x), layer.attention
        q, k, v = attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)
        d = q.shape[-1] // model.config.num_attention_heads
        outputs, probs = [], []
        for head in range(model.config.num_attention_heads):
            part = slice(head * d, (head + 1) * d)
            a = torch.softmax(q[:, part] @ k[:, part].T / d ** 0.5, dim=-1)
            a.retain_grad()
            probs.append(a)
            outputs.append(a @ v[:, part])
        x = x + attention.o_proj(torch.cat(outputs, dim=-1))
        x = x + layer.mlp(layer.layernorm_after(x))
        heads_per_layer.append(probs)
    x = base.layernorm(x)
    if isinstance(model, DeiTForImageClassificationWithTeacher):
        logits = (model.cls_classifier(x[0]) + model.distillation_classifier(x[1])) / 2
    else:
        logits = model.classifier(x[0])
    return logits, heads_per_layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_explain_equals_slow_loops(variant):
    model = adapt(make_hf(variant))
    assert isinstance(model, HFViT) and model.layout == VARIANTS[variant][2]
    images = images_for()
    result = explain(model, images, target=None, head_fusion="max", discard_ratio=0.25)
    assert model.hf.config._attn_implementation == "sdpa"  # the fused kernel is back after the pass
    with torch.no_grad():  # capturing attention changes no number beyond rounding
        torch.testing.assert_close(model(images).softmax(-1), result.probs, rtol=1e-5, atol=1e-6)
    for b in range(len(images)):
        assert_matches_slow_loops(result, b, *slow_forward(model.hf, images[b]), None, model)


def test_generic_methods_trust_and_the_randomisation_cascade():
    model = adapt(make_hf("deit_teacher"))
    images, target = images_for(), torch.tensor([1, 3])
    assert "occlusion_drop" not in supported_methods(model) and "occlusion" in supported_methods(model)
    with pytest.raises(ValueError, match="reads the modules of vit_core's own ViTClassifier"):
        attribute(model, images, "occlusion_drop")
    with torch.no_grad():  # leave-one-patch-out through the transformers model itself
        full = model.hf(pixel_values=images).logits.log_softmax(-1)
        masked = images.clone()
        masked[:, :, 4:8, 8:12] = 0  # patch 6
        removed = model.hf(pixel_values=masked).logits.log_softmax(-1)
    torch.testing.assert_close(occlusion(model, images, target)[:, 1, 2],
                               (full - removed).gather(1, target[:, None])[:, 0], rtol=1e-4, atol=1e-6)
    maps = {"grad_rollout": explain(model, images, target=target).grad_rollout,
            "occlusion": occlusion(model, images, target)}
    figures = trust_figures(model, images, maps, target)
    torch.testing.assert_close(figures["occlusion"].spearman_occlusion, torch.ones(2, dtype=torch.float64))
    stages = _cascade(model)
    names = list(model.state_dict())
    assert [s for s, _ in stages] == ["head", "block 2", "block 1", "embedding"]
    assert sorted(n for n in names for _, p in stages if any(n == q or n.startswith(q + ".") for q in p)) == \
        sorted(names)
    fresh = _fresh_weights(model, seed=0)
    assert all(not torch.equal(fresh[n], t) for n, t in model.state_dict().items())
    results = cascading_randomization(model, images, ["grad_rollout"])
    assert [r["stage"] for r in results["grad_rollout"]] == ["head", "block 2", "block 1", "embedding"]


def save(model, folder, processor: dict | None = None):
    model.save_pretrained(folder)
    if processor is not None:
        ViTImageProcessor(**processor).save_pretrained(folder)
    return folder


def test_a_saved_folder_loads_with_its_labels_and_preprocessing(tmp_path):
    hf = make_hf("vit")
    folder = save(hf, tmp_path / "vit", dict(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4],
                                             resample=Image.Resampling.NEAREST, size={"height": 16, "width": 16}))
    model = load_model(folder)
    assert isinstance(model, HFViT) and not model.training
    assert model.class_names == [f"n{i}" for i in range(5)]
    assert (model.mean, model.std, model.interpolation) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "nearest")
    assert (model.image_size, model.patch_size, model.grid_size, model.depth, model.n_heads) == (16, 4, 4, 2, 2)
    images = images_for()
    with torch.no_grad():
        torch.testing.assert_close(model(images), hf(pixel_values=images).logits)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    by_hand = np.asarray(picture.resize((16, 16), Image.Resampling.NEAREST), dtype=np.float32) / 255
    expected = (by_hand - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.3, 0.4])
    np.testing.assert_allclose(preprocess(picture, model)[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    defaults = load_model(save(make_hf("deit"), tmp_path / "deit"))  # no processor settings: ViT's defaults
    assert (defaults.mean, defaults.std, defaults.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bilinear")


def test_folders_that_cannot_load_say_why_in_one_line(tmp_path):
    folder = save(make_hf("vit"), tmp_path / "vit")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="do not fit ViTForImageClassification") as wrong:
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only safetensors weights are read") as missing:
        load_model(folder)
    swin = tmp_path / "swin"
    SwinForImageClassification(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[1],
                                          window_size=2, num_labels=3)).save_pretrained(swin)
    with pytest.raises(CheckpointError, match="unsupported model SwinForImageClassification; supported: ") as swin_error:
        load_model(swin)
    for error in (wrong, missing, swin_error):
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unsupported model: SwinForImageClassification"):
        adapt(SwinForImageClassification.from_pretrained(swin))


def test_a_hub_snapshot_in_the_cache_loads_like_a_folder(tmp_path, monkeypatch):
    """A transformers repo id resolves through the Hub cache (here a local folder stands in for it)."""
    import vit_core.adapters as adapters

    folder = save(make_hf("deit_teacher"), tmp_path / "snapshot", dict(resample=Image.Resampling.BICUBIC))
    asked = []

    def cached(repo_id, filename):
        asked.append(filename)
        return str(folder / filename)

    monkeypatch.setattr(adapters, "hub_file", cached)
    model = load_model("someone/deit-tiny")
    assert isinstance(model, HFViT) and model.layout == TokenLayout(2, (0, 1)) and model.interpolation == "bicubic"
    assert asked == ["config.json", "model.safetensors", "preprocessor_config.json"]
