"""The app (demo/): settings, panels and handlers as plain functions, then the launched app
through gradio_client, whose endpoints must keep the names, parameters and return order README
documents.

The tiny ViT of toys.tiny_vit, saved with save_pretrained, keeps this fast; the shipped checkpoint
is checked where it matters (offline loading, size, /predict agreeing with the model)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import demo.app as app
import demo.session as session_module
import vit_core.rollout as rollout
from demo.evidence import TRUST_BF16, Evidence, image_trust
from demo.handlers import Explorer, export_files, faithfulness, sanity_check
from demo.panels import (DISPLAY_SIDE, GAP, MATRIX_THUMB, MODEL_FIGURES, PANELS, REDRAWN, SCALE, STRIP_SIDE,
                         clicked_patch, draw, view)
from demo.session import (DEFAULT_METHOD, FAST_METHODS, PICKER_LABELS, Settings, analyze, current_explanation,
                          label_probs, read_upload)
from toys import (BAD_FILES, free_port, image_bytes, local_client, noise, tiny_vit, upload, write_animated_gif,
                  write_rotated_jpeg)
import vit_core
from vit_core import ViTClassifier, preprocess, to_model_pixels, viz
from vit_core.checkpoints import host_reachable
from vit_core.faithfulness import RESULTS_FILE
from vit_core.explanation import explain

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
CAT = EXAMPLES / "cat_0000.jpg"
DOG = EXAMPLES / "dog_0000.jpg"
SHIPPED = ROOT / "checkpoints" / "vit-cifar10"
# What README's "Scripting with gradio_client" promises, in order (the session state is not sent).
SETTING_PARAMETERS = ["method", "target", "head_fusion", "discard_ratio", "opacity", "layer", "head"]
EXPLAIN_RETURNS = ["model_view", "patch_grid", "overlay", "token_attention", "top5", "matrices", "matrix",
                   "layer_strip", "summary", "patch"]
REDRAW_RETURNS = ["patch_grid", "overlay", "token_attention", "matrices", "matrix", "layer_strip", "summary"]


# ------------------------------------------------------------------------------------------------
# Fixtures and file makers

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-vit")
    tiny_vit(sharpen=True).save_pretrained(folder)  # sharpened, so maps and top-5 differ
    return folder


@pytest.fixture(scope="module")
def model(checkpoint) -> ViTClassifier:
    return app.load_checkpoint(checkpoint)


def analyzed(model, path=CAT) -> session_module.Session:
    image, notes = read_upload(path)
    return analyze(model, image, name=path.stem, notes=notes)


@pytest.fixture(scope="module")
def session(model) -> session_module.Session:
    return analyzed(model)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("bad")
    files = {}
    for name, (make, message) in BAD_FILES.items():
        path = folder / name
        path.write_bytes(make())
        files[name] = (path, message)
    return files


@pytest.fixture(scope="module")
def animated_gif(tmp_path_factory) -> Path:
    return write_animated_gif(tmp_path_factory.mktemp("gif") / "anim.gif")


# ------------------------------------------------------------------------------------------------
# Reading uploads

def test_read_image_reads_an_example():
    image, notes = read_upload(CAT)
    assert image.size == (32, 32) and notes == []


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_read_image_refuses_bad_files_with_a_clear_message(bad_files, name):
    path, message = bad_files[name]
    with pytest.raises(gr.Error, match=message):
        read_upload(path)


def test_read_image_refuses_missing_and_oversized(tmp_path, monkeypatch):
    with pytest.raises(gr.Error, match="No image"):
        read_upload(None)
    with pytest.raises(gr.Error, match="missing"):
        read_upload(tmp_path / "nope.png")
    monkeypatch.setattr(session_module, "MAX_FILE_BYTES", 100)
    with pytest.raises(gr.Error, match="limit"):
        read_upload(CAT)


def test_animated_images_use_the_first_frame(animated_gif, model):
    image, notes = read_upload(animated_gif)
    assert notes == ["animated image: first of 3 frames used"]
    assert to_model_pixels(image, 32).getpixel((16, 16)) == (255, 0, 0)


def test_exif_orientation_and_alpha_are_honoured(tmp_path, model):
    upright = to_model_pixels(read_upload(write_rotated_jpeg(tmp_path / "rotated.jpg"))[0], 32)
    top, bottom = np.asarray(upright)[4, 16], np.asarray(upright)[28, 16]
    assert top[0] > 200 and top[2] < 60       # the red half is on top once upright
    assert bottom[2] > 200 and bottom[0] < 60

    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(transparent)
    assert to_model_pixels(read_upload(transparent)[0], 32).getpixel((10, 10)) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------
# Settings, analysis, drawing

def test_settings_are_checked_with_the_allowed_values(model):
    assert Settings().checked(model).layer == model.depth
    good = Settings(method="grad_rollout", target="dog", head_fusion="max", discard_ratio=0.5,
                    opacity=1, layer=1, head="head 2", patch=63).checked(model)
    assert (good.layer, good.head_index, good.patch) == (1, 1, 63)
    no_such_head = f"head {model.n_heads + 1}"
    for bad, message in [(dict(method="saliency"), "Unknown method"), (dict(target="unicorn"), "Unknown class"),
                         (dict(head_fusion="median"), "head fusion"), (dict(discard_ratio=1.0), "Discard"),
                         (dict(opacity=-0.1), "Opacity"), (dict(layer=3), "Layer"), (dict(head=no_such_head), "head"),
                         (dict(patch=64), "Patch"), (dict(opacity="a lot"), "number")]:
        with pytest.raises(gr.Error, match=message):
            Settings(**bad).checked(model)


def test_settings_are_read_by_name(model):
    read = Settings.read(model, {"opacity": 0.8, "head": "head 2", "method": "last_layer", "patch": 7})
    assert read == Settings(method="last_layer", opacity=0.8, head="head 2", patch=7).checked(model)
    # An API caller's None means the control's default; a name no setting has is a programming error.
    assert Settings.read(model, {name: None for name in SETTING_PARAMETERS}) == Settings().checked(model)
    with pytest.raises(TypeError, match="opactiy"):
        Settings.read(model, {"opactiy": 0.5})
    with pytest.raises(gr.Error, match="Opacity"):
        Settings.read(model, {"opacity": 2})


def test_draw_draws_every_panel(model, session):
    panels = draw(view(model, session, Settings().checked(model)))
    assert list(panels) == [panel.name for panel in PANELS]
    side = 32 * SCALE
    assert panels["model_view"].size == panels["overlay"].size == panels["token_attention"].size == (side, side)
    assert panels["patch_grid"].size == (side + 9 * GAP,) * 2
    for image in (panels["matrices"], panels["matrix"], panels["layer_strip"]):
        assert isinstance(image, Image.Image) and min(image.size) > 50
    assert sum(panels["top5"].values()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        logits = model(preprocess(Image.open(CAT), model))
    assert max(panels["top5"], key=panels["top5"].get) == model.class_names[int(logits.argmax())]
    assert "**true label:** cat" in panels["summary"]


def test_settings_redraw_from_the_cache_without_running_the_model(model, monkeypatch):
    session = analyzed(model)  # its own, so no other test has asked for a class yet
    calls = []
    original = rollout.gradient_maps  # how a new class's gradient maps are computed
    monkeypatch.setattr(rollout, "gradient_maps",
                        lambda m, images, target: calls.append({"target": int(target[0])}) or original(m, images, target))
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append("forward") or forward(*a, **k))
    baseline = np.asarray(draw(view(model, session, Settings().checked(model)))["overlay"])
    for change in [dict(head_fusion="max"), dict(discard_ratio=0.6), dict(opacity=0.9), dict(layer=1),
                   dict(head="head 2"), dict(patch=27), dict(method="last_layer"),
                   dict(method="grad_rollout")]:  # the predicted class's gradient map is cached
        panels = draw(view(model, session, Settings(**change).checked(model)))
        assert calls == [], change
    assert not np.array_equal(baseline, np.asarray(panels["overlay"]))
    other = next(name for i, name in enumerate(model.class_names) if i != session.predicted)
    draw(view(model, session, Settings(method="grad_rollout", target=other).checked(model)))
    draw(view(model, session, Settings(method="grad_rollout", target=other, opacity=0.2).checked(model)))
    # one forward + backward for a new class, then cached
    assert calls == [{"target": model.class_names.index(other)}, "forward"]


def test_cached_maps_equal_a_fresh_explanation(model, session):
    settings = Settings(head_fusion="max", discard_ratio=0.5, target="dog").checked(model)
    cached = current_explanation(model, session, settings)
    fresh = explain(model, session.inputs, target=5, head_fusion="max", discard_ratio=0.5)
    for name in ("rollout", "grad_rollout", "layer_maps", "last_layer"):
        torch.testing.assert_close(getattr(cached, name), getattr(fresh, name))
    assert int(cached.target[0]) == 5 and cached.head_fusion == "max"


def test_clicks_map_to_patches(model):
    cell, gap = 4 * SCALE, GAP
    x, y = gap + 3 * (cell + gap) + cell / 2, gap + 2 * (cell + gap) + 1  # row 2, column 3
    assert clicked_patch(model, "patch_grid", x, y) == 2 * 8 + 3
    assert clicked_patch(model, "patch_grid", gap + cell + 0.5, 10) is None  # in a gap
    for panel in ("model_view", "overlay", "token_attention"):
        assert clicked_patch(model, panel, 255, 255) == 63
        assert clicked_patch(model, panel, 0, 40) == 8
    with pytest.raises(ValueError, match="cannot be clicked"):
        clicked_patch(model, "matrix", 0, 0)


def test_faithfulness_sanity_and_export(model, session, tmp_path):
    settings = Settings(method="grad_rollout", patch=5).checked(model)
    curves = faithfulness(model, session, settings, steps=8)
    deletion, insertion, table = curves["deletion"], curves["insertion"], curves["auc"]
    assert isinstance(deletion, Image.Image) and isinstance(insertion, Image.Image)
    assert "gradient rollout" in table and "random" in table and table.count("|") >= 12

    text = sanity_check(model, session, settings)
    assert "| head |" in text and "| block 1 |" in text and "| embedding |" in text

    paths = [Path(p) for p in export_files(model, session, settings, tmp_path)]
    assert len([p for p in paths if p.suffix == ".png"]) == 7
    assert all(Image.open(p).size[0] > 0 for p in paths if p.suffix == ".png")
    assert {p.name for p in paths} >= {"cat_0000_overlay_grad_rollout.png", f"cat_0000_attention_layer{model.depth}.png"}
    arrays = np.load(next(p for p in paths if p.suffix == ".npz"))
    assert arrays["attentions"].shape == (1, model.depth, model.n_heads, 65, 65)
    assert arrays["explained_map"].shape == (1, 8, 8) and str(arrays["method"]) == "grad_rollout"
    assert arrays["image"].shape == (32, 32, 3) and list(arrays["class_names"]) == model.class_names


# ------------------------------------------------------------------------------------------------
# The handlers' contract: {output name: value}, the panel list deciding which

def test_handlers_answer_by_name(model):
    explorer = Explorer(model)
    explained = explorer.explain({"path": str(DOG), "orig_name": DOG.name}, opacity=None, head="head 2")
    assert list(explained) == [panel.name for panel in PANELS] + ["session", "patch"]
    assert explained["patch"] == -1 and "layer 2, head 2" in explained["summary"]
    assert isinstance(explained["session"], session_module.Session)
    redrawn = explorer.redraw(explained["session"], **dict.fromkeys(SETTING_PARAMETERS), patch=9)
    assert list(redrawn) == [panel.name for panel in REDRAWN] + ["session"] and "patch 9" in redrawn["summary"]
    assert explorer.redraw(None, opacity=0.3) == {}  # nothing uploaded yet: nothing changes
    assert list(Explorer.clear()) == list(explained) and Explorer.clear()["patch"] == -1
    with pytest.raises(gr.Error, match="Upload an image or pick an example first"):
        explorer.sanity_check(None)


def test_an_upload_answers_the_first_panels_then_every_panel(model):
    steps = list(Explorer(model).explain_steps({"path": str(DOG), "orig_name": DOG.name}, head="head 2"))
    assert len(steps) == 2
    first, every = steps
    assert list(first) == [panel.name for panel in PANELS if panel.first] + ["session", "patch"]
    assert {"model_view", "overlay"} <= set(first) and "layer_strip" not in first
    assert list(every) == [panel.name for panel in PANELS] + ["session", "patch"]
    assert every["session"] is first["session"] and every["overlay"] is first["overlay"]  # drawn once
    again = Explorer(model).explain({"path": str(DOG), "orig_name": DOG.name}, head="head 2")
    assert again["summary"] == every["summary"]
    assert np.array_equal(np.asarray(again["layer_strip"]), np.asarray(every["layer_strip"]))


def test_the_panel_list_is_the_documented_answer_order():
    assert [panel.name for panel in PANELS] + ["patch"] == EXPLAIN_RETURNS
    assert [panel.name for panel in REDRAWN] == REDRAW_RETURNS
    assert len({panel.name for panel in PANELS}) == len(PANELS)


def test_readme_documents_the_answer_order():
    readme = (ROOT / "README.md").read_text()
    # `a, b, ... = client.predict(..., api_name="/name")`, the names possibly in brackets over lines
    calls = re.finditer(r"\n\(?([\w,\s]+?)\)? = client\.predict\((?:(?!client\.predict)[\s\S])*?"
                        r"api_name=\"(/\w+)\"\)", readme)
    unpacked = {m.group(2): re.sub(r"\s+", "", m.group(1)).split(",") for m in calls}
    assert unpacked["/explain"] == EXPLAIN_RETURNS
    assert unpacked["/redraw"] == REDRAW_RETURNS


# ------------------------------------------------------------------------------------------------
# Methods, trust per image, the Compare view, evidence from the checkpoint's files, the Model tab

def faithfulness_json(spearman: dict[str, float], n: int = 12) -> dict:
    """A faithfulness.json as `python -m vit_core.cli.faithfulness` writes it (two removals, each
    figure's mean / sem / n), with the given token-drop Spearman correlations (the removal the app shows)."""
    def figures(rho, shift):
        return {"spearman_occlusion": {"mean": rho, "sem": 0.01, "n": n},
                "deletion_auc": {"mean": 0.3 - shift, "sem": 0.01, "n": n},
                "insertion_auc": {"mean": 0.5 + shift, "sem": 0.01, "n": n},
                "deletion_win_rate": {"mean": 0.7 + shift, "sem": 0.01, "n": n},
                "insertion_win_rate": {"mean": 0.6 + shift, "sem": 0.01, "n": n}}
    methods = {name: {"drop": figures(rho, rho / 10), "mean": figures(0.99, 0.0),  # mean fill must not count
                      "class_sensitivity": {"mean": 0.2, "sem": 0.1, "n": n}} for name, rho in spearman.items()}
    random = {"drop": {"deletion_auc": {"mean": 0.42, "sem": 0.01, "n": n},
                       "insertion_auc": {"mean": 0.41, "sem": 0.01, "n": n}}}
    return {"n": n, "seed": 1, "removals": ["mean", "drop"], "methods": methods, "random": random}


@pytest.fixture
def checkpoint_copy(checkpoint, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def test_the_picker_offers_every_method_and_slow_ones_only_on_request(model, monkeypatch):
    assert list(PICKER_LABELS)[:8] == ["lrp_composite", "grad_rollout", "attention_x_gradient", "attnlrp",
                                 "libragrad", "input_x_gradient", "rollout", "last_layer"]
    assert set(PICKER_LABELS) - set(FAST_METHODS) == {"occlusion", "occlusion_drop", "integrated_gradients"}
    assert Settings().method == DEFAULT_METHOD == "lrp_composite"
    session = analyzed(model)
    assert set(session.explanation.maps()) == {"rollout", "grad_rollout", "last_layer"}  # nothing else on upload
    panels = draw(view(model, session, Settings().checked(model)))  # the default map, computed for drawing
    known = session.cache.maps(session.explanation.target)  # what the session computed for its class
    assert "lrp_composite" in known and "explaining:**" in panels["summary"]
    assert not {"occlusion", "integrated_gradients"} & set(known)
    import vit_core.methods as methods
    asked = []
    original = methods.METHOD["integrated_gradients"]
    monkeypatch.setitem(methods.METHOD, "integrated_gradients", dataclasses.replace(
        original, compute=lambda *a, **k: asked.append(1) or original.compute(*a, **k)))
    for _ in range(2):
        overlay = draw(view(model, session, Settings(method="integrated_gradients").checked(model)))["overlay"]
    assert asked == [1] and overlay.size == (32 * SCALE,) * 2  # computed when chosen, then cached


def test_trust_figures_per_image_are_computed_once_and_agree_with_vit_core(model, monkeypatch):
    from vit_core.trust import trust_figures

    session, settings = analyzed(model, DOG), Settings().checked(model)
    figures = image_trust(model, session, settings)
    assert list(figures) == list(FAST_METHODS)
    expl = current_explanation(model, session, settings)
    direct = trust_figures(model, session.inputs, {"grad_rollout": expl.grad_rollout}, expl.target,
                           removal="drop", bf16=TRUST_BF16)["grad_rollout"].for_image(0)  # our ViT: tokens left out
    assert figures["grad_rollout"] == pytest.approx(direct, nan_ok=True)
    for values in figures.values():
        assert 0 <= values["deletion_percentile"] <= 100 and 0 <= values["insertion_percentile"] <= 100
    import demo.evidence as evidence

    scored, score = [], evidence.trust_figures
    monkeypatch.setattr(evidence, "trust_figures",
                        lambda model, images, maps, *a, **k: scored.append(sorted(maps)) or score(model, images, maps,
                                                                                                  *a, **k))
    assert image_trust(model, session, Settings(method="rollout", opacity=0.9).checked(model)) == figures
    assert scored == []  # cached: nothing scored again for the same image and class
    fused = image_trust(model, session, Settings(head_fusion="max").checked(model))
    assert scored == [["last_layer", "rollout"]] and fused["grad_rollout"] == figures["grad_rollout"]
    chosen = image_trust(model, session, Settings(method="occlusion_drop").checked(model))
    assert chosen["occlusion_drop"]["spearman_occlusion"] == pytest.approx(1.0)  # the reference itself


def test_trust_handler_answers_badge_table_and_compare_view(model):
    explorer = Explorer(model)
    session = explorer.explain({"path": str(CAT), "orig_name": CAT.name})["session"]
    answer = explorer.trust(session, method="grad_rollout")
    assert set(answer) == {"trust", "trust_table", "compare", "compare_table"}
    assert re.search(r"\*\*gradient rollout\*\* beats \*\*\d+ %\*\* of random maps on this image", answer["trust"])
    assert "Spearman ρ" in answer["trust"] and "leave-one-patch-out" in answer["trust"]
    rows = [line for line in answer["trust_table"].splitlines()[2:]]
    assert len(rows) == len(FAST_METHODS) and "| **gradient rollout** |" in answer["trust_table"]
    assert answer["compare_table"] == answer["trust_table"]
    strip = answer["compare"]
    assert isinstance(strip, Image.Image) and strip.width > len(FAST_METHODS) * 32 * 4
    assert explorer.trust(None) == {}
    assert Explorer.new_image()["trust"].startswith("Measuring")


def test_default_method_and_test_set_table_come_from_faithfulness_json(model, checkpoint_copy):
    bare = Evidence.load(model, checkpoint_copy)
    assert bare.default_method == DEFAULT_METHOD and bare.test_set is None
    assert "not yet measured" in bare.default_text() and "Compare tab" in bare.default_text()
    assert "rollout is one click away" in bare.default_text()
    assert "not measured" in bare.test_set_markdown() and RESULTS_FILE in bare.test_set_markdown()
    # attention x gradient is the most faithful fast method; occlusion_drop scores higher but is slow.
    spearman = {"lrp_composite": 0.52, "attention_x_gradient": 0.61, "rollout": 0.12, "occlusion_drop": 0.9}
    (checkpoint_copy / RESULTS_FILE).write_text(json.dumps(faithfulness_json(spearman)))
    measured = Evidence.load(model, checkpoint_copy)
    assert measured.default_method == "attention_x_gradient"
    assert measured.default_text() == ("Showing **attention × gradient**: the most faithful of the fast methods on "
                                       "the test set (Spearman 0.61 with occlusion over 12 images); rollout is one "
                                       "click away.")
    table = measured.test_set_markdown()
    assert "How to read it" in table and "12 test images" in table
    assert "| attention × gradient | 0.610 | 76 % | 66 % | 0.239 | 0.561 |" in table
    assert "| random map | – | – | – | 0.420 | 0.410 |" in table
    explorer = Explorer(model, evidence=measured)
    assert explorer.settings({"method": None}).method == "attention_x_gradient"  # an API caller's None
    assert explorer.settings({"method": "rollout"}).method == "rollout"
    (checkpoint_copy / RESULTS_FILE).write_text("{ not json")
    assert Evidence.load(model, checkpoint_copy).default_method == DEFAULT_METHOD


def test_header_shows_accuracy_what_is_shown_and_the_share_link(model, checkpoint_copy):
    assert "not measured" in Explorer(model).header()["header"]
    (checkpoint_copy / "eval.json").write_text(json.dumps({"accuracy": 0.7971, "n_images": 10000}))
    share = {"state": (False, None)}
    explorer = Explorer(model, evidence=Evidence.load(model, checkpoint_copy), share=lambda: share["state"])
    header = explorer.header()["header"]
    assert "**79.7% test accuracy** (10,000 images)" in header and "Showing **LRP (composite)**" in header
    assert "Public link" not in header
    assert "Showing **rollout** (the app opens on LRP (composite)" in explorer.header("rollout")["header"]
    share["state"] = (True, None)
    assert "Public link unavailable" in explorer.header()["header"] and "serving locally" in explorer.header()["header"]
    share["state"] = (True, "https://abc.gradio.live")
    assert "Public link: [https://abc.gradio.live](https://abc.gradio.live)" in explorer.header()["header"]


def test_anatomy_is_read_from_the_cache_or_computed_once_from_the_examples(model, checkpoint_copy):
    from vit_core.anatomy import save_anatomy

    computed = Evidence.load(model, checkpoint_copy, EXAMPLES)
    assert computed.anatomy.n_images == 30 and computed.anatomy.matches(model)
    assert computed.anatomy_note.startswith("computed at start-up")
    save_anatomy(computed.anatomy, checkpoint_copy / "anatomy.npz")
    cached = Evidence.load(model, checkpoint_copy, EXAMPLES)
    assert cached.anatomy_note.startswith("read from the cache")
    np.testing.assert_allclose(cached.anatomy.attention_distance, computed.anatomy.attention_distance)
    other = tiny_vit(seed=3, sharpen=True)  # other weights: the cache is stale, so it is recomputed
    assert Evidence.load(other, checkpoint_copy, EXAMPLES).anatomy_note.startswith("computed at start-up")

    explorer = Explorer(model, evidence=cached)
    answer = explorer.anatomy()
    assert set(answer) == {f.name for f in MODEL_FIGURES} | {"anatomy_info"}
    for figure in MODEL_FIGURES:
        assert Image.open(answer[figure.name]).size[0] > 100, figure.name
    assert "from **30 images** (the 30 example images)" in answer["anatomy_info"]
    assert explorer.anatomy()[MODEL_FIGURES[0].name] == answer[MODEL_FIGURES[0].name]  # files written once
    with pytest.raises(gr.Error, match="No anatomy"):
        Explorer(model).anatomy()


def test_readme_lists_every_method_value():
    readme = (ROOT / "README.md").read_text()
    documented = re.search(r'method="\w+",\s*#\s*((?:"\w+"[\s|#]*)+)', readme)  # may go on over lines
    assert documented, "README's /explain example documents the method values"
    assert re.findall(r'"(\w+)"', documented.group(1)) == list(PICKER_LABELS)


# ------------------------------------------------------------------------------------------------
# Loading and launching

def test_load_model_from_a_hub_repo_id(checkpoint, monkeypatch):
    import vit_core.checkpoints as checkpoints

    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(checkpoint / filename)

    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_download)
    loaded = app.load_checkpoint("someone/tiny-vit")
    assert ("someone/tiny-vit", "model.safetensors") in fetched and loaded.depth == 2


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(app.CheckpointError, match="No checkpoint directory"):
        app.load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(app.CheckpointError, match="Cannot load the checkpoint"):
        app.load_checkpoint(tmp_path / "empty")


@pytest.mark.slow
def test_hub_id_offline_fails_fast_with_advice():
    code = ("import demo.app as a\ntry:\n a.load_checkpoint('someone/vit')\nexcept a.CheckpointError as e:\n print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "Offline? Pass a local checkpoint directory" in out.stdout


def test_main_reports_a_missing_checkpoint(tmp_path, capsys):
    assert app.main(["--checkpoint", str(tmp_path / "none"), "--port", str(free_port())]) == 2
    assert "No checkpoint directory" in capsys.readouterr().err


def test_shipped_checkpoint_loads_offline_and_fits_a_space():
    assert (SHIPPED / "model.safetensors").stat().st_size < 10 * 2**20  # no Git LFS needed
    model = app.load_checkpoint(app.DEFAULT_CHECKPOINT)
    image, _ = read_upload(DOG)
    probs = label_probs(model, image)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5) and set(probs) == set(model.class_names)


# ------------------------------------------------------------------------------------------------
# The launched app through gradio_client

# `server` and `client` come from conftest.py.


def top1(label: dict) -> str:
    return label["label"]


def test_api_lists_the_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/predict", "/explain", "/redraw", "/faithfulness", "/sanity_check", "/export"} <= names


def test_endpoints_keep_their_documented_parameters_and_answers(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    expected = {  # endpoint: (parameter names in order, number of values answered)
        "/predict": (["image"], 1),
        "/explain": (["image", *SETTING_PARAMETERS], len(EXPLAIN_RETURNS)),
        "/redraw": ([*SETTING_PARAMETERS, "patch"], len(REDRAW_RETURNS)),
        "/faithfulness": (SETTING_PARAMETERS, 3),
        "/sanity_check": (SETTING_PARAMETERS, 1),
        "/export": ([*SETTING_PARAMETERS, "patch"], 1),
    }
    for name, (parameters, answers) in expected.items():
        info = endpoints[name]
        assert [p["parameter_name"] for p in info["parameters"]] == parameters, name
        assert all(p["parameter_has_default"] for p in info["parameters"] if p["parameter_name"] != "image"), name
        assert len(info["returns"]) == answers, name


def test_predict_endpoint(client, model):
    label = client.predict(upload(DOG), api_name="/predict")
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == set(model.class_names)
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        expected = model.class_names[int(model(preprocess(Image.open(DOG), model)).argmax())]
    assert top1(label) == expected


def test_a_slow_map_moves_the_progress_bar(model):
    explorer = Explorer(model)
    *_, answer = explorer.explain_steps({"path": str(DOG), "orig_name": DOG.name})
    calls = []
    explorer.redraw(answer["session"], lambda value, desc=None, unit=None: calls.append((value, desc)),
                    method="occlusion")
    n = model.grid_size ** 2
    assert calls and calls[-1] == ((n, n), "computing the map")


def test_a_method_change_redraws_the_panels_before_the_trust_figures(model):
    # The page runs the events of one trigger in the order they are wired, each to its end: the
    # trust figures (seconds for a large model) must not hold the new map back.
    demo = app.build_demo(model)
    method = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "method")._id
    order = [dep["api_name"] for dep in demo.config["dependencies"]
             if [method, "change"] in [list(t) for t in dep["targets"]]]
    assert order.index("trust") == len(order) - 1 and any(name.startswith("redraw") for name in order[:-1])
    assert next(dep["show_progress"] for dep in demo.config["dependencies"]
                if dep["api_name"] == order[0]) == "full"  # where a slow map shows its progress bar


def test_explain_endpoint_returns_every_panel(client, model):
    job = client.submit(upload(CAT), api_name="/explain")
    out = job.result()
    # One answer for scripts (the page's upload answers in two steps; a client would download both).
    assert len(job.outputs()) == 1
    model_view, grid, overlay, token, label, matrices, matrix, strip, info, patch = out
    side = 32 * SCALE
    for path, size in [(model_view, (side, side)), (grid, (side + 9 * GAP,) * 2), (overlay, (side, side)),
                       (token, (side, side))]:
        assert Image.open(path).size == size
    for path in (matrices, matrix, strip):
        assert min(Image.open(path).size) > 50
    assert len(label["confidences"]) == 5 and patch == -1 and "true label:** cat" in info
    with torch.no_grad():
        expected = model.class_names[int(model(preprocess(Image.open(CAT), model)).argmax())]
    assert top1(label) == expected


def test_explain_with_settings_then_redraw_in_the_same_session(client):
    out = client.predict(upload(DOG), method="grad_rollout", target="cat", head_fusion="max",
                         discard_ratio=0.5, opacity=0.8, layer=1, head="head 2", api_name="/explain")
    assert "explaining:** cat" in out[8] and "layer 1, head 2" in out[8]
    plain = client.predict(api_name="/redraw")
    highlighted = client.predict(patch=10, api_name="/redraw")
    assert "true label:** dog" in highlighted[-1] and "patch 10" in highlighted[-1]
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(highlighted[0])))
    # As the endpoint's description says: settings left out are the controls' initial values, not
    # the previous call's (gradio_client sends those), so a script passes again what it chose.
    assert "explaining:** dog" in plain[-1] and "mean of heads" in plain[-1]
    kept = client.predict(method="grad_rollout", target="cat", head_fusion="max", discard_ratio=0.5, opacity=0.8,
                          layer=1, head="head 2", api_name="/redraw")
    assert "explaining:** cat" in kept[-1] and "layer 1, head 2" in kept[-1]
    description = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/redraw"]
    assert "not the previous call's" in json.dumps(description)


