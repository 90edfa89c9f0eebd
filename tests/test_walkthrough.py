"""vit_core.walkthrough and vit_core.narration: every number of the Walkthrough against a slow
reference written here (the blocks run one by one by their own forward, heads zeroed in a copy of
the weights, the model run on the kept tokens or the filled image), on our tiny ViT and on tiny
random timm and transformers ViTs; the narration against the numbers it states."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch

from test_adapters import SMALL, make_timm
from test_adapters_hf import make_hf
from toys import tiny_vit
from vit_core import explain
from vit_core.adapters import adapt
from vit_core.anatomy import position_similarity
from vit_core.narration import (block_sentence, decision_sentence, heads_sentence, neighbour_similarity, percent,
                                whatif_sentence)
from vit_core.walkthrough import (token_pca, walkthrough, walkthrough_payload, what_if, what_if_curves)

CONTRACT_KEYS = {"version", "classes", "image_size", "patch_size", "grid", "layers", "heads", "patch_dim",
                 "embed_dim", "reads", "pixels", "token_pca", "position_similarity", "cls_attention", "lens",
                 "lens_note", "probs", "predicted", "knockout", "map", "whatif", "narration"}
STEPS = ["pixels", "tokens", "position", "cls", "heads", "decision", "whatif"]


def images_for(model, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(seed))


def own():
    return tiny_vit(sharpen=True)


def timm_model(variant: str = "vit_p4"):
    return adapt(make_timm(variant))


def hf_model(variant: str = "vit"):
    return adapt(make_hf(variant))


MODELS = {"own": own, "timm": timm_model, "timm_distilled": lambda: timm_model("deit_distilled"),
          "timm_avg": lambda: timm_model("no_cls_avg"), "hf": hf_model, "hf_teacher": lambda: hf_model("deit_teacher")}


# ------------------------------------------------------------------------------------------------
# Slow references: each model kind's blocks one by one, by their own forward

def reference_parts(model):
    """(embed, blocks, final norm, heads, read tokens) of any of the three kinds; read tokens None
    means the mean of the patch tokens."""
    if hasattr(model, "vit"):
        vit = model.vit
        heads = (vit.head, vit.head_dist) if hasattr(vit, "head_dist") else (vit.head,)
        embed = lambda x: vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # noqa: E731
        return embed, list(vit.blocks), lambda t: vit.fc_norm(vit.norm(t)), heads, model.layout.explained_tokens
    if hasattr(model, "hf"):
        base = model.hf.vit if hasattr(model.hf, "vit") else model.hf.deit
        heads = ((model.hf.cls_classifier, model.hf.distillation_classifier) if hasattr(model.hf, "cls_classifier")
                 else (model.hf.classifier,))
        return base.embeddings, [lambda x, layer=layer: layer(x) for layer in base.layers], base.layernorm, heads, \
            model.layout.explained_tokens
    return model.embed, list(model.blocks), model.norm, (model.head,), (0,)


def reference_lens(model, images):
    """CLS lens [B, L, C] and patch lens [B, L, T, C] by a loop over blocks, tokens and heads."""
    embed, blocks, norm, heads, read = reference_parts(model)
    prefix = model.n_prefix_tokens if hasattr(model, "n_prefix_tokens") else 1
    x = embed(images)
    cls, patch = [], []
    for block in blocks:
        x = block(x)
        if read is None:  # pooled: the norm comes after averaging (timm's fc_norm)
            cls.append(heads[0](norm(x[:, prefix:].mean(dim=1))))
        else:
            cls.append(sum(head(norm(x)[:, t]) for head, t in zip(heads, read)) / len(read))
        patch.append(torch.stack([sum(head(norm(x[:, prefix + t])) for head in heads) / len(heads)
                                  for t in range(x.shape[1] - prefix)], dim=1))
    return torch.stack(cls, 1).softmax(-1), torch.stack(patch, 1).softmax(-1)


def out_projection(model, layer):
    if hasattr(model, "vit"):
        return model.vit.blocks[layer].attn.proj
    if hasattr(model, "hf"):
        base = model.hf.vit if hasattr(model.hf, "vit") else model.hf.deit
        return base.layers[layer].attention.o_proj
    return model.blocks[layer].attn.out_proj


def knocked_out_reference(model, images, layer, head):
    """Probabilities with head `head` of block `layer` zeroed in a deep copy of the weights: the
    output projection's columns that read that head's slice set to zero (its bias stays)."""
    copied = copy.deepcopy(model)
    projection = out_projection(copied, layer)
    width = projection.in_features // model.n_heads
    with torch.no_grad():
        projection.weight[:, head * width:(head + 1) * width] = 0
        return copied(images).softmax(-1)


# ------------------------------------------------------------------------------------------------
# The logit lens, the knock-outs and the attention

@pytest.mark.parametrize("kind", MODELS)
def test_lens_after_the_last_block_is_the_models_own_prediction(kind):
    model = MODELS[kind]()
    images = images_for(model)
    w = walkthrough(model, images)
    with torch.no_grad():
        own_probs = model(images).softmax(-1)
    torch.testing.assert_close(w.cls_lens[:, -1], own_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.probs, own_probs, atol=1e-5, rtol=0)
    assert torch.equal(w.predicted, own_probs.argmax(-1))


@pytest.mark.parametrize("kind", MODELS)
def test_cls_and_patch_lens_equal_a_loop_over_the_blocks(kind):
    model = MODELS[kind]()
    images = images_for(model)
    w = walkthrough(model, images)
    with torch.no_grad():
        cls, patch = reference_lens(model, images)
    assert w.patch_lens.shape == (2, model.depth, model.grid_size ** 2, len(model.class_names))
    torch.testing.assert_close(w.cls_lens, cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.patch_lens, patch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["own", "timm", "timm_distilled", "hf_teacher"])
def test_each_knocked_out_head_equals_zeroing_it_in_a_copy_of_the_weights(kind):
    model = MODELS[kind]()
    images = images_for(model)
    w = walkthrough(model, images)
    assert w.head_knockout.shape == (2, model.depth, model.n_heads)
    for layer in range(model.depth):
        for head in range(model.n_heads):
            expected = knocked_out_reference(model, images, layer, head)
            torch.testing.assert_close(w.knockout_probs[:, layer, head], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(w.head_knockout[:, layer, head],
                                       expected.gather(1, w.predicted[:, None])[:, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(w.knockout(layer, head, image=1), expected[1], atol=1e-5, rtol=0)
    # the knock-outs are not all alike: the test would see a head mix-up
    assert w.head_knockout.std() > 1e-3


def test_a_batch_gives_each_image_what_it_gets_alone():
    model = own()
    images = images_for(model, n=3)
    together = walkthrough(model, images)
    for i in range(3):
        alone = walkthrough(model, images[i:i + 1])
        for name in ("probs", "cls_lens", "patch_lens", "knockout_probs", "cls_attention", "token_pca"):
            torch.testing.assert_close(getattr(together, name)[i], getattr(alone, name)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["own", "timm_distilled", "timm_avg", "hf"])
def test_cls_attention_is_the_explorers_read_row(kind):
    model = MODELS[kind]()
    images = images_for(model)
    w = walkthrough(model, images)
    attentions = explain(model, images, gradients=False).attentions  # [B, L, H, T, T]
    prefix, read = model.n_prefix_tokens if hasattr(model, "n_prefix_tokens") else 1, None
    layout = getattr(model, "layout", None)
    read = (0,) if layout is None else layout.explained_tokens
    rows = attentions[:, :, :, prefix:].mean(3) if read is None else attentions[:, :, :, list(read)].mean(3)
    torch.testing.assert_close(w.cls_attention, rows[..., prefix:], atol=1e-5, rtol=0)


def test_the_model_is_left_as_it_was():
    model = own().train()
    images = images_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    walkthrough(model, images)
    assert model.training
    assert all(not block.attn.out_proj._forward_pre_hooks for block in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# What the prediction reads; a model whose head cannot read inner tokens; 14 x 14 grids

@pytest.mark.parametrize("kind, reads, prefix", [
    ("own", "the CLS token", ("CLS",)),
    ("timm_distilled", "the mean of the CLS and distillation tokens", ("CLS", "distillation")),
    ("timm_avg", "the mean of the patch tokens", ()),
    ("hf_teacher", "the mean of the CLS and distillation tokens", ("CLS", "distillation")),
    ("hf", "the CLS token", ("CLS",)),
])
def test_reads_says_what_the_prediction_reads(kind, reads, prefix):
    model = MODELS[kind]()
    w = walkthrough(model, images_for(model))
    assert (w.reads, w.prefix_names) == (reads, prefix)
    payload = walkthrough_payload(model, images_for(model)[0])
    assert payload["reads"] == reads and reads in payload["narration"]["cls"]


def test_without_a_final_norm_the_lens_gives_way_to_one_sentence_and_the_rest_still_works():
    torch.manual_seed(0)
    model = adapt(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                    final_norm=False, **SMALL).eval())
    images = images_for(model)
    w = walkthrough(model, images)
    assert w.cls_lens is None and w.patch_lens is None
    assert w.lens_note.count(".") == 1 and "final norm" in w.lens_note
    torch.testing.assert_close(w.probs, model(images).softmax(-1).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.knockout_probs[:, 1, 0], knocked_out_reference(model, images, 1, 0),
                               atol=1e-5, rtol=0)
    payload = walkthrough_payload(model, images[0])
    assert payload["lens"] is None and payload["lens_note"] == w.lens_note
    assert "says" not in payload["narration"]["block1"] and "attends most" in payload["narration"]["block1"]


def test_a_14_by_14_grid():
    torch.manual_seed(0)
    model = adapt(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=2,
                                    **SMALL).eval())
    image = images_for(model, n=1)
    payload = walkthrough_payload(model, image[0])
    assert payload["grid"] == [14, 14] and len(payload["token_pca"]) == 196
    assert len(payload["lens"]["patch_top"][0]) == 196 and len(payload["whatif"]["relevant"]) == 197
    assert np.asarray(payload["cls_attention"]).shape == (2, 2, 196)
    assert np.asarray(payload["position_similarity"]).shape == (196, 196)
    np.testing.assert_allclose(payload["lens"]["cls"][-1], model(image).softmax(-1)[0].detach(), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# What if

def kept_tokens_reference(model, image, removed):
    """Our ViT run on the CLS token and the kept patch tokens alone, each with its position embedding."""
    tokens = model.embed(image)
    kept = [0] + [t + 1 for t in range(model.grid_size ** 2) if t not in set(removed)]
    x = tokens[:, kept]
    for block in model.blocks:
        x = block(x)
    return model.head(model.norm(x)[:, 0]).softmax(-1)[0]


def filled_reference(model, image, removed):
    """The model on the image with the removed patches set to the dataset mean (0 once normalised)."""
    filled, p, g = image.clone(), model.patch_size, model.grid_size
    for patch in removed:
        row, col = divmod(patch, g)
        filled[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p] = 0
    return model(filled).softmax(-1)[0]


@torch.no_grad()
def test_what_if_with_token_drop_is_the_model_on_the_kept_tokens_alone():
    model = own()
    image = images_for(model, n=1)
    for removed in ([], [5], [0, 9, 63, 30], list(range(1, 64))):
        torch.testing.assert_close(what_if(model, image, removed), kept_tokens_reference(model, image, removed),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(what_if(model, image[0], set()), model(image).softmax(-1)[0], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["timm_distilled", "hf"])
def test_what_if_with_mean_fill_is_the_model_on_the_filled_image(kind):
    model = MODELS[kind]()
    image = images_for(model, n=1)
    for removed in ([], [3], [0, 5, 15]):
        torch.testing.assert_close(what_if(model, image, removed), filled_reference(model, image, removed),
                                   atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["own", "timm"])
def test_curves_remove_the_first_k_of_each_order_and_k_0_is_the_unmodified_image(kind):
    model = MODELS[kind]()
    image = images_for(model, n=1)
    n = model.grid_size ** 2
    orders = torch.stack([torch.arange(n).flip(0), torch.randperm(n, generator=torch.Generator().manual_seed(3))])
    curves = what_if_curves(model, image, orders)
    assert curves.shape == (2, n + 1, len(model.class_names))
    torch.testing.assert_close(curves[:, 0], model(image).softmax(-1).expand(2, -1), atol=1e-5, rtol=0)
    reference = kept_tokens_reference if kind == "own" else filled_reference
    for m in range(2):
        for k in (1, 4, n):
            torch.testing.assert_close(curves[m, k], reference(model, image, orders[m, :k].tolist()), atol=1e-5, rtol=0)
    torch.testing.assert_close(what_if_curves(model, image, orders[1], ks=[2, 0]), curves[1, [2, 0]])


def test_what_if_refuses_bad_patches_and_k_with_the_allowed_range():
    model = own()
    image = images_for(model, n=1)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        what_if(model, image, [64])
    with pytest.raises(ValueError, match="repeats"):
        what_if(model, image, [3, 3])
    with pytest.raises(ValueError, match=r"k must be in \[0, 64\]"):
        what_if_curves(model, image, torch.arange(64), ks=[65])
    with pytest.raises(ValueError, match=r"k must be in \[0, 64\]"):
        what_if_curves(model, image, torch.arange(64), ks=[-1])
    with pytest.raises(ValueError, match="one image"):
        what_if(model, images_for(model, n=2), [1])


def test_a_head_or_block_that_does_not_exist_is_refused_with_the_range():
    w = walkthrough(own(), images_for(own(), n=1))
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 4\)"):
        w.knockout(0, 4)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        w.knockout(-1, 0)
    with pytest.raises(ValueError, match=r"image must be an integer in \[0, 1\)"):
        w.knockout(0, 0, image=1)


def test_bad_images_are_refused():
    model = own()
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        walkthrough(model, torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="adapt"):
        walkthrough(torch.nn.Linear(2, 2), torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------
# Tokens and positions

def test_token_pca_matches_numpy_and_scales_each_component_to_0_1():
    tokens = torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(0))
    tokens[:, :, 0] *= 10  # one dominant direction
    pca, share = token_pca(tokens)
    for b in range(2):
        centred = tokens[b].double().numpy() - tokens[b].double().numpy().mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        for c in range(3):
            projected = centred @ vt[c]
            expected = (projected - projected.min()) / (projected.max() - projected.min())
            mirrored = 1 - expected
            got = pca[b, :, c].numpy()
            assert min(np.abs(got - expected).max(), np.abs(got - mirrored).max()) < 1e-5
        np.testing.assert_allclose(share[b].numpy(), (s ** 2 / (s ** 2).sum())[:3], atol=1e-6)
    assert share[0, 0] > 0.8


def test_position_similarity_is_the_anatomys():
    model = own()
    w = walkthrough(model, images_for(model, n=1))
    np.testing.assert_allclose(w.position_similarity.numpy(), position_similarity(model), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The payload

def test_the_payload_holds_the_contracts_keys_and_agrees_with_the_numbers():
    model = own()
    image = images_for(model, n=1)
    relevance = torch.linspace(0, 1, 64).roll(17)
    payload = walkthrough_payload(model, image[0], relevance=relevance.numpy(), method="lrp", label="LRP")
    assert CONTRACT_KEYS <= set(payload)
    json.dumps(payload, allow_nan=False)
    w = walkthrough(model, image)
    assert payload["predicted"] == int(w.predicted[0]) and payload["grid"] == [8, 8]
    assert (payload["layers"], payload["heads"], payload["patch_dim"], payload["embed_dim"]) == (2, 4, 48, 32)
    np.testing.assert_allclose(payload["lens"]["cls"], w.cls_lens[0], atol=1e-4)
    assert payload["lens"]["patch_top"] == w.patch_lens[0].argmax(-1).tolist()
    np.testing.assert_allclose(payload["knockout"]["prob"], w.head_knockout[0], atol=1e-4)
    assert payload["map"]["method"] == "lrp" and max(payload["map"]["values"]) == 1.0
    assert payload["whatif"]["order"] == relevance.argsort(descending=True).tolist()
    assert payload["whatif"]["removal"] == "token drop"
    assert sorted(payload["whatif"]["random_order"]) == list(range(64))
    k = 5
    np.testing.assert_allclose(payload["whatif"]["relevant"][k],
                               what_if(model, image, payload["whatif"]["order"][:k]), atol=1e-4)
    np.testing.assert_allclose(payload["whatif"]["random"][k],
                               what_if(model, image, payload["whatif"]["random_order"][:k]), atol=1e-4)
    assert set(STEPS + ["block1", "block2"]) == set(payload["narration"])
    assert payload["pixels"].startswith("data:image/png;base64,")
    assert all(round(v, 4) == v for v in payload["probs"])


def test_the_payload_is_the_same_for_the_same_seed_and_its_random_order_moves_with_it():
    model = own()
    image = images_for(model, n=1)[0]
    a, b = walkthrough_payload(model, image), walkthrough_payload(model, image)
    c = walkthrough_payload(model, image, seed=1)
    assert a == b and a["whatif"]["random_order"] != c["whatif"]["random_order"]


def test_the_default_map_is_gradient_rollout_and_mean_fill_for_other_models():
    model = hf_model()
    image = images_for(model, n=1)
    payload = walkthrough_payload(model, image[0])
    rollout = explain(model, image).grad_rollout[0].flatten()
    expected = (rollout - rollout.min()) / (rollout.max() - rollout.min())
    assert payload["map"]["method"] == "grad_rollout"
    np.testing.assert_allclose(payload["map"]["values"], expected, atol=1e-4)
    assert payload["whatif"]["removal"] == "mean fill"


def test_a_relevance_of_the_wrong_size_is_refused():
    model = own()
    with pytest.raises(ValueError, match="one value per patch"):
        walkthrough_payload(model, images_for(model, n=1)[0], relevance=np.ones(10))


# ------------------------------------------------------------------------------------------------
# The narration, against the numbers it states

def test_whatif_sentence_states_this_images_numbers():
    model = own()
    payload = walkthrough_payload(model, images_for(model, n=1)[0])
    name, c = payload["classes"][payload["predicted"]], payload["predicted"]
    for k in (1, 6, 64):
        sentence = whatif_sentence(payload, k)
        assert percent(payload["whatif"]["relevant"][0][c]) in sentence
        assert percent(payload["whatif"]["relevant"][k][c]) in sentence and name in sentence
        assert f"{k} random patch" in sentence and percent(payload["whatif"]["random"][k][c]) in sentence
    assert payload["narration"]["whatif"] == whatif_sentence(payload, 6)
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        whatif_sentence(payload, 65)


def test_whatif_sentence_on_hand_made_numbers():
    numbers = {"classes": ["cat", "dog"], "predicted": 0,
               "whatif": {"relevant": [[0.92, 0.08], [0.5, 0.5], [0.18, 0.82]],
                          "random": [[0.92, 0.08], [0.9, 0.1], [0.88, 0.12]]}}
    assert whatif_sentence(numbers, 0) == "With no patch removed the model says cat at 92 %."
    assert whatif_sentence(numbers, 2) == ("Removing these 2 patches drops cat from 92 % to 18 %; "
                                           "2 random patches: 88 %. The prediction becomes dog (82 %).")
    assert whatif_sentence(numbers, 1).startswith("Removing this patch drops cat from 92 % to 50 %; 1 random patch: 90 %.")


def test_block_sentence_says_what_the_lens_says():
    classes = ["cat", "dog", "frog"]
    attention = [0.1, 0.6, 0.2, 0.1]
    early = block_sentence(3, "the CLS token", [0.2, 0.41, 0.39], 1, classes, attention, 2, 6)
    assert early.startswith("After block 3, the CLS token already says dog at 41 %.")
    assert "patch 1 (row 1, column 2): 60 %" in early
    other = block_sentence(2, "the CLS token", [0.5, 0.3, 0.2], 1, classes, attention, 2, 6)
    assert other.startswith("After block 2, the CLS token says cat (50 %); dog, the final answer, is at 30 %.")
    assert "says" not in block_sentence(2, "the CLS token", None, 1, classes, attention, 2, 6)


def test_heads_sentence_names_the_head_that_changes_the_prediction_most():
    knockout = [[0.90, 0.905], [0.20, 0.895]]
    tops = [[0, 0], [1, 0]]
    sentence = heads_sentence(knockout, 0.9, 0, tops, ["cat", "dog"])
    assert sentence == ("Knocking out head 1 of block 2 alone drops cat from 90 % to 20 %, and the prediction "
                        "becomes dog. 3 of 4 heads change it by less than 1 percentage point.")


def test_decision_sentence_and_neighbour_similarity():
    sentence = decision_sentence([0.1, 0.7, 0.2], ["a", "b", "c"], "LRP", [0.0, 0.2, 1.0, 0.3], 2,
                                 {"deletion_percentile": 95.0, "spearman_occlusion": 0.61})
    assert sentence.startswith("The model says b at 70 %; next comes c at 20 %.")
    assert "patch 2 (row 2, column 1)" in sentence and "95 %" in sentence and "0.61" in sentence
    grid = 4
    rows, cols = np.divmod(np.arange(16), grid)
    similarity = np.exp(-np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None]))
    near, far = neighbour_similarity(similarity, grid)
    assert near == pytest.approx(np.exp(-1)) and far < near


def test_bf16_scoring_stays_close_to_float32_and_leaves_the_model_in_float32():
    model = own()
    image = images_for(model, n=1)
    exact, fast = walkthrough(model, image), walkthrough(model, image, bf16=True)
    assert not torch.equal(exact.knockout_probs, fast.knockout_probs)  # it did run in bf16
    torch.testing.assert_close(fast.knockout_probs, exact.knockout_probs, atol=0.03, rtol=0)
    torch.testing.assert_close(fast.cls_lens, exact.cls_lens)  # the forward pass stays float32
    order = torch.arange(64)
    # bfloat16 keeps 8 bits of mantissa: a few hundredths on this sharpened toy, a wrong row is far off
    torch.testing.assert_close(what_if_curves(model, image, order, bf16=True), what_if_curves(model, image, order),
                               atol=0.06, rtol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_explain_command_writes_the_walkthrough_numbers(tmp_path):
    from PIL import Image

    from vit_core import preprocess
    from vit_core.cli.explain import main

    model = tiny_vit(image_size=16, sharpen=True)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "plane.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    assert main([str(path), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--walkthrough"]) == 0
    saved = np.load(tmp_path / "out" / "plane_walkthrough.npz")
    with Image.open(path) as image:
        batch = preprocess(image.convert("RGB"), model)
    w = walkthrough(model, batch)
    np.testing.assert_allclose(saved["cls_lens"], w.cls_lens[0], atol=1e-6)
    np.testing.assert_allclose(saved["head_knockout"], w.head_knockout[0], atol=1e-6)
    grad_rollout = np.load(tmp_path / "out" / "plane.npz")["grad_rollout"].flatten()
    assert saved["whatif_order"].tolist() == torch.as_tensor(grad_rollout).argsort(descending=True, stable=True).tolist()
    np.testing.assert_allclose(saved["whatif_relevant"][3], what_if(model, batch, saved["whatif_order"][:3]),
                               atol=1e-4)
    assert str(saved["reads"]) == "the CLS token" and str(saved["removal"]) == "token drop"


def test_trust_figures_go_into_the_decision_and_a_nan_becomes_null():
    model = own()
    payload = walkthrough_payload(model, images_for(model, n=1)[0],
                                  trust={"deletion_percentile": np.float64(87.5), "spearman_occlusion": float("nan")})
    json.dumps(payload, allow_nan=False)
    assert payload["trust"] == {"deletion_percentile": 87.5, "spearman_occlusion": None}
    assert "88 % of random maps" in payload["narration"]["decision"]
    assert "Spearman" not in payload["narration"]["decision"]


def test_block_narration_states_the_payloads_own_numbers():
    model = own()
    payload = walkthrough_payload(model, images_for(model, n=1)[0])
    first = np.asarray(payload["lens"]["cls"][0])
    top = int(first.argmax())
    assert f"{payload['classes'][top]} at {percent(first[top])}" in payload["narration"]["block1"] or \
        f"{payload['classes'][top]} ({percent(first[top])})" in payload["narration"]["block1"]
    attention = np.asarray(payload["cls_attention"][1]).mean(axis=0)
    assert f"patch {int(attention.argmax())} " in payload["narration"]["block2"]
    assert percent(attention.max()) in payload["narration"]["block2"]


def test_coarse_what_if_rows_are_the_same_numbers_at_fewer_ks():
    from vit_core.walkthrough import coarse_ks

    model = own()
    image = images_for(model, n=1)[0]
    ks = coarse_ks(64, 8)
    assert ks == [0, 6, 8, 16, 24, 32, 40, 48, 56, 64]
    full, coarse = walkthrough_payload(model, image), walkthrough_payload(model, image, whatif_ks=ks)
    assert full["whatif"]["ks"] == list(range(65)) and coarse["whatif"]["ks"] == ks
    np.testing.assert_allclose(coarse["whatif"]["relevant"], [full["whatif"]["relevant"][k] for k in ks], atol=1e-4)
    np.testing.assert_allclose(coarse["whatif"]["random"], [full["whatif"]["random"][k] for k in ks], atol=1e-4)
    assert coarse["narration"]["whatif"] == whatif_sentence(full, 6)
    with pytest.raises(ValueError, match=r"one of \[0, 6, 8"):
        whatif_sentence(coarse, 5)


def test_position_sentence_compares_neighbours_with_distant_patches():
    from vit_core.narration import position_sentence

    grid = 4
    rows, cols = np.divmod(np.arange(16), grid)
    near_alike = np.exp(-np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None]))
    assert "more alike than" in position_sentence(near_alike, grid) and "0.37 vs" in position_sentence(near_alike, grid)
    assert "less alike than" in position_sentence(1 - near_alike, grid)
    assert "about as alike as" in position_sentence(np.full((16, 16), 0.5), grid)
    assert position_sentence(np.ones((1, 1)), 1) == "A position embedding is added to each token."
