"""Serving under load (demo/serving.py and the app's launch): panel files written once per content
and kept within a byte budget and an age, Gradio's other cache files swept the same way, the
numeric /explain_arrays answer, large photos, and a fast error for a Hub checkpoint offline."""

from __future__ import annotations

import inspect
import os
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo.app as app
from demo.handlers import Explorer
from demo.serving import CacheKeeper, PanelFiles, answering, panel_files
from toys import free_port, tiny_vit, upload
from vit_core import preprocess
from vit_core.checkpoints import hub_constants
from vit_core.explanation import MapCache, explain

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "demo" / "examples" / "cat_0000.jpg"
DOG = ROOT / "demo" / "examples" / "dog_0000.jpg"


def noise(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ------------------------------------------------------------------------------------------------
# Panel files

def test_a_picture_is_written_once_and_served_under_one_name(tmp_path):
    files = PanelFiles(tmp_path)
    first, again = files(noise(0)), files(noise(0))
    other = files(noise(1))
    assert first == again != other and files.written == 2
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(noise(0)))
    assert files.bytes == folder_bytes(tmp_path)
    # The same pixels in another mode or shape are another picture.
    assert files(noise(0).convert("L")) != first
    assert files(Image.frombytes("RGB", (48, 64), noise(0).tobytes())) != first


def test_the_budget_removes_the_least_recently_used_first(tmp_path):
    one_file = PanelFiles(tmp_path / "probe")(noise(0))
    budget = 3 * os.path.getsize(one_file) + 100
    files = PanelFiles(tmp_path / "panels", max_bytes=budget, min_age=0.0)
    paths = [files(noise(seed)) for seed in range(3)]
    files(noise(0))                                     # used again: now the most recent
    for seed in range(3, 5):                            # two more: the two least recently used go
        paths.append(files(noise(seed)))
    kept = {str(p) for p in (tmp_path / "panels").iterdir()}
    assert files.bytes == folder_bytes(tmp_path / "panels") <= budget
    assert paths[0] in kept and paths[1] not in kept and paths[2] not in kept and paths[-1] in kept


def test_recent_files_survive_any_budget_and_old_ones_go_by_age(tmp_path):
    files = PanelFiles(tmp_path, max_bytes=1, min_age=60.0, max_age=600.0)
    paths = [files(noise(seed)) for seed in range(4)]
    assert all(os.path.exists(p) for p in paths)       # handed out just now: a client may fetch them
    assert files.prune(time.time() + 30) == 0
    assert files.prune(time.time() + 61) == 4 and files.bytes == 0 and not list(tmp_path.iterdir())
    roomy = PanelFiles(tmp_path, min_age=0.0, max_age=100.0)
    kept = roomy(noise(7))
    assert roomy.prune(time.time() + 50) == 0 and roomy.prune(time.time() + 101) == 1
    assert not os.path.exists(kept)


def test_a_file_removed_behind_its_back_is_written_again(tmp_path):
    files = PanelFiles(tmp_path)
    path = files(noise(3))
    os.remove(path)                                    # as Gradio's own sweep may
    assert files(noise(3)) == path and os.path.exists(path) and files.written == 2
    assert files.bytes == folder_bytes(tmp_path)


def test_concurrent_requests_for_one_picture_never_see_half_a_file(tmp_path):
    files = PanelFiles(tmp_path)
    picture, answers, errors = noise(5, (300, 300)), [], []

    def ask():
        try:
            path = files(picture)
            answers.append(np.array_equal(np.asarray(Image.open(path)), np.asarray(picture)))
        except Exception as error:  # noqa: BLE001 - any failure is the test's answer
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and answers == [True] * 8
    assert [p.name for p in tmp_path.iterdir()] == [Path(files(picture)).name]  # no staging files left


# ------------------------------------------------------------------------------------------------
# Gradio's other files

def fake_blocks(cache: Path, kept: set[str]) -> types.SimpleNamespace:
    """What CacheKeeper reads of a Blocks: its tracked file sets, its components, its cache root."""
    uploads, outputs = set(), set()
    component = types.SimpleNamespace(keep_in_cache=kept)
    return types.SimpleNamespace(temp_file_sets=[uploads, outputs], blocks={1: component}, GRADIO_CACHE=str(cache))


def cached_file(cache: Path, name: str, size: int) -> str:
    folder = cache / name.replace(".", "_")  # Gradio keeps each file in a folder of its own
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(os.urandom(size))
    return str(path)