def test_sessions_are_isolated(server, tmp_path_factory):
    first, second = local_client(server, tmp_path_factory), local_client(server, tmp_path_factory)
    first.predict(upload(CAT), api_name="/explain")
    second.predict(upload(DOG), api_name="/explain")
    assert "true label:** cat" in first.predict(api_name="/redraw")[-1]
    assert "true label:** dog" in second.predict(api_name="/redraw")[-1]


def test_redraw_before_any_image_is_harmless(server, tmp_path_factory):
    fresh = local_client(server, tmp_path_factory)
    fresh.predict(api_name="/redraw")  # skipped, no error
    with pytest.raises(Exception, match="Upload an image or pick an example first"):
        fresh.predict(api_name="/faithfulness")


def test_faithfulness_sanity_and_export_endpoints(client):
    client.predict(upload(CAT), api_name="/explain")
    deletion, insertion, table = client.predict(method="last_layer", api_name="/faithfulness")
    assert Image.open(deletion).size[0] > 100 and "random" in table
    assert "| embedding |" in client.predict(api_name="/sanity_check")
    files = client.predict(patch=3, api_name="/export")
    paths = [Path(f) for f in files]
    # 7 panels + the .npz, the Model tab's figures and the Walkthrough's .json and logit lens (Export includes them).
    assert any(p.suffix == ".npz" for p in paths) and len(paths) == 10 + len(MODEL_FIGURES)
    assert {f"{figure.name}.png" for figure in MODEL_FIGURES} <= {p.name for p in paths}
    assert "attentions" in np.load(next(p for p in paths if p.suffix == ".npz"))


