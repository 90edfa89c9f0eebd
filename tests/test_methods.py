"""The registry of explanation methods (vit_core.methods) and the Explanation as a value with its
cache held apart (vit_core.explanation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vit_core.explanation import HELD_METHODS, MapCache, explain
from vit_core.methods import (ANY_VIT, METHOD, METHOD_NAMES, METHODS, OWN_VIT, PICKER, RULE_VITS, Batch,
                              batch_method,
                              check_methods, check_supported, method_maps, supported_methods)


def test_the_registry_names_each_method_once_and_orders_the_picker_by_its_numbers():
    assert len(set(METHOD_NAMES)) == len(METHODS) and len({m.label for m in METHODS}) == len(METHODS)
    ranks = [METHOD[name].picker for name in PICKER]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert set(PICKER) == {m.name for m in METHODS if m.picker is not None}
    assert HELD_METHODS == tuple(n for n in METHOD_NAMES if n in HELD_METHODS) and len(HELD_METHODS) == 3


def test_check_methods_names_every_unknown_one_and_the_allowed_values():
    assert check_methods("rollout") == ["rollout"]
    with pytest.raises(ValueError, match="unknown methods 'a', 'b'; choose from rollout, grad_rollout"):
        check_methods(["rollout", "a", "b"])
    with pytest.raises(ValueError, match="unknown attribution method 'a';"):
        check_methods("a", what="attribution method")


def test_check_supported_groups_the_refused_by_what_they_need():
    stranger = torch.nn.Linear(2, 2)  # no layout, not ours, no rule walker: only ANY_VIT's test lets it through
    own = [m.name for m in METHODS if m.models is OWN_VIT]
    ruled = [m.name for m in METHODS if m.models is RULE_VITS]
    assert own and len(ruled) >= 2
    assert set(supported_methods(stranger)) == set(METHOD_NAMES) - set(own) - set(ruled)
    check_supported(stranger, ["rollout"])
    with pytest.raises(ValueError, match=f"{own[0]} need vit_core's own ViTClassifier; {ruled[0]}, {ruled[1]} need "
                                         f"a ViT with gradient rules: .*; for Linear choose from rollout"):
        check_supported(stranger, ["rollout", own[0], ruled[0], ruled[1]])


def test_a_method_from_a_function_of_model_images_and_target_gets_the_batch_and_its_progress(tiny_model,
                                                                                               tiny_images):
    seen = []

    def scores(model, images, target, scale=1.0, progress=None):
        seen.append((model, images.shape, target.tolist(), scale, progress))
        return torch.full((len(images), 4, 4), scale)

    report = print
    batch = Batch(tiny_model, tiny_images, 2, progress=report)
    assert torch.equal(batch_method(scores, scale=3.0)(batch), torch.full((3, 4, 4), 3.0))
    assert seen == [(tiny_model, (3, 3, 16, 16), [2, 2, 2], 3.0, report)]
    silent = batch_method(lambda model, images, target: images[:, 0, :4, :4])
    assert silent(batch).shape == (3, 4, 4)  # no progress parameter: none passed


def test_the_fast_maps_of_one_batch_share_one_backward_pass(tiny_model, tiny_images, monkeypatch):
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    maps = method_maps(tiny_model, tiny_images, ["grad_rollout", "attention_x_gradient", "input_x_gradient"], 4)
    assert calls == [1] and all(m.shape == (3, 4, 4) for m in maps.values())
    with pytest.raises(ValueError, match="no method given"):
        method_maps(tiny_model, tiny_images, [])


def test_an_explanation_is_a_value_and_its_cache_is_the_callers(tiny_model, tiny_images):
    base = explain(tiny_model, tiny_images)
    before = {name: value.clone() for name, value in base.maps().items()}
    cache = MapCache()
    with_lrp = base.with_maps(tiny_model, tiny_images, ["lrp_composite"], cache)
    other = base.retarget(tiny_model, tiny_images, 5, cache).with_settings("max", 0.5)
    assert list(base.maps()) == list(before) and all(torch.equal(base.maps()[n], v) for n, v in before.items())
    assert "lrp_composite" in with_lrp.maps() and "lrp_composite" not in other.maps()
    assert set(cache.maps(base.target)) == {"grad_rollout", "lrp_composite"}
    assert set(cache.maps(torch.full((3,), 5))) == {"grad_rollout"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.target = torch.zeros(3)
    # Without a cache nothing is kept, and the result is the same.
    alone = base.with_maps(tiny_model, tiny_images, ["lrp_composite"])
    torch.testing.assert_close(alone.maps()["lrp_composite"], with_lrp.maps()["lrp_composite"])


def test_with_maps_refuses_a_method_the_model_cannot_use_before_computing_anything(tiny_model, tiny_images,
                                                                                    monkeypatch):
    explanation = explain(tiny_model, tiny_images)
    refusing = dataclasses.replace(ANY_VIT, accepts=lambda model: False, needs="a model it was written for")
    computed = []
    monkeypatch.setitem(METHOD, "input_x_gradient", dataclasses.replace(
        METHOD["input_x_gradient"], compute=lambda batch: computed.append(1)))
    monkeypatch.setitem(METHOD, "lrp_composite", dataclasses.replace(METHOD["lrp_composite"], models=refusing))
    with pytest.raises(ValueError, match="lrp_composite need a model it was written for; for ViTClassifier"):
        explanation.with_maps(tiny_model, tiny_images, ["input_x_gradient", "lrp_composite"])
    assert computed == []
