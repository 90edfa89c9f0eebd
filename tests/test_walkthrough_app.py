"""The Walkthrough tab's server side (demo/walkthrough.py): its handlers as plain functions, then
/walkthrough, /whatif, /knockout and Export through gradio_client, on the tiny ViT of toys.tiny_vit
and a small timm ViT. The drawing itself is tested in a browser (test_walkthrough_browser.py)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo.app as app
import demo.walkthrough as wt_module
from demo.handlers import Explorer
from demo.session import analyze, current_explanation, is_own, model_inputs, read_upload
from demo.walkthrough import Walkthrough, first_payload, knockout_answer, removed_patches
from toys import tiny_vit, upload
from vit_core.walkthrough import walkthrough_payload, what_if

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
CAT, DOG = EXAMPLES / "cat_0000.jpg", EXAMPLES / "dog_0000.jpg"
STEP_IDS = ("pixels", "tokens", "position", "cls", "heads", "decision", "whatif")
TOL = 2e-4  # the payload's floats are rounded to 4 decimals


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    tiny_vit(sharpen=True).save_pretrained(folder)
    return app.load_checkpoint(folder)


@pytest.fixture(scope="module")
def walk(model) -> Walkthrough:
    return Walkthrough(Explorer(model, sorted(EXAMPLES.glob("*.jpg"))))


def probabilities(model, path: Path) -> np.ndarray:
    """The model's own output for the file, read and resized as the app does."""
    with torch.no_grad():
        return model(model_inputs(model, read_upload(path)[0])[1]).softmax(-1)[0].numpy()


def check_payload(payload: dict, model, path: Path) -> None:
    """Keys and shapes against the model; the prediction and the last block's lens against its output."""
    grid, layers, heads = model.grid_size, model.depth, model.n_heads
    n_patches, n_classes = grid * grid, len(model.class_names)
    assert payload["grid"] == [grid, grid] and payload["layers"] == layers and payload["heads"] == heads
    assert payload["classes"] == list(model.class_names) and payload["patch_dim"] == 3 * model.patch_size ** 2
    assert np.shape(payload["cls_attention"]) == (layers, heads, n_patches)
    assert np.shape(payload["token_pca"]) == (n_patches, 3)
    # The raw view the page draws at once is the PNG's pixels.
    png = Image.open(io.BytesIO(base64.b64decode(payload["pixels"].split(",", 1)[1]))).convert("RGB")
    raw = np.frombuffer(base64.b64decode(payload["rgb"]), dtype=np.uint8)
    assert np.abs(raw.reshape(png.height, png.width, 3).astype(int) - np.asarray(png)).max() <= 1
    assert np.shape(payload["knockout"]["prob"]) == np.shape(payload["knockout"]["top"]) == (layers, heads)
    ks = payload["whatif"]["ks"]  # every k for our ViT, a few evenly spaced ones for another model
    assert ks == (list(range(n_patches + 1)) if is_own(model) else wt_module.whatif_ks(model))
    assert np.shape(payload["whatif"]["relevant"]) == np.shape(payload["whatif"]["random"]) == (len(ks), n_classes)
    assert sorted(payload["whatif"]["order"]) == list(range(n_patches))
    assert payload["k"] == wt_module.default_k(n_patches) and payload["k"] in ks
    assert len(payload["whatif_sentences"]) == len(ks) and f"these {ks[3]} patches" in payload["whatif_sentences"][3]
    assert set(payload["narration"]) == {*STEP_IDS, *(f"block{i + 1}" for i in range(layers))}
    assert all(payload["narration"].values())
    expected = probabilities(model, path)
    np.testing.assert_allclose(payload["probs"], expected, atol=TOL)
    assert payload["predicted"] == int(expected.argmax())
    np.testing.assert_allclose(payload["whatif"]["relevant"][0], expected, atol=TOL)  # k = 0: untouched
    if payload["lens"] is not None:
        assert np.shape(payload["lens"]["cls"]) == (layers, n_classes)
        assert np.shape(payload["lens"]["patch_top"]) == (layers, n_patches)
        np.testing.assert_allclose(payload["lens"]["cls"][-1], expected, atol=TOL)


# ------------------------------------------------------------------------------------------------
# The handlers

def session_for(walk: Walkthrough, path: Path = CAT):
    return walk.endpoint({"path": str(path), "orig_name": path.name})["session"]


def analyzed(model, path: Path = CAT):
    return analyze(model, read_upload(path)[0], name=path.stem, gradients=False)


