"""Per-image trust figures: percentiles among random maps and agreement with occlusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vit_core import attribution as at
from vit_core import faithfulness as fa
from vit_core.methods import attribute
from vit_core.trust import TrustContext, TrustFigures, trust_figures

from toys import tiny_vit


class AdditiveModel(nn.Module):
    """Class 0's logit is a weighted sum of the 16 patch means (class 1's is 0), so removing
    patches in decreasing order of weight x patch mean is the best possible deletion order and
    adding them in that order the best insertion order."""

    image_size, patch_size, grid_size, class_names = 16, 4, 4, ["yes", "no"]

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights
        self.rows = 0  # inputs seen, to check what a TrustContext evaluates once

    def contributions(self, images: torch.Tensor) -> torch.Tensor:
        means = images.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(1, 4, 5))  # [B, 4, 4]
        return means * self.weights.view(4, 4)

    def forward(self, images):
        self.rows += len(images)
        logit = self.contributions(images).sum(dim=(1, 2))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


@pytest.fixture
def additive():
    # Weights grow with the patch index, so row-major order (what a constant map gives) deletes
    # the least important patches first: the worst order there is.
    return AdditiveModel(torch.linspace(0.05, 0.8, 16))


@pytest.fixture
def positive_images():
    return 1.0 + torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_the_optimal_order_scores_at_the_top_and_a_constant_map_does_not(additive, positive_images):
    optimum = additive.contributions(positive_images)
    maps = {"optimum": optimum, "constant": torch.zeros_like(optimum), "reversed": -optimum,
            "random": fa.random_maps(2, 4, seed=123)}
    figures = trust_figures(additive, positive_images, maps, target=0, steps=8, n_random=20)
    best = figures["optimum"]
    assert best.deletion_percentile.tolist() == [100.0, 100.0]
    assert best.insertion_percentile.tolist() == [100.0, 100.0]
    torch.testing.assert_close(best.spearman_occlusion, torch.ones(2, dtype=best.spearman_occlusion.dtype))
    for name in ("constant", "reversed"):
        assert (figures[name].deletion_percentile < 10).all(), name
        assert (figures[name].insertion_percentile < 10).all(), name
    assert figures["reversed"].spearman_occlusion.max() < -0.99
    assert torch.isnan(figures["constant"].spearman_occlusion).all()
    assert (figures["random"].deletion_percentile < 100).all()
    assert (best.deletion_auc < figures["random"].deletion_auc).all()


def test_auc_figures_are_the_faithfulness_curves(additive, positive_images):
    optimum = additive.contributions(positive_images)
    figures = trust_figures(additive, positive_images, {"m": optimum}, target=0, steps=4, n_random=3)
    for mode in ("deletion", "insertion"):
        curve = fa.perturbation_curve(additive, positive_images, optimum, 0, mode=mode, steps=4)
        torch.testing.assert_close(getattr(figures["m"], f"{mode}_auc"), fa.auc(curve))


def test_percentiles_count_random_maps_by_hand(additive, positive_images):
    optimum = additive.contributions(positive_images)
    maps = {"m": fa.random_maps(2, 4, seed=9)}
    figures = trust_figures(additive, positive_images, maps, target=0, steps=8, n_random=5, seed=4)
    randoms = fa.random_maps(5, 4, seed=4)
    for b in range(2):
        image = positive_images[b:b + 1].expand(5, -1, -1, -1)
        random_auc = fa.auc(fa.perturbation_curve(additive, image, randoms, 0, mode="deletion", steps=8))
        own = figures["m"].deletion_auc[b]
        expected = 100 * ((random_auc > own).double().sum() + 0.5 * (random_auc == own).double().sum()) / 5
        assert math.isclose(figures["m"].deletion_percentile[b].item(), expected.item())
    assert optimum.shape == (2, 4, 4)


def test_tiny_vit_figures_batch_equals_singles_and_seed_is_fixed():
    model = tiny_vit(image_size=16, sharpen=True)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2, 5, 8])
    maps = {name: attribute(model, images, name, target) for name in ("input_x_gradient", "lrp_composite")}
    loo = at.occlusion(model, images, target)
    batched = trust_figures(model, images, maps, target, occlusion_map=loo)
    again = trust_figures(model, images, maps, target)  # computes the occlusion map itself
    for name, entry in batched.items():
        assert isinstance(entry, TrustFigures)
        for field in entry.__dataclass_fields__:
            torch.testing.assert_close(getattr(entry, field), getattr(again[name], field))
        assert ((entry.deletion_percentile >= 0) & (entry.deletion_percentile <= 100)).all()
        assert (entry.spearman_occlusion.abs() <= 1).all()
    for b in range(3):
        single = trust_figures(model, images[b:b + 1], {n: m[b:b + 1] for n, m in maps.items()}, target[b],
                               occlusion_map=loo[b:b + 1])
        for name, entry in single.items():
            row = batched[name].for_image(b)
            for field, value in entry.for_image(0).items():
                assert math.isclose(value, row[field], rel_tol=1e-5, abs_tol=1e-6), (name, field)


def test_bf16_figures_stay_close():
    model = tiny_vit(image_size=16, sharpen=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    maps = {"ixg": at.input_x_gradient(model, images, 0)}
    exact = trust_figures(model, images, maps, 0, n_random=5)["ixg"]
    fast = trust_figures(model, images, maps, 0, n_random=5, bf16=True)["ixg"]
    torch.testing.assert_close(fast.deletion_auc, exact.deletion_auc, atol=0.02, rtol=0)
    torch.testing.assert_close(fast.spearman_occlusion, exact.spearman_occlusion)


def test_the_bf16_copy_is_reused_until_the_weights_change():
    model = tiny_vit(image_size=16, sharpen=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    first = TrustContext(model, images, 0, bf16=True)._scorer
    assert TrustContext(model, images, 0, bf16=True)._scorer is first
    assert first.head.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    with torch.no_grad():
        model.head.weight.mul_(2)
    changed = TrustContext(model, images, 0, bf16=True)._scorer
    assert changed is not first
    torch.testing.assert_close(changed.head.weight, model.head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("maps, kwargs, message", [
    ({}, {}, "at least one map"),
    ({"a": torch.zeros(2, 4, 4), "b": torch.zeros(2, 2, 2)}, {}, r"\[B, g, g\]"),
    ({"a": torch.zeros(3, 4, 4)}, {}, r"B = 2 images"),
    ({"a": torch.zeros(2, 4, 4)}, {"n_random": 0}, "n_random"),
    ({"a": torch.zeros(2, 4, 4)}, {"occlusion_map": torch.zeros(2, 16)}, "occlusion_map"),
    ({"a": torch.zeros(2, 4, 4)}, {"steps": 99}, "steps"),
])
def test_bad_arguments_are_clear_errors(additive, positive_images, maps, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trust_figures(additive, positive_images, maps, 0, **kwargs)


def test_bad_target_is_a_clear_error(additive, positive_images):
    with pytest.raises(ValueError, match=r"class index in \[0, 2\)"):
        trust_figures(additive, positive_images, {"a": torch.zeros(2, 4, 4)}, 2)


def test_a_context_does_the_shared_work_once(additive, positive_images):
    batch, steps, n_random = 2, 8, 6
    optimum = additive.contributions(positive_images)
    context = TrustContext(additive, positive_images, 0, steps=steps, n_random=n_random, seed=1)
    first = context.curve_figures({"optimum": optimum})
    # One map's inner columns, the random maps' deletion columns (insertion reverses them) and the
    # untouched and all-mean images: nothing else, and no occlusion until a Spearman is asked for.
    assert additive.rows == batch * (2 * (steps - 1) + n_random * (steps - 1) + 2)
    additive.rows = 0
    second = context.curve_figures({"reversed": -optimum, "constant": torch.zeros_like(optimum)})
    assert additive.rows == batch * 2 * 2 * (steps - 1)
    additive.rows = 0
    context.spearman({"optimum": optimum})
    context.spearman({"reversed": -optimum})
    assert additive.rows == batch * (16 + 1)  # leave-one-patch-out, once
    together = trust_figures(additive, positive_images, {"optimum": optimum, "reversed": -optimum,
                                                          "constant": torch.zeros_like(optimum)},
                             0, steps=steps, n_random=n_random, seed=1)
    for name, figures in {**first, **second}.items():
        for field, value in figures.items():
            torch.testing.assert_close(value, getattr(together[name], field), msg=f"{name} {field}")


@pytest.mark.parametrize("steps", [8, 5])  # 8 divides the 16 patches (one pass serves both modes), 5 does not
def test_random_insertion_uses_the_reversed_random_orders(additive, positive_images, steps):
    context = TrustContext(additive, positive_images, 0, steps=steps, n_random=4, seed=7)
    areas = context.random_areas()
    randoms = fa.random_maps(4, 4, seed=7)
    reversed_order = fa.ranks(randoms).float().view(4, 4, 4)  # the last-ranked patch comes first
    for b in range(2):
        image = positive_images[b:b + 1].expand(4, -1, -1, -1)
        for mode, maps in (("deletion", randoms), ("insertion", reversed_order)):
            expected = fa.auc(fa.perturbation_curve(additive, image, maps, 0, mode=mode, steps=steps))
            torch.testing.assert_close(areas[mode][b], expected, msg=f"{mode} image {b}")


def test_drop_removal_figures_are_the_drop_curves():
    model = tiny_vit(image_size=16, sharpen=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 6])
    maps = {name: attribute(model, images, name, target) for name in ("attnlrp", "attention_x_gradient")}
    figures = trust_figures(model, images, maps, target, steps=4, n_random=5, removal="drop")
    loo = at.occlusion(model, images, target, mode="drop")
    for name, entry in figures.items():
        for mode in ("deletion", "insertion"):
            curve = fa.perturbation_curve(model, images, maps[name], target, mode=mode, steps=4, removal="drop")
            torch.testing.assert_close(getattr(entry, f"{mode}_auc"), fa.auc(curve))
        expected = [fa.spearman(maps[name][b], loo[b]) for b in range(2)]
        assert entry.spearman_occlusion.tolist() == pytest.approx(expected)
    mean_fill = trust_figures(model, images, maps, target, steps=4, n_random=5)
    assert not torch.allclose(mean_fill["attnlrp"].deletion_auc, figures["attnlrp"].deletion_auc)


def test_bad_removal_is_a_clear_error(additive, positive_images):
    with pytest.raises(ValueError, match=r"choose one of \('mean', 'drop'\)"):
        TrustContext(additive, positive_images, 0, removal="blur")
    with pytest.raises(ValueError, match="needs a ViTClassifier"):
        TrustContext(additive, positive_images, 0, removal="drop")
