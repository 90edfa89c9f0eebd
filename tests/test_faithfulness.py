"""Deletion/insertion curves, AUC, Spearman and the model-randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vit_core import ViTClassifier
from vit_core import faithfulness as fa


class OnePatchModel(nn.Module):
    """Looks only at patch `index` of a 4x4 grid of 4-pixel patches: logit 0 = 4 * its mean."""

    class_names = ["seen", "other", "third"]

    def __init__(self, index: int, grid: int = 4, patch: int = 4):
        super().__init__()
        self.row, self.col, self.patch = index // grid, index % grid, patch
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        p = self.patch
        seen = x[:, :, self.row * p:(self.row + 1) * p, self.col * p:(self.col + 1) * p].mean(dim=(1, 2, 3))
        zeros = torch.zeros_like(seen)
        return torch.stack([4 * seen, zeros, zeros], dim=1)


@pytest.fixture
def positive_images() -> torch.Tensor:
    return 1.0 + torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def one_hot_map(batch: int, index: int) -> torch.Tensor:
    maps = torch.rand(batch, 16, generator=torch.Generator().manual_seed(index)) * 0.5
    maps[:, index] = 1.0
    return maps.view(batch, 4, 4)


def test_deletion_and_insertion_hand_values(positive_images):
    model = OnePatchModel(index=6)
    full = torch.softmax(model(positive_images), -1)[:, 0]
    third = torch.full_like(full, 1 / 3)                  # the patch at the mean (0): logits all 0
    first = fa.perturbation_curve(model, positive_images, one_hot_map(2, 6), 0, mode="deletion")
    assert first.shape == (2, 17)
    torch.testing.assert_close(first[:, 0], full)
    torch.testing.assert_close(first[:, 1:], third[:, None].expand(2, 16))
    last = torch.zeros(2, 4, 4)
    last.view(2, 16)[:, 6] = -1.0                          # patch 6 ranked last, others tied: row-major
    deleted_last = fa.perturbation_curve(model, positive_images, last, 0, mode="deletion")
    torch.testing.assert_close(deleted_last[:, :16], full[:, None].expand(2, 16))
    torch.testing.assert_close(deleted_last[:, 16], third)
    inserted = fa.perturbation_curve(model, positive_images, one_hot_map(2, 6), 0, mode="insertion")
    torch.testing.assert_close(inserted[:, 0], third)
    torch.testing.assert_close(inserted[:, 1:], full[:, None].expand(2, 16))
    # AUCs: deletion = (full + 1/3) / 2 / 16 + 15/16 * 1/3; insertion mirrors it.
    expected = (full + third) / 2 / 16 + third * 15 / 16
    torch.testing.assert_close(fa.auc(first), expected)


def test_map_that_ranks_the_seen_patch_first_wins(positive_images):
    model = OnePatchModel(index=9)
    deletion = [fa.auc(fa.perturbation_curve(model, positive_images, one_hot_map(2, i), 0)).mean() for i in range(16)]
    insertion = [fa.auc(fa.perturbation_curve(model, positive_images, one_hot_map(2, i), 0, mode="insertion")).mean()
                 for i in range(16)]
    assert int(np.argmin(deletion)) == 9 and int(np.argmax(insertion)) == 9
    scores = fa.deletion_insertion(model, positive_images,
                                   {"good": one_hot_map(2, 9), "random": fa.random_maps(2, 4, seed=3)}, 0)
    assert set(scores["good"]) == {"deletion", "insertion", "deletion_auc", "insertion_auc"}
    assert (scores["good"]["deletion_auc"] <= scores["random"]["deletion_auc"]).all()
    assert (scores["good"]["insertion_auc"] >= scores["random"]["insertion_auc"]).all()


def test_steps_chunks_and_endpoints(tiny_model, tiny_images):
    maps = fa.random_maps(3, 4, seed=1)
    target = torch.tensor([0, 3, 9])
    full = fa.perturbation_curve(tiny_model, tiny_images, maps, target, batch_size=5)
    same = fa.perturbation_curve(tiny_model, tiny_images, maps, target, batch_size=1000)
    torch.testing.assert_close(full, same)
    coarse = fa.perturbation_curve(tiny_model, tiny_images, maps, target, steps=4)
    assert coarse.shape == (3, 5)
    torch.testing.assert_close(coarse, full[:, ::4])     # 4 patches per step
    with torch.no_grad():
        probs = torch.softmax(tiny_model(tiny_images), -1)[torch.arange(3), target]
        blank = torch.softmax(tiny_model(torch.zeros_like(tiny_images)), -1)[torch.arange(3), target]
    torch.testing.assert_close(full[:, 0], probs)
    torch.testing.assert_close(full[:, -1], blank)
    inserted = fa.perturbation_curve(tiny_model, tiny_images, maps, target, mode="insertion", steps=2)
    torch.testing.assert_close(inserted[:, 0], blank)
    torch.testing.assert_close(inserted[:, -1], probs)


def test_model_mode_restored(tiny_model, tiny_images):
    tiny_model.train()
    fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(3, 4), 0, steps=2)
    assert tiny_model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="erase"), "mode"), (dict(steps=0), "steps"), (dict(steps=17), "steps"),
    (dict(batch_size=0), "batch_size"),
])
def test_perturbation_bad_arguments(tiny_model, tiny_images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(3, 4), 0, **kwargs)


def test_perturbation_shape_errors(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="maps"):
        fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(2, 4), 0)
    with pytest.raises(ValueError, match="tile"):
        fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(3, 3), 0)
    with pytest.raises(ValueError, match="target"):
        fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(3, 4), torch.tensor([1, 2]))


def test_auc_hand_values():
    torch.testing.assert_close(fa.auc(torch.ones(5)), torch.tensor(1.0))
    torch.testing.assert_close(fa.auc(torch.linspace(0, 1, 11)), torch.tensor(0.5))
    torch.testing.assert_close(fa.auc(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])), torch.tensor([0.25, 0.25]))
    with pytest.raises(ValueError):
        fa.auc(torch.ones(1))


def test_random_maps_seeded():
    a, b, c = fa.random_maps(4, 8, seed=0), fa.random_maps(4, 8, seed=0), fa.random_maps(4, 8, seed=1)
    assert a.shape == (4, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_spearman_hand_values():
    assert fa.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert fa.spearman(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # Ties share their mean rank: ranks [0, 1.5, 1.5, 3] vs [0, 1, 2, 3] -> 4.5 / sqrt(4.5 * 5).
    assert fa.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(fa.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        fa.spearman([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------- sanity

def test_randomization_sanity_cascade(tiny_model, tiny_images):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    stages = fa.randomization_sanity(tiny_model, tiny_images, method="rollout", seed=0)
    assert [s["stage"] for s in stages] == ["head", "block 2", "block 1", "embedding"]
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Plain rollout never looks at the classifier head: re-initialising it changes nothing.
    assert stages[0]["spearman"] == pytest.approx(1.0)
    assert stages[-1]["spearman"] < 0.9
    assert all(-1.0 <= s["spearman"] <= 1.0 for s in stages)
    again = fa.randomization_sanity(tiny_model, tiny_images, method="rollout", seed=0)
    assert [s["spearman"] for s in again] == [s["spearman"] for s in stages]


def test_randomization_sanity_gradient_depends_on_head(tiny_model, tiny_images):
    stages = fa.randomization_sanity(tiny_model, tiny_images, method="grad_rollout", target=2)
    assert stages[0]["stage"] == "head" and stages[0]["spearman"] < 0.99
    with pytest.raises(ValueError, match="method"):
        fa.randomization_sanity(tiny_model, tiny_images, method="saliency")


def test_randomisation_draws_from_the_models_own_initialisation(tiny_model, tiny_images):
    rng_before = torch.random.get_rng_state()
    fresh = fa._fresh_weights(tiny_model, seed=5)
    fa.randomization_sanity(tiny_model, tiny_images, method="rollout", seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is not consumed
    expected = ViTClassifier(**tiny_model._hub_mixin_config)
    torch.manual_seed(5)
    expected.reset_parameters()
    for name, value in expected.state_dict().items():
        assert torch.equal(fresh[name], value), name
    assert not torch.equal(fresh["head.weight"], tiny_model.state_dict()["head.weight"])


# ---------------------------------------------------------------------------------------------- token drop

def test_drop_removal_leaves_tokens_out(tiny_model, tiny_images):
    from vit_core.attribution import occlusion

    target = torch.tensor([1, 4, 7])
    first = 5
    deletion = fa.perturbation_curve(tiny_model, tiny_images, one_hot_map(3, first), target, removal="drop")
    # After one step the curve is leave-one-patch-out with the token dropped: log p drops by the occlusion value.
    dropped = occlusion(tiny_model, tiny_images, target, mode="drop")[:, first // 4, first % 4]
    torch.testing.assert_close(deletion[:, 1].log(), deletion[:, 0].log() - dropped, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        tokens = tiny_model.embed(tiny_images)[:, :1]        # CLS alone: every patch token dropped
        for block in tiny_model.blocks:
            tokens = block(tokens)
        cls_only = tiny_model.forward_head(tiny_model.norm(tokens)).softmax(-1)
        full = tiny_model(tiny_images).softmax(-1)
    torch.testing.assert_close(deletion[:, -1], cls_only[torch.arange(3), target])
    torch.testing.assert_close(deletion[:, 0], full[torch.arange(3), target])
    insertion = fa.perturbation_curve(tiny_model, tiny_images, one_hot_map(3, first), target, mode="insertion",
                                      steps=4, removal="drop", batch_size=1)
    torch.testing.assert_close(insertion[:, 0], deletion[:, -1])
    torch.testing.assert_close(insertion[:, -1], deletion[:, 0])
    # One row at a time or every length packed into one pass: the same numbers.
    together = fa.perturbation_curve(tiny_model, tiny_images, one_hot_map(3, first), target, mode="insertion",
                                     steps=4, removal="drop", batch_size=1000)
    torch.testing.assert_close(insertion, together)
    # Mean fill and token drop are different inputs, so different curves.
    assert not torch.allclose(deletion, fa.perturbation_curve(tiny_model, tiny_images, one_hot_map(3, first), target))


def test_token_passes_hold_a_budget_of_tokens_shortest_first():
    passes = fa._token_passes(torch.tensor([5, 3, 9, 3, 1]), budget=8)
    # Sorted: rows 4, 1, 3 (1 + 3 + 3 tokens), then 0 (5), then 2 alone (9 > 8: a pass of its own).
    assert [p.tolist() for p in passes] == [[4, 1, 3], [0], [2]]
    assert [p.tolist() for p in fa._token_passes(torch.tensor([2, 2]), budget=100)] == [[0, 1]]


def test_removal_is_checked(tiny_model, tiny_images, positive_images):
    with pytest.raises(ValueError, match=r"unknown removal 'blur'; choose one of \('mean', 'drop'\)"):
        fa.perturbation_curve(tiny_model, tiny_images, fa.random_maps(3, 4), 0, removal="blur")
    with pytest.raises(ValueError, match="needs a ViTClassifier"):
        fa.perturbation_curve(OnePatchModel(index=3), positive_images, one_hot_map(2, 3), 0, removal="drop")


def test_ranks_and_counts():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert fa.ranks(maps).tolist() == [[3, 0, 1, 2]]        # the tie keeps row-major order
    assert fa.moved_counts(64, 8).tolist() == list(range(0, 65, 8))
    assert fa.moved_counts(16, 5).tolist() == [0, 3, 6, 9, 12, 16]


# ---------------------------------------------------------------------------------------------- every method

def test_method_maps_are_the_library_maps(tiny_model, tiny_images):
    from vit_core import explain
    from vit_core.methods import METHOD_NAMES, attribute

    target = torch.tensor([3, 0, 9])
    maps = fa.method_maps(tiny_model, tiny_images, METHOD_NAMES, target)
    assert list(maps) == list(METHOD_NAMES)
    explained = explain(tiny_model, tiny_images, target=target)
    for name, value in maps.items():
        assert value.shape == (3, 4, 4), name
        if name in explained.maps():  # the maps explain gives
            expected = getattr(explained, name)
        else:
            expected = attribute(tiny_model, tiny_images, name, target)
        torch.testing.assert_close(value, expected, msg=name)
    predicted = fa.method_maps(tiny_model, tiny_images, ["input_x_gradient"])  # default: the predicted class
    torch.testing.assert_close(predicted["input_x_gradient"], attribute(tiny_model, tiny_images, "input_x_gradient"))
    with pytest.raises(ValueError, match="saliency.*choose from rollout, grad_rollout, last_layer, occlusion"):
        fa.method_maps(tiny_model, tiny_images, ["rollout", "saliency"])


def test_cascading_randomization_covers_attribution_methods(tiny_model, tiny_images):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cascade = fa.cascading_randomization(tiny_model, tiny_images, ["rollout", "input_x_gradient"], seed=3)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert list(cascade) == ["rollout", "input_x_gradient"]
    assert cascade["rollout"] == fa.randomization_sanity(tiny_model, tiny_images, method="rollout", seed=3)
    stages = cascade["input_x_gradient"]
    assert [s["stage"] for s in stages] == ["head", "block 2", "block 1", "embedding"]
    assert stages[0]["spearman"] < 0.99          # the gradient goes through the head
    assert all(-1.0 <= s["spearman"] <= 1.0 for s in stages)


def test_spearman_rows():
    a = torch.arange(8.0).view(2, 2, 2)
    rows = fa.spearman_rows(a, torch.stack([a[0], -a[1]]))
    assert rows.dtype == torch.float64 and rows.tolist() == [1.0, -1.0]
    assert fa.spearman(a.bfloat16(), a) == pytest.approx(1.0)  # maps computed under bf16 autocast