def test_the_page_gets_every_step_then_the_what_if_curves_computed_once_per_image(walk, model, monkeypatch):
    answers = list(walk.explaining(walk.explorer.explain_steps)({"path": str(CAT), "orig_name": CAT.name}))
    # The Explorer's first panels, then the walkthrough's steps, then the Explorer's other panels.
    assert len(answers) == 3 and list(answers[1]) == ["walkthrough"] and "overlay" in answers[2]
    session = answers[0]["session"]
    full = walk.show(session)["walkthrough"]
    assert not full["whatif_pending"] and full["key"] == answers[1]["walkthrough"]["key"]
    first = first_payload(walk.explorer, session, model)  # what the page gets before the what-if curves
    assert first["whatif_pending"] and first["whatif"]["ks"] == [0, first["k"]]
    check_payload(full, model, CAT)
    # The completed curves are the library's own, in the same orders.
    method = walk.explorer.defaults.method
    relevance = current_explanation(model, session, walk.explorer.defaults).maps()[method][0]
    reference = walkthrough_payload(model, session.inputs, relevance=relevance)
    assert full["whatif"] == reference["whatif"] and full["map"]["method"] == method
    completed = ("whatif", "whatif_pending", "whatif_sentences", "key", "narration")
    assert {k: v for k, v in full.items() if k not in completed} == {k: v for k, v in first.items() if k not in completed}
    assert {**full["narration"], "whatif": ""} == {**first["narration"], "whatif": ""}
    assert full["narration"]["whatif"] == full["whatif_sentences"][full["k"]]  # the float32 rows' sentence
    calls = []
    monkeypatch.setattr(wt_module, "walkthrough_payload", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(wt_module, "what_if_curves", lambda *a, **k: calls.append(1))
    assert walk.show(session)["walkthrough"] is full and calls == []  # cached on the session
    monkeypatch.undo()
    other = session_for(walk, DOG)  # a new image gets its own numbers, never the cached ones
    assert walk.show(other)["walkthrough"]["key"] != full["key"]
    assert walk.show(None) == {"walkthrough": None}


def test_whatif_removes_the_k_most_relevant_then_toggles_the_listed_patches(walk, model):
    session = session_for(walk)
    payload = walk.payload(session)
    order = payload["whatif"]["order"]
    assert removed_patches(payload, 3, "") == sorted(order[:3])
    assert removed_patches(payload, 3, f"{order[0]}, {order[5]}") == sorted([order[1], order[2], order[5]])
    answer = walk.whatif(session, 3, "")["whatif_json"]
    np.testing.assert_allclose(answer["probs"], payload["whatif"]["relevant"][3], atol=TOL)
    by_hand = walk.whatif(session, 0, f"{order[5]} {order[7]}")["whatif_json"]
    np.testing.assert_allclose(by_hand["probs"], what_if(model, session.inputs, [order[5], order[7]]), atol=TOL)
    assert by_hand["removed"] == sorted([order[5], order[7]]) and "2 removed by hand" in by_hand["caption"]


@pytest.mark.parametrize("k, patches, message", [
    (65, "", "k must be in 0..64"), (-1, "", "k must be in 0..64"), (2.5, "", "whole number"),
    (0, "64", "no patch 64"), (0, "3, x", "whole number")])
def test_whatif_refuses_what_does_not_exist(walk, k, patches, message):
    session = session_for(walk)
    with pytest.raises(Exception, match=message):
        walk.whatif(session, k, patches)


def test_knockout_reads_the_payload_and_refuses_heads_that_do_not_exist(walk, model):
    payload = walk.payload(session_for(walk))
    answer = knockout_answer(payload, 2, 3)
    assert answer["predicted_prob"] == payload["knockout"]["prob"][1][2]
    assert answer["top"] == payload["classes"][payload["knockout"]["top"][1][2]]
    assert "head 3 of block 2" in answer["sentence"]
    for layer, head, message in [(0, 1, "no block 0"), (model.depth + 1, 1, f"no block {model.depth + 1}"),
                                 (1, model.n_heads + 1, f"no head {model.n_heads + 1}")]:
        with pytest.raises(Exception, match=message):
            knockout_answer(payload, layer, head)


def test_clicks_for_another_image_change_nothing(walk):
    session = session_for(walk)
    key = walk.payload(session)["key"]

    class Event:
        def __init__(self, **data):
            self._data = data

    assert walk.manual(Event(key="stale", k=2, toggled=[1]), session) == {}
    assert walk.manual(Event(key=key, k=2, toggled=[1]), None) == {}
    manual = walk.manual(Event(key=key, k=2, toggled=[1]), session)["walkthrough"]["manual"]
    assert manual["key"] == key and manual["k"] == 2 and manual["toggled"] == [1]


def test_the_decision_trust_comes_from_the_explorers_per_image_trust(walk):
    session = session_for(walk)
    trust = walk.trust(session)["walkthrough"]["trust"]
    method = walk.payload(session)["map"]["method"]
    assert trust["key"] == walk.payload(session)["key"]
    assert any(key[1] == method for key in session.trust)  # the Explorer's cache now holds it
    assert "of random maps on this image" in trust["sentence"] and 0 <= trust["figures"]["deletion_percentile"] <= 100
    assert walk.trust(None) == {}


def test_the_walkthrough_flag_lands_on_the_tab(model):
    assert app.parse_args(["--walkthrough"]).walkthrough and not app.parse_args([]).walkthrough
    demo = app.build_demo(model, walkthrough=True)
    html = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "walkthrough")
    assert html.props["land"] is True and "trigger('whatif'" in html.js_on_load