def test_trust_and_anatomy_endpoints(client):
    out = client.predict(upload(DOG), api_name="/explain")  # the default map: LRP (composite)
    assert "explaining:**" in out[8]
    sentence, table, compare, compare_table = client.predict(method="attnlrp", api_name="/trust")
    assert "**AttnLRP** beats" in sentence and "of random maps on this image" in sentence
    assert len(table.splitlines()) == 2 + len(FAST_METHODS) and compare_table == table
    assert Image.open(compare).width > len(FAST_METHODS) * 128
    *figures, info = client.predict(api_name="/anatomy")
    assert len(figures) == len(MODEL_FIGURES) and all(Image.open(f).size[0] > 100 for f in figures)
    assert "from **30 images**" in info


def test_readme_documents_the_anatomy_answer_order():
    readme = (ROOT / "README.md").read_text()
    names = re.search(r"\n\(([\w,\s]+)\) = client\.predict\(api_name=\"/anatomy\"\)", readme).group(1)
    assert ["anatomy_" + name for name in re.sub(r"\s+", "", names).split(",")[:-1]] == [f.name for f in MODEL_FIGURES]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_uploads_get_a_clear_error_and_the_server_keeps_serving(client, model, bad_files, name):
    path, message = bad_files[name]
    for endpoint in ("/explain", "/predict"):
        with pytest.raises(Exception, match=message):
            client.predict(upload(path), api_name=endpoint)
    assert top1(client.predict(upload(CAT), api_name="/predict")) in model.class_names


