"""Brief changes to a shared model act on the calling thread's passes only (`vit_core.scope`): the
Walkthrough's head knock-outs and the timm attention capture, while another thread uses the same
model. The threads are interleaved by hand (events), so each test runs the same way every time."""

from __future__ import annotations

import threading

import torch

from test_adapters import images_for, make_timm
from test_adapters_hf import make_hf
from toys import tiny_vit
from vit_core.adapters import adapt, capture_attention, eager_attention
from vit_core.scope import forward_override, pre_hook
from vit_core.walkthrough import zeroed_heads


def started(run):
    """`run()` started in another thread; returns what waits for it and gives its result (or
    raises the error it raised)."""
    result = {}

    def target():
        try:
            result["value"] = run()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            result["error"] = error
    thread = threading.Thread(target=target)
    thread.start()

    def finished():
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]
    return finished


def in_thread(run):
    """`run()` in another thread, its result returned."""
    return started(run)()


@torch.no_grad()
def test_a_knocked_out_head_leaves_another_threads_pass_through_the_same_model_alone():
    model = tiny_vit(sharpen=True).eval()
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    plain = model(images)
    projection = model.blocks[0].attn.out_proj
    with zeroed_heads(projection, torch.zeros(1, 1, projection.in_features)):
        knocked = model(images)
        other = in_thread(lambda: model(images))
    assert (knocked - plain).abs().max() > 1e-3  # the knock-out acts here
    # and not there (to rounding: grad mode is per thread, so the other pass may take the other attention path)
    torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-5)
    assert not projection._forward_pre_hooks


def test_a_pre_hook_made_in_another_thread_does_not_act_here():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = layer(x)
    entered, leave = threading.Event(), threading.Event()

    def hooked():
        with pre_hook(layer, lambda module, args: (args[0] * 0,)):
            entered.set()
            leave.wait()
            return layer(x)
    hooked_result = started(hooked)
    entered.wait()
    here = layer(x)  # while the other thread's hook is on the layer
    leave.set()
    torch.testing.assert_close(hooked_result(), layer.bias.expand(2, 3))
    torch.testing.assert_close(here, plain, rtol=0, atol=0)


@torch.no_grad()
def test_attention_is_captured_from_this_threads_passes_only():
    model = adapt(make_timm("vit_p4"))
    images = images_for(model)
    plain = model(images)
    with capture_attention(model.vit) as store:
        other = in_thread(lambda: model.vit(images))  # a plain pass elsewhere meanwhile
        assert store == []
        captured = model.vit(images)
    assert len(store) == model.depth
    torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert all("forward" not in block.attn.__dict__ for block in model.vit.blocks)


@torch.no_grad()
def test_two_overlapping_captures_each_keep_their_own_attention():
    """The first capture to end must not take the other's away (nor the other's replace it)."""
    model = adapt(make_timm("vit_p4"))
    images = images_for(model)
    entered, go = threading.Event(), threading.Event()

    def capture_later():
        with capture_attention(model.vit) as store:
            entered.set()
            go.wait()
            model.vit(images)
        return store
    theirs = started(capture_later)
    entered.wait()
    with capture_attention(model.vit) as mine:
        model.vit(images)
    go.set()  # the other capture runs its pass after this one has ended
    their_store = theirs()
    assert len(mine) == model.depth and len(their_store) == model.depth
    for a, b in zip(mine, their_store):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all("forward" not in block.attn.__dict__ for block in model.vit.blocks)


def test_a_forward_override_ends_with_the_module_as_it_came_even_after_an_error():
    layer = torch.nn.Linear(2, 2)
    try:
        with forward_override(layer, lambda x: x * 0):
            assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
            raise KeyError("boom")
    except KeyError:
        pass
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(layer(torch.ones(1, 2)), layer.weight.sum(1)[None] + layer.bias)


def test_a_transformers_model_stays_eager_until_the_last_thread_that_needs_it_is_done():
    """This thread switches first and ends first; the other must keep eager attention meanwhile,
    and the model's own kernel must come back at the end."""
    model = make_hf("vit")
    before = model.config._attn_implementation
    assert before != "eager"
    entered, ended = threading.Event(), threading.Event()

    def eager_meanwhile():
        with eager_attention(model):
            entered.set()
            ended.wait()
            return model.config._attn_implementation  # after this thread's block has ended
    with eager_attention(model):
        seen = started(eager_meanwhile)
        entered.wait()
    ended.set()
    assert seen() == "eager"
    assert model.config._attn_implementation == before