# ------------------------------------------------------------------------------------------------
# Through gradio_client (`server` and `client` come from conftest.py)

def test_the_endpoints_and_their_parameters(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in endpoints["/walkthrough"]["parameters"]] == ["image"]
    assert [p["parameter_name"] for p in endpoints["/whatif"]["parameters"]] == ["k", "patches"]
    assert [p["parameter_name"] for p in endpoints["/knockout"]["parameters"]] == ["layer", "head"]


def test_walkthrough_endpoint_then_whatif_and_knockout_in_the_same_session(client, model):
    payload = client.predict(upload(DOG), api_name="/walkthrough")
    check_payload(payload, model, DOG)
    answer = client.predict(k=4, patches="", api_name="/whatif")
    np.testing.assert_allclose(answer["probs"], payload["whatif"]["relevant"][4], atol=TOL)
    knocked = client.predict(layer=1, head=2, api_name="/knockout")
    assert knocked["predicted_prob"] == payload["knockout"]["prob"][0][1]
    with pytest.raises(Exception, match="no head 9"):
        client.predict(layer=1, head=9, api_name="/knockout")
    with pytest.raises(Exception, match="k must be in 0..64"):
        client.predict(k=100, patches="", api_name="/whatif")


def test_before_any_image_the_endpoints_say_so(server, tmp_path_factory):
    from toys import local_client

    fresh = local_client(server, tmp_path_factory)
    for name, kwargs in [("/whatif", {"k": 1, "patches": ""}), ("/knockout", {"layer": 1, "head": 1})]:
        with pytest.raises(Exception, match="Upload an image or pick an example first"):
            fresh.predict(**kwargs, api_name=name)


def test_export_adds_the_walkthrough_numbers_and_its_logit_lens(client, model):
    client.predict(upload(CAT), api_name="/explain")
    paths = [Path(f) for f in client.predict(api_name="/export")]
    numbers = next(p for p in paths if p.name.endswith("_walkthrough.json"))
    check_payload(json.loads(numbers.read_text()), model, CAT)
    lens = next(p for p in paths if p.name.endswith("_walkthrough_lens.png"))
    assert min(Image.open(lens).size) > 100


# ------------------------------------------------------------------------------------------------
# Another library's ViT

def test_a_timm_vit_gets_every_step(tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5).eval(), tmp_path, safe_serialization=True)
    timm_model = app.load_model(tmp_path)
    walk = Walkthrough(Explorer(timm_model))
    session = session_for(walk)
    payload = walk.payload(session)
    check_payload(payload, timm_model, CAT)
    assert payload["grid"] == [14, 14] and payload["whatif"]["removal"] == "mean fill"
    assert payload["map"]["method"] == walk.explorer.defaults.method
    k = payload["whatif"]["ks"][3]
    np.testing.assert_allclose(walk.whatif(session, k, "")["whatif_json"]["probs"],
                               payload["whatif"]["relevant"][3], atol=TOL)


def test_what_if_curves_under_way_finish_before_the_process_exits(tmp_path):
    """The curves computed after the first answer run on workers the interpreter waits for: a
    process that ends meanwhile lets them finish rather than killing them mid-pass (a daemon thread
    was, and torch's teardown beneath a running pass aborted the exit)."""
    done = tmp_path / "done"
    script = f"""
import time
from demo.walkthrough import Walkthrough

def complete(session):
    time.sleep(1.0)
    open({str(done)!r}, "w").write(session)

walk = Walkthrough.__new__(Walkthrough)  # the scheduling alone: no model, no Explorer
walk.payload, walk.complete = (lambda session: {{}}), complete
list(walk.explaining(lambda: iter([{{"session": "cat"}}]))())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert done.read_text() == "cat"