def test_uploads_over_the_size_cap_are_refused(client, tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(image_bytes(noise(), "PNG") + os.urandom(11 * 2**20))  # 11 MB > 10 MB cap
    with pytest.raises(Exception):
        client.predict(upload(huge), api_name="/explain")
    assert client.predict(upload(CAT), api_name="/predict")["label"]


def test_animated_upload_through_the_client(client, animated_gif):
    out = client.predict(upload(animated_gif), api_name="/explain")
    assert "first of 3 frames" in out[8]


@pytest.mark.slow
def test_share_offline_serves_locally_without_a_warning(model):
    if host_reachable(app.SHARE_SERVER, 443, timeout=2):
        pytest.skip("the share server is reachable from here; this checks the offline path")
    demo = app.build_demo(model)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app.launch(demo, share=True, block=False, quiet=True)
    try:
        elapsed = time.perf_counter() - started
        assert elapsed < 8, f"took {elapsed:.1f} s to serve locally"
        assert not [w for w in caught if "share" in str(w.message)]  # share_message's one line says it
        assert demo.share_url is None
        import httpx
        assert httpx.get(demo.local_url, timeout=10).status_code == 200
    finally:
        demo.close()


@pytest.mark.slow
def test_share_offline_prints_one_clear_message_not_gradios_hint(model, capfd):
    if host_reachable(app.SHARE_SERVER, 443, timeout=2):
        pytest.skip("the share server is reachable from here; this checks the offline path")
    demo = app.build_demo(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app.launch(demo, share=True, block=False)
    try:
        captured = capfd.readouterr()
        out = captured.out
        assert "no public link is available" in out and demo.local_url in out
        lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
        assert len(lines) == 1, lines  # one line, no warning with its source line
        assert "To create a public link" not in out  # Gradio's hint would read as if --share were ignored
        assert demo.share_requested is True and demo.share_url is None  # what the page header reads
    finally:
        demo.close()


def test_a_busy_port_is_one_line_naming_a_free_one(capsys):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not app.port_free("127.0.0.1", port)
        assert app.main(["--port", str(port), "--host", "127.0.0.1"]) == 2
        err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} is busy; pass --port ") and err.count("\n") == 1, err
    suggested = int(err.split("--port ")[1].split()[0])
    assert suggested != port and app.port_free("127.0.0.1", suggested)
    assert "server_port" not in err and "Traceback" not in err


def test_a_port_taken_while_the_model_loads_is_the_same_one_line(model, monkeypatch, capsys):
    import socket

    checks = []
    real = app.port_free
    monkeypatch.setattr(app, "port_free", lambda host, port: real(host, port) if checks.append(port) or
                        len(checks) > 1 else True)  # free at the first look, taken by the time it launches
    monkeypatch.setattr(app, "load_model", lambda *args, **kwargs: model)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert app.main(["--port", str(port), "--host", "127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} is busy; pass --port ") and "Traceback" not in err, err


def test_the_apps_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--port", "eighty"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: argument --port: invalid int value")
    assert err.count("\n") == 1 and "usage:" not in err


def test_share_message_shows_the_public_link_clearly():
    message = app.share_message("http://127.0.0.1:7860/", "https://abc123.gradio.live")
    assert "  Public link:  https://abc123.gradio.live\n" in message and message.startswith("=" * 20)


# ------------------------------------------------------------------------------------------------
# Another library's ViT (vit_core.adapters): timm models saved with save_for_hf

# timm variants of test_adapters: a 4×4 grid each, with 1 (CLS), 4 (CLS + 3 registers) and 0 prefix tokens
TIMM_VARIANTS = {"vit_p16": 1, "registers": 4, "no_cls_avg": 0}


@pytest.fixture(scope="module", params=sorted(TIMM_VARIANTS))
def timm_folder(request, tmp_path_factory) -> Path:
    from timm.models import save_for_hf

    from test_adapters import make_timm

    folder = tmp_path_factory.mktemp(f"timm-{request.param}")
    save_for_hf(make_timm(request.param), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def timm_explorer(timm_folder) -> Explorer:
    return Explorer(app.load_model(timm_folder), sorted(EXAMPLES.glob("*.jpg")))


def test_a_timm_model_draws_every_panel_on_its_own_grid(timm_explorer, tmp_path):
    model = timm_explorer.model
    assert not isinstance(model, ViTClassifier) and model.grid_size == 4
    answer = timm_explorer.explain({"path": str(CAT), "orig_name": CAT.name})
    assert list(answer) == [panel.name for panel in PANELS] + ["session", "patch"]
    side = DISPLAY_SIDE
    assert answer["model_view"].size == answer["overlay"].size == answer["token_attention"].size == (side, side)
    assert answer["patch_grid"].size == (side + 5 * GAP,) * 2
    assert set(answer["top5"]) == {f"class {i}" for i in range(5)}
    assert f"resized from 32×32 to {model.image_size}×{model.image_size}" in answer["summary"]
    assert "true label" not in answer["summary"]
    session = answer["session"]
    tokens = 16 + model.n_prefix_tokens
    assert session.explanation.attentions.shape == (1, model.depth, model.n_heads, tokens, tokens)
    torch.testing.assert_close(session.inputs, preprocess(session.pixels, model))  # the model's own mean and std
    paths = export_files(model, session, timm_explorer.defaults.checked(model), tmp_path)
    arrays = np.load(next(p for p in paths if p.endswith(".npz")))
    assert arrays["explained_map"].shape == (1, 4, 4) and str(arrays["method"]) == "lrp_composite"  # LRP has rules here


def test_a_large_input_keeps_the_per_layer_strips_small(tmp_path):
    # 224 px, 14 x 14 patches, 197 tokens: full-size strips would be megapixels the page shows small.
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5).eval(), tmp_path, safe_serialization=True)
    explorer = Explorer(app.load_model(tmp_path))
    answer = explorer.explain({"path": str(CAT), "orig_name": CAT.name})
    assert answer["overlay"].size == (224, 224)             # the main panels keep every pixel
    assert STRIP_SIDE < 224 and MATRIX_THUMB < 197
    assert answer["layer_strip"].width == 2 * 112 + 4       # two thumbnails of the picture reduced by 2
    assert answer["matrices"].width == 2 * 99 + 6           # two 197-token matrices as 2 x 2 block means
    assert answer["matrix"].width > 197                     # the chosen layer's matrix: every entry