def test_a_handler_answering_in_steps_stays_a_generator_of_gradio_answers(tmp_path):
    files = PanelFiles(tmp_path / "panels")
    ui = {"picture": "picture component", "text": "text component"}

    def steps(name: str):
        yield {"picture": Image.new("RGB", (4, 4), (9, 9, 9))}
        yield {"picture": Image.new("RGB", (4, 4), (9, 9, 9)), "text": name}

    wrapped = answering(steps, ui, files)
    assert inspect.isgeneratorfunction(wrapped) and inspect.signature(wrapped) == inspect.signature(steps)
    first, last = list(wrapped("cat"))
    assert list(first) == ["picture component"] and Path(first["picture component"]).is_file()
    assert last == {"picture component": first["picture component"], "text component": "cat"}  # written once
    assert files.written == 1


def test_the_keeper_removes_old_files_then_the_oldest_over_budget(tmp_path):
    example = cached_file(tmp_path, "example.jpg", 5000)
    blocks = fake_blocks(tmp_path, kept={example})
    uploads, outputs = blocks.temp_file_sets
    first = cached_file(tmp_path, "first.png", 4000)
    time.sleep(0.05)
    second, third = cached_file(tmp_path, "second.png", 4000), cached_file(tmp_path, "third.png", 4000)
    uploads.update({first, second, example})
    outputs.update({third, str(tmp_path / "gone" / "gone.png")})
    keeper = CacheKeeper(blocks, max_bytes=9000, max_age=600.0, min_age=0.0)
    assert keeper.sweep() == 1                          # 12 kB over a 9 kB budget: the oldest goes
    assert not os.path.exists(first) and not (tmp_path / "first_png").exists()  # its folder too
    assert uploads == {second, example} and outputs == {third}  # the missing one is forgotten
    assert os.path.exists(example) and keeper.bytes == 8000
    assert keeper.sweep(now=time.time() + 601) == 2    # too old: they go, the example stays
    assert uploads == {example} and outputs == set() and os.path.exists(example)


def test_the_keeper_spares_files_handed_out_recently(tmp_path):
    blocks = fake_blocks(tmp_path, kept=set())
    blocks.temp_file_sets[0].add(cached_file(tmp_path, "new.png", 4000))
    assert CacheKeeper(blocks, max_bytes=10, min_age=30.0).sweep() == 0


# ------------------------------------------------------------------------------------------------
# The launched app

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    tiny_vit(sharpen=True).save_pretrained(folder)
    return app.load_checkpoint(folder)


# `server` and `client` come from conftest.py.