class Click:  # what a click hands the handler: the pixel clicked
    def __init__(self, x, y):
        self.index = [x, y]


def test_a_click_on_patch_i_follows_token_i_plus_the_prefix(timm_explorer):
    model, prefix = timm_explorer.model, timm_explorer.model.n_prefix_tokens
    session = timm_explorer.explain({"path": str(DOG), "orig_name": DOG.name})["session"]
    cell = model.patch_size * (DISPLAY_SIDE // model.image_size)
    x, y = GAP + 3 * (cell + GAP) + cell / 2, GAP + 2 * (cell + GAP) + 1  # row 2, column 3: patch 11
    clicked = timm_explorer.click_on("patch_grid")(Click(x, y), session, head="head 2", layer=1)
    assert clicked["patch"] == 11 and "patch 11" in clicked["summary"]
    typed = timm_explorer.redraw(session, head="head 2", layer=1, patch=11)
    assert np.array_equal(np.asarray(typed["matrix"]), np.asarray(clicked["matrix"]))
    # where token 11 + prefix attends in block 1, head 2, over the patch tokens, drawn by hand
    row = session.explanation.attentions[0, 0, 1, 11 + prefix, prefix:].reshape(4, 4)
    expected = viz.overlay_map(session.pixels, row, scale=DISPLAY_SIDE // model.image_size, highlight=11)
    assert np.array_equal(np.asarray(clicked["token_attention"]), np.asarray(expected))
    highlighted = view(model, session, Settings(head="head 2", layer=1, patch=11, method="rollout").checked(model))
    assert highlighted.highlight_token == 11 + prefix
    unselected = timm_explorer.redraw(session, head="head 2", layer=1, patch=-1)
    assert ("CLS" if prefix else "mean of the patch tokens") in unselected["summary"]


GENERIC_METHODS = ["lrp_composite", "grad_rollout", "attention_x_gradient", "attnlrp", "libragrad", "input_x_gradient",
                   "rollout", "last_layer", "occlusion", "integrated_gradients"]


def test_a_timm_model_offers_every_method_but_ours_with_its_trust_figures(timm_explorer, timm_folder):
    model = timm_explorer.model
    assert list(session_module.methods_for(model)) == GENERIC_METHODS
    with pytest.raises(gr.Error, match="Unknown method 'occlusion_drop'"):
        Settings(method="occlusion_drop").checked(model)
    session = timm_explorer.explain({"path": str(CAT), "orig_name": CAT.name})["session"]
    trust = timm_explorer.trust(session, method="input_x_gradient")
    fast = [m for m in FAST_METHODS if m in GENERIC_METHODS]
    assert trust["trust"].startswith("**input × gradient** beats")
    assert len(trust["trust_table"].splitlines()) == 2 + len(fast) and isinstance(trust["compare"], Image.Image)
    curves = timm_explorer.faithfulness(session, method="attention_x_gradient")
    assert isinstance(curves["deletion"], Image.Image) and "| attention × gradient |" in curves["auc"]
    sanity = timm_explorer.sanity_check(session, method="grad_rollout")["sanity"]
    assert all(f"| {stage} |" in sanity for stage in ("head", "block 2", "block 1", "embedding"))
    not_available = "Not available for this model"
    assert not_available in timm_explorer.anatomy()["anatomy_info"]
    header = timm_explorer.header()["header"]
    assert "vit_tiny_patch16_224" in header and "accuracy" not in header
    assert f"2 layers × 2 heads on 4×4 patches of {model.patch_size} px" in header
    demo = app.build_demo(model, workers=1, evidence=Evidence.load(model, timm_folder, None))
    components = {getattr(c, "elem_id", None): c for c in demo.blocks.values()}
    assert [value for _, value in components["method"].choices] == GENERIC_METHODS
    assert not_available in components["test-set"].value
    gallery = components["examples"].value  # the shipped examples, without CIFAR-10 labels
    assert len(gallery) == len(list(EXAMPLES.glob("*.jpg"))) and all(item["caption"] is None for item in gallery)


def test_a_timm_model_resizes_uploads_with_its_own_interpolation(tmp_path):
    from test_adapters import make_timm

    vit = make_timm("vit_p16")
    vit.pretrained_cfg = {**vit.pretrained_cfg, "interpolation": "nearest"}
    model = vit_core.adapt(vit)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    pixels, inputs = session_module.model_inputs(model, picture)
    nearest = picture.resize((64, 64), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(pixels), np.asarray(nearest))
    assert not np.array_equal(np.asarray(pixels), np.asarray(picture.resize((64, 64), Image.Resampling.BICUBIC)))
    torch.testing.assert_close(inputs, preprocess(nearest, model))


def test_a_transformers_model_opens_in_the_explorer(tmp_path, monkeypatch):
    from test_adapters_hf import make_hf

    folder = tmp_path / "deit"
    make_hf("deit_teacher").save_pretrained(folder)
    explorer = Explorer(app.load_model(folder), sorted(EXAMPLES.glob("*.jpg")))
    answer = explorer.explain({"path": str(CAT), "orig_name": CAT.name})
    session = answer["session"]
    assert session.explanation.attentions.shape == (1, 2, 2, 18, 18)  # CLS + distillation + 16 patches
    assert answer["overlay"].size == (DISPLAY_SIDE, DISPLAY_SIDE) and set(answer["top5"]) <= {f"n{i}" for i in range(5)}
    assert explorer.trust(session, method="grad_rollout")["trust"].startswith("**gradient rollout** beats")
    assert f"**{folder}** · 2 layers × 2 heads on 4×4 patches of 4 px" in explorer.header()["header"]
    launched = []
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: launched.append(demo))
    monkeypatch.setattr(app, "port_free", lambda host, port: True)  # nothing binds; another app may hold 7860
    assert app.main(["--checkpoint", str(folder)]) == 0 and len(launched) == 1


def test_main_opens_a_timm_folder(timm_folder, monkeypatch):
    launched = []
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: launched.append(demo))
    monkeypatch.setattr(app, "port_free", lambda host, port: True)  # nothing binds; another app may hold 7860
    assert app.main(["--checkpoint", str(timm_folder)]) == 0 and len(launched) == 1


def test_main_fails_fast_offline_on_an_uncached_hub_id(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app, "port_free", lambda host, port: True)  # another app may hold 7860
    start = time.monotonic()
    assert app.main(["--checkpoint", "nowhere/none"]) == 2
    assert time.monotonic() - start < 5
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'nowhere/none'" in error and "Offline?" in error