def test_explain_arrays_answers_the_numbers_behind_the_panels(client, model):
    arrays = client.predict(upload(CAT), method="rollout", layer=1, head="head 2", api_name="/explain_arrays")
    grid, tokens = model.grid_size, model.grid_size**2 + 1
    assert sum(arrays["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert arrays["predicted"] == max(arrays["probabilities"], key=arrays["probabilities"].get)
    assert arrays["predicted"] == client.predict(upload(CAT), api_name="/predict")["label"]
    assert np.asarray(arrays["map"]).shape == (grid, grid)
    assert np.asarray(arrays["layer_maps"]).shape == (model.depth, grid, grid)
    attention = np.asarray(arrays["attention"])
    assert attention.shape == (tokens, tokens) and np.allclose(attention.sum(axis=1), 1.0, atol=1e-4)
    assert (arrays["method"], arrays["layer"], arrays["head"]) == ("rollout", 1, "head 2")
    # The session now holds the image: /redraw draws it, as after /explain.
    assert "true label:** cat" in client.predict(api_name="/redraw")[-1]


def test_the_same_picture_is_served_as_the_same_file(client):
    first = client.predict(upload(DOG), api_name="/explain")
    again = client.predict(upload(DOG), api_name="/explain")
    names = [Path(p).name for p in first[:4]]
    assert names == [Path(p).name for p in again[:4]] and len(set(names)) == 4


def test_the_cache_stays_within_its_budget_under_distinct_uploads(client, server, tmp_path):
    files = panel_files()
    saved = files.max_bytes, files.min_age
    files.max_bytes, files.min_age = 200_000, 0.0
    try:
        for seed in range(8):
            path = tmp_path / f"noise{seed}.png"
            noise(seed, (40, 40)).save(path)
            client.predict(upload(path), api_name="/explain")
        assert files.bytes == folder_bytes(files.dir) <= 200_000 + 150_000  # the budget + one answer
        CacheKeeper(server, files, max_bytes=0, min_age=0.0).sweep()
    finally:
        files.max_bytes, files.min_age = saved
    tracked = set().union(*server.temp_file_sets)
    kept = set().union(*(getattr(b, "keep_in_cache", ()) for b in server.blocks.values()))
    assert all(os.path.exists(p) for p in tracked)     # deleted files are forgotten, not listed for ever
    assert all(p in kept or p in files for p in tracked)  # over budget, every upload went
    assert not any(f"noise{seed}" in p for p in tracked for seed in range(8))


def test_a_48_megapixel_phone_photo_is_explained_in_under_a_second(model, tmp_path):
    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (8000, 6000), (30, 120, 200)).save(photo, quality=80)
    explorer = Explorer(model)
    started = time.perf_counter()
    answer = explorer.explain({"path": str(photo), "orig_name": photo.name})
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert "resized from 8000×6000" in answer["summary"]


# ------------------------------------------------------------------------------------------------
# No backward pass until a gradient map is shown

def count_backward_passes(monkeypatch) -> list:
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_an_explanation_without_gradients_computes_them_once_when_asked(model, monkeypatch):
    inputs = preprocess(Image.open(CAT), model)
    eager = explain(model, inputs)
    backward = count_backward_passes(monkeypatch)
    lazy = explain(model, inputs, gradients=False)
    assert backward == [] and lazy.grad_rollout is None and "grad_rollout" not in lazy.maps()
    for name in ("probs", "target", "attentions", "rollout", "layer_maps", "last_layer"):
        torch.testing.assert_close(getattr(lazy, name), getattr(eager, name))
    assert "grad_rollout" not in lazy.as_numpy() and "attentions" in lazy.as_numpy()
    derived, cache = lazy.with_settings("max", 0.5), MapCache()
    derived = derived.with_maps(model, inputs, ["grad_rollout"], cache)
    torch.testing.assert_close(derived.maps()["grad_rollout"], eager.grad_rollout)
    assert backward == [1]
    assert torch.equal(lazy.with_maps(model, inputs, ["grad_rollout"], cache).maps()["grad_rollout"],
                       derived.maps()["grad_rollout"]) and backward == [1]  # shared, not recomputed


def test_an_upload_runs_no_backward_pass_until_a_gradient_map_is_shown(model, monkeypatch):
    explorer = Explorer(model)
    backward = count_backward_passes(monkeypatch)
    answer = explorer.explain({"path": str(DOG), "orig_name": DOG.name}, method="rollout")
    assert backward == []
    for method in ("last_layer", "rollout"):
        explorer.redraw(answer["session"], method=method)
    assert backward == []
    shown = explorer.redraw(answer["session"], method="grad_rollout")
    assert backward == [1] and "explaining:**" in shown["summary"]
    explorer.redraw(answer["session"], method="grad_rollout", opacity=0.2)
    assert backward == [1]


def test_an_upload_shown_with_gradient_rollout_runs_one_forward_and_one_backward_pass(model, monkeypatch):
    explorer = Explorer(model)
    backward = count_backward_passes(monkeypatch)
    forward, calls = model.forward, []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    answer = explorer.explain({"path": str(DOG), "orig_name": DOG.name}, method="grad_rollout")
    assert (len(calls), backward) == (1, [1]) and "explaining:**" in answer["summary"]
    monkeypatch.undo()
    inputs = answer["session"].inputs
    torch.testing.assert_close(answer["session"].explanation.grad_rollout, explain(model, inputs).grad_rollout)


# ------------------------------------------------------------------------------------------------
# A Hub checkpoint without a network

@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no route"])
def test_a_hub_checkpoint_offline_fails_within_seconds(how, monkeypatch, capsys):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a Hub whose name never resolves (.invalid is reserved for that): the probe fails
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "ENDPOINT", "https://hub.invalid")
    started = time.perf_counter()
    assert app.main(["--checkpoint", "someone/not-cached-vit", "--port", str(free_port())]) == 2
    elapsed = time.perf_counter() - started
    error = capsys.readouterr().err
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert "Offline? Pass a local checkpoint directory" in error
    assert ("HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "cannot be reached") in error
