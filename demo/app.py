"""ViT attention explorer: a Gradio Blocks app over `vit_core`.

    python demo/app.py                        # the shipped checkpoint, fully offline
    python demo/app.py --checkpoint user/repo # weights from the Hugging Face Hub
    python demo/app.py --checkpoint DIR       # also a timm ViT (save_for_hf folder, or timm/<name> cached)
    python demo/app.py --host 0.0.0.0 --port 7860 --share
    vit-explorer ...                          # the same, installed (pip install -e .)

This file is the layout and the event wiring only. The panels are entries of `demo.panels.PANELS`
(the layout places them, and the events' outputs, clears and exports derive from that list); the
handlers are `demo.handlers.Explorer`'s methods, which answer {output name: value}; the settings
are `demo.session.Settings`, read from the controls by name. Every number drawn comes from
`vit_core`. An upload is run through the model once (one forward + one backward pass, and the
chosen attribution map's own passes); the session keeps that explanation and every setting redraws
from it, except a new class or a newly picked map, computed once per class and image. The trust
figures follow in a chained event, so the panels never wait for them; the checkpoint's files
(eval.json, faithfulness.json, anatomy.npz) are read once at start-up (`demo.evidence`).

The Walkthrough tab (demo.walkthrough) tells the same image's story step by step for an audience,
drawn in the browser from one payload of numbers per image.

Named endpoints for `gradio_client`: /predict, /explain, /explain_arrays, /redraw, /trust, /faithfulness,
/sanity_check, /export, /anatomy, /walkthrough, /whatif, /knockout (README, "Scripting with
gradio_client").
"""

from __future__ import annotations

import os

# Nothing may phone home: no analytics, no version check, no Hub telemetry. Set before gradio loads.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Gradio summarises its in-memory request log with pandas after every event by default; that
# summary only feeds the monitoring page (disabled here), so do it rarely.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "2000")

import argparse
import dataclasses
import errno
import functools
import socket
import sys
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

DEMO_DIR = Path(__file__).resolve().parent
ROOT = DEMO_DIR.parent
if str(ROOT) not in sys.path:  # `python demo/app.py` from anywhere finds vit_core and demo
    sys.path.insert(0, str(ROOT))

from demo.evidence import Evidence  # noqa: E402
from demo.handlers import FAITHFULNESS_OUTPUTS, NOT_AVAILABLE, TRUST_OUTPUTS, Explorer  # noqa: E402
from demo.panels import MODEL_FIGURES, PANELS, REDRAWN, draw, image_panel, view  # noqa: E402
from demo.serving import (GRADIO_DELETE_CACHE, SESSIONS_KEPT, CacheKeeper, answering,  # noqa: E402
                          limit_heap_arenas, panel_files)
from demo.walkthrough import (CSS as WALKTHROUGH_CSS, Walkthrough, own_upload, walkthrough_tab,  # noqa: E402
                              wire_walkthrough)
from demo.session import (HEAD_MEAN, PREDICTED, Settings, analyze, example_label, head_choices,  # noqa: E402
                          is_own, methods_for)
from vit_core import CheckpointError, ViTClassifier, load_checkpoint  # noqa: E402,F401 (load_checkpoint: re-exported)
from vit_core.adapters import load_model  # noqa: E402
from vit_core.checkpoints import candidate_folders, host_reachable  # noqa: E402
from vit_core.cli import ArgumentParser, fail  # noqa: E402
from vit_core.images import MAX_FILE_BYTES  # noqa: E402
from vit_core.rollout import HEAD_FUSIONS  # noqa: E402

EXAMPLES_DIR = DEMO_DIR / "examples"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "vit-cifar10"
SHARE_SERVER = "api.gradio.app"  # what `--share` connects to
# gradio_client fills a parameter left out with its control's initial value, so a handler cannot tell
# "left out" from "the default": every call states its settings, and the API page says so.
REDRAW_API = ("Redraws the session's image from its cached explanation (no new forward pass) with this call's "
              "settings. A setting left out takes its control's initial value (the app's default), not the "
              "previous call's: pass again every setting you chose with /explain, e.g. method.")

# Uploads over vit_core's file-size limit are refused by Gradio at upload (HTTP 413), and again by
# read_image for files that reach a handler another way; its pixel limit is checked from the header.
MAX_FILE_SIZE = f"{MAX_FILE_BYTES // 2**20}mb"
# The controls that are settings (Settings' fields; "patch" is also an output, so it is apart).
SETTING_CONTROLS = [field.name for field in dataclasses.fields(Settings) if field.name != "patch"]

CSS = """
.pixelated img { image-rendering: pixelated; }
.clickable img { cursor: crosshair; }
#info { min-height: 1.6em; }
#examples .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important;
  grid-auto-rows: min-content !important; align-content: start !important; gap: 4px !important; }
#examples .thumbnail-item { width: 100% !important; height: auto !important; aspect-ratio: 1 / 1; }
#examples .thumbnail-item img { width: 100% !important; height: 100% !important; object-fit: cover; }
#examples .caption-label { font-size: 11px; padding: 0 3px; }
#image-in img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#header p, #info p, #trust p { margin: 0; }
#controls .icon-wrap { right: 2px !important; }  /* the arrow beside, not over, a narrow dropdown's text */
#header { font-size: 0.95em; }
/* A phone: the upload, the prediction and the main map first, then the controls, the other
   panels and the examples (the side column's blocks join the page's flow to be reordered). */
@media (max-width: 760px) {
  #main-row { flex-direction: column; }
  #side { display: contents; }
  #image-in, #top5 { order: 0; }
  #stage { order: 1; }
  #examples { order: 2; }
  #readout { order: -2; }
  #maps { order: -1; }
  #top5 h2.output-class { font-size: var(--text-lg); padding: var(--size-6) 0 0; }
  #test-set table, #compare-table table, #trust-table table { display: block; overflow-x: auto; }
}
"""


# ------------------------------------------------------------------------------------------------
# The layout: every component an event reads or writes is returned by name

# The maps row, main map first (on a phone it comes right after the upload and the prediction).
MAP_ROW = ("overlay", "token_attention", "patch_grid", "model_view")


def _inputs(model: ViTClassifier, examples: list[Path]) -> dict[str, gr.components.Component]:
    """The upload, the prediction under it (the "side" panels), then the example gallery (another
    model's classes are not CIFAR-10's: its examples are shown without labels, resized to its input)."""
    if is_own(model):
        gallery_items = [(str(p), example_label(p.stem, model.class_names) or p.stem) for p in examples]
        gallery_label = "…or pick a CIFAR-10 test image (true label)"
    else:
        gallery_items, gallery_label = [str(p) for p in examples], "…or pick an example image"
    ui = {"image_in": gr.Image(label="Upload an image (any size)", type="filepath", image_mode=None,
                               sources=["upload", "clipboard"], height=150, elem_id="image-in")}
    ui.update(_panels("side"))
    ui["gallery"] = gr.Gallery(gallery_items, label=gallery_label,
                               columns=3, height=540, allow_preview=False, interactive=False,
                               object_fit="contain", elem_id="examples", elem_classes="pixelated")
    return ui


def _controls(model: ViTClassifier, method: str) -> dict[str, gr.components.Component]:
    """One control per `Settings` field, under its name; `method` is the picker's first value."""
    return {
        "method": gr.Dropdown([(v, k) for k, v in methods_for(model).items()], value=method, label="Explanation",
                              elem_id="method", min_width=180),
        "target": gr.Dropdown([PREDICTED] + list(model.class_names), value=PREDICTED, label="Target class",
                              elem_id="target", min_width=130),
        "head_fusion": gr.Dropdown(list(HEAD_FUSIONS), value="mean", label="Head fusion", elem_id="head-fusion",
                                   min_width=100),
        "discard_ratio": gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Discard ratio", elem_id="discard",
                                   min_width=90),
        "opacity": gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="opacity", min_width=90),
        "layer": gr.Slider(1, model.depth, value=model.depth, step=1, label="Layer", elem_id="layer",
                           min_width=90),
        "head": gr.Dropdown(head_choices(model), value=HEAD_MEAN, label="Head", elem_id="head", min_width=140),
        # The keyboard's way to follow a patch (clicking a panel is the mouse's).
        "patch": gr.Number(-1, precision=0, label="Patch (-1: CLS)", minimum=-1,
                           maximum=model.grid_size**2 - 1, elem_id="patch", min_width=115),
    }


def _panels(place: str, order: tuple[str, ...] = ()) -> dict[str, gr.components.Component]:
    """The panels that go to `place`, in `order` (else PANELS' order), built where the layout stands."""
    chosen = [panel for panel in PANELS if panel.place == place]
    chosen.sort(key=lambda panel: order.index(panel.name) if panel.name in order else len(order))
    return {panel.name: panel.make() for panel in chosen}


def _readout() -> dict[str, gr.components.Component]:
    """The prediction line and, beside it, how far the chosen map can be trusted on this image."""
    ui = {}
    with gr.Row(equal_height=False, elem_id="readout"):
        with gr.Column(scale=3, min_width=280):
            ui.update(_panels("summary"))
            with gr.Accordion("Trust on this image: every fast map", open=False, elem_id="trust-more"):
                ui["trust_table"] = gr.Markdown("", elem_id="trust-table")
        with gr.Column(scale=2, min_width=260, elem_id="trust-col"):
            ui["trust"] = gr.Markdown("", elem_id="trust")
    return ui


def _compare_tab(explorer: Explorer) -> dict[str, gr.components.Component]:
    ui = {}
    with gr.Tab("Compare", elem_id="compare-tab"):
        gr.Markdown("Every fast map for the current image and class side by side (titles: the share of random "
                    "maps it beats on this image, and its Spearman ρ with leave-one-patch-out occlusion).")
        ui["compare"] = image_panel("Every map, this image", "compare", 190, show_label=False)
        ui["compare_table"] = gr.Markdown("", elem_id="compare-table")
        ui["test_set"] = gr.Markdown(explorer.evidence.test_set_markdown() if is_own(explorer.model)
                                     else NOT_AVAILABLE, elem_id="test-set")
    return ui


def _faithfulness_tab() -> dict[str, gr.components.Component]:
    ui = {}
    with gr.Tab("Faithfulness", elem_id="faithfulness-tab"):
        with gr.Row():
            ui["faith_button"] = gr.Button("Deletion / insertion curves vs. a random map", variant="primary",
                                           elem_id="faith-button")
            ui["sanity_button"] = gr.Button("Model-randomisation sanity check", elem_id="sanity-button")
        with gr.Row():
            ui["deletion"] = image_panel("Deletion", "deletion", 300, show_label=True)
            ui["insertion"] = image_panel("Insertion", "insertion", 300, show_label=True)
            with gr.Column():
                ui["auc"] = gr.Markdown(label="AUC", elem_id="auc")
                ui["sanity"] = gr.Markdown(label="sanity check", elem_id="sanity")
    return ui


def _model_tab() -> dict[str, gr.components.Component]:
    """The model as a whole (vit_core.anatomy), filled when the tab is opened (the /anatomy endpoint)."""
    ui = {}
    with gr.Tab("Model", elem_id="model-tab") as tab:
        ui["model_tab"] = tab
        ui["anatomy_info"] = gr.Markdown("", elem_id="anatomy-info")
        for pair in zip(MODEL_FIGURES[::2], MODEL_FIGURES[1::2]):
            with gr.Row(equal_height=False):
                for figure in pair:
                    with gr.Column(min_width=300):
                        gr.Markdown(f"**{figure.label}**")  # above, not over the figure's own title
                        ui[figure.name] = gr.Image(label=figure.label, show_label=False, format="png",
                                                   interactive=False, height=300, buttons=["download", "fullscreen"],
                                                   elem_id=figure.name.replace("_", "-"))
    return ui


def _export_tab() -> dict[str, gr.components.Component]:
    ui = {}
    with gr.Tab("Export", elem_id="export-tab"):
        ui["export_button"] = gr.Button("Export PNGs + .npz of the current explanation and the model's figures",
                                        elem_id="export-button")
        ui["export_files"] = gr.File(label="Files", file_count="multiple", interactive=False,
                                     elem_id="export-files")
    return ui


def layout(model: ViTClassifier, examples: list[Path], explorer: Explorer,
           walkthrough: bool = False) -> dict[str, gr.components.Component]:
    """The page, inside an open gr.Blocks; returns its components by name. At 1280×720 the upload,
    the prediction, the chosen map and the attention matrices fit without scrolling; on a phone
    (CSS) the upload, the prediction and the main map come first."""
    ui = {"session": gr.State(None, time_to_live=3600)}
    ui["header"] = gr.Markdown(explorer.header()["header"], elem_id="header")
    with gr.Row(equal_height=False, elem_id="main-row"):
        with gr.Column(scale=1, min_width=220, elem_id="side"):
            ui.update(_inputs(model, examples))
        with gr.Column(scale=5, min_width=300, elem_id="stage"):
            with gr.Row(equal_height=True, elem_id="controls"):
                ui.update(_controls(model, explorer.defaults.method))
            ui.update(_readout())
            with gr.Row(equal_height=False, elem_id="maps"):
                ui.update(_panels("top", MAP_ROW))
            with gr.Row(equal_height=False, elem_id="attention"):
                with gr.Column(scale=3, min_width=300):
                    ui.update(_panels("right"))
                ui.update(_panels("left"))
    with gr.Tabs(elem_id="tabs"):
        ui.update(walkthrough_tab(model, examples, land=walkthrough))
        ui.update(_compare_tab(explorer))
        ui.update(_faithfulness_tab())
        ui.update(_model_tab())
        ui.update(_export_tab())
    # Hidden: /predict writes all class probabilities here (the visible label keeps the top 5);
    # /explain, the upload's answer for scripts, is this button's; /explain_arrays answers in JSON.
    ui["predict_button"], ui["all_probs"] = gr.Button(visible=False), gr.Label(visible=False)
    ui["explain_button"] = gr.Button(visible=False)
    ui["arrays_button"], ui["arrays"] = gr.Button(visible=False), gr.JSON(visible=False)
    return ui


# ------------------------------------------------------------------------------------------------
# The events

def wire(ui: dict[str, gr.components.Component], explorer: Explorer, workers: int, demo: gr.Blocks) -> None:
    """Connects the handlers to the page. The fast handlers share `workers` threads (torch runs one
    thread per request, so two requests use both cores of a small machine); the trust figures,
    chained after the panels so they never delay them, have as many of their own, and the slow
    buttons one worker. With one worker, one session's clicks and slider moves are also drawn
    strictly in order."""
    fast = dict(concurrency_id="fast", concurrency_limit=workers)
    slow = dict(concurrency_id="slow", concurrency_limit=1)
    files = panel_files()
    out = functools.partial(answering, ui=ui, files=files)
    settings = {name: ui[name] for name in SETTING_CONTROLS}  # handlers get them as keywords
    with_patch = {**settings, "patch": ui["patch"]}
    session, image_in = [ui["session"]], ui["image_in"]
    explained = [*(ui[p.name] for p in PANELS), ui["session"], ui["patch"]]
    redrawn = [*(ui[p.name] for p in REDRAWN), ui["session"]]
    cleared = dict(fn=out(Explorer.new_image), outputs=[ui[name] for name in FAITHFULNESS_OUTPUTS + TRUST_OUTPUTS],
                   api_visibility="private")
    trusted = dict(fn=out(explorer.trust), inputs=session, inputs_kwargs=settings,
                   outputs=[ui[name] for name in TRUST_OUTPUTS], show_progress="hidden", concurrency_id="trust",
                   concurrency_limit=workers)
    # The page runs the events of one trigger one after the other, in the order they are wired:
    # the panels and the header first, the trust figures (slow for a large model) after them.
    redraw = dict(fn=out(explorer.redraw), inputs=session, inputs_kwargs=with_patch, outputs=redrawn,
                  trigger_mode="always_last", **fast)
    gr.on([c.change for name, c in settings.items() if name != "method"] + [ui["patch"].input], **redraw,
          api_name="redraw", api_description=REDRAW_API, show_progress="hidden")
    # A new method may be a slow one computed on request (occlusion over every patch of a large
    # model): the panels show Gradio's progress bar, moved by the handler, while it runs.
    ui["method"].change(**redraw, api_visibility="private", show_progress="full")
    gr.on([demo.load, ui["method"].change], out(explorer.header), None, inputs_kwargs={"method": ui["method"]},
          outputs=ui["header"], api_visibility="private", show_progress="hidden")
    # Before the chained ones below (private), so the public endpoint gets the plain name /trust.
    gr.on([ui[name].change for name in ("method", "target", "head_fusion", "discard_ratio")], **trusted,
          api_name="trust", trigger_mode="always_last")
    wt = _wire_new_images(ui, explorer, out, settings, explained, cleared, trusted, fast)
    # Scripts get the same panels in one answer: gradio_client would download every step's pictures.
    ui["explain_button"].click(out(explorer.explain), [image_in], inputs_kwargs=settings, outputs=explained,
                               api_name="explain", preprocess=False, **fast)
    for panel in (p for p in PANELS if p.click is not None):
        ui[panel.name].select(out(explorer.click_on(panel.name)), session, inputs_kwargs=settings,
                              outputs=[*redrawn, ui["patch"]], api_visibility="private", show_progress="hidden",
                              **fast)
    _wire_tabs(ui, explorer, out, settings, with_patch, slow, export=wt.export)
    ui["predict_button"].click(out(explorer.predict), [image_in], ui["all_probs"], api_name="predict",
                               preprocess=False, **fast)
    ui["arrays_button"].click(out(explorer.explain_arrays), [image_in], [ui["arrays"], ui["session"]],
                              inputs_kwargs=settings, api_name="explain_arrays", preprocess=False, **fast)


def _wire_new_images(ui, explorer: Explorer, out, settings, explained, cleared, trusted, fast) -> Walkthrough:
    """A new image (uploaded or picked, in the Explorer or in the Walkthrough tab): the panels, then
    the Walkthrough (demo.walkthrough: its numbers computed beside the panels after the first ones,
    its what-if curves completed after) and, apart, the trust figures. preprocess=False: the
    handler gets the raw upload and decodes it itself, so corrupt or hostile files end in a clear
    gr.Error instead of a failure inside Gradio's image decoding."""
    image_in, wt = ui["image_in"], Walkthrough(explorer)
    shown = [*explained, ui["walkthrough"]]
    common = dict(inputs_kwargs=settings, api_visibility="private", show_progress="minimal", **fast)
    new_images = [
        image_in.upload(out(wt.explaining(explorer.explain_steps)), [image_in], outputs=shown, preprocess=False,
                        **common),
        ui["wt_upload"].upload(out(wt.explaining(own_upload(explorer))), [ui["wt_upload"]],
                               outputs=[image_in, *shown], preprocess=False, **common),
        *(gallery.select(out(wt.explaining(explorer.example)), None, outputs=[image_in, *shown], **common)
          for gallery in (ui["gallery"], ui["wt_gallery"]))]
    cleared_image = image_in.clear(out(Explorer.clear), None, explained, api_visibility="private")
    wire_walkthrough(ui, wt, out, new_images=[*new_images, cleared_image], fast=fast)
    for event in new_images:
        event.success(**cleared).then(**trusted, api_visibility="private").then(**wt.after_trust)
    return wt


def _wire_tabs(ui, explorer: Explorer, out, settings, with_patch, slow, export) -> None:
    session = [ui["session"]]
    ui["faith_button"].click(out(explorer.faithfulness), session, inputs_kwargs=settings,
                             outputs=[ui["deletion"], ui["insertion"], ui["auc"]], api_name="faithfulness", **slow)
    ui["sanity_button"].click(out(explorer.sanity_check), session, inputs_kwargs=settings, outputs=ui["sanity"],
                              api_name="sanity_check", **slow)
    ui["export_button"].click(out(export), session, inputs_kwargs=with_patch, outputs=ui["export_files"],
                              api_name="export", **slow)
    ui["model_tab"].select(out(explorer.anatomy), None, [ui[f.name] for f in MODEL_FIGURES] + [ui["anatomy_info"]],
                           api_name="anatomy", show_progress="hidden")


def build_demo(model: ViTClassifier, workers: int = 2, evidence: Evidence | None = None,
               walkthrough: bool = False) -> gr.Blocks:
    """The explorer around one loaded model, `workers` requests at a time, telling what `evidence`
    knows about its checkpoint (default: its anatomy from the example images, nothing measured).
    `walkthrough`: the page opens scrolled to the Walkthrough (as ?tab=walkthrough does).
    Launch with `launch(demo)`."""
    examples = sorted(EXAMPLES_DIR.glob("*.jpg")) + sorted(EXAMPLES_DIR.glob("*.png"))
    with gr.Blocks(title="ViT attention explorer", fill_width=True, analytics_enabled=False,
                   delete_cache=GRADIO_DELETE_CACHE) as demo:
        explorer = Explorer(model, examples, evidence or Evidence.load(model, None, anatomy_examples(model)),
                            share=lambda: (getattr(demo, "share_requested", False), demo.share_url))
        wire(layout(model, examples, explorer, walkthrough), explorer, workers, demo)
    return demo


# ------------------------------------------------------------------------------------------------
# Loading, launching, command line

def warm_up(model: ViTClassifier) -> None:
    """One explanation and one drawing of every panel, so the first user does not pay for them."""
    blank = Image.new("RGB", (model.image_size, model.image_size), (128, 128, 128))
    draw(view(model, analyze(model, blank), Explorer(model).defaults.checked(model)))


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
           block: bool = True, quiet: bool = False):
    """demo.launch with this app's settings: upload cap, examples servable, nothing phoning home,
    a bounded number of sessions kept, and a sweep that keeps Gradio's cache folder within its
    budget (`demo.serving.CacheKeeper`, until the demo closes). With share and no route to the
    share server, serves locally. With share, this prints the outcome itself in one line or a banner
    (`share_message`; Gradio's own hint "set share=True" would read as if --share had been ignored)
    and the page's header shows it (`demo.share_requested`, `demo.share_url`). OSError when the
    port cannot be bound (`busy_port_message` says what to do)."""
    demo.share_requested = share
    if share and not host_reachable(SHARE_SERVER, 443, timeout=3.0):
        share = False
    CacheKeeper(demo, panel_files()).start()
    result = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                         quiet=quiet or demo.share_requested, max_file_size=MAX_FILE_SIZE,
                         allowed_paths=[str(EXAMPLES_DIR)], css=CSS + WALKTHROUGH_CSS, show_error=False, run_history=False,
                         enable_monitoring=False, ssr_mode=False, state_session_capacity=SESSIONS_KEPT,
                         max_threads=16)
    if demo.share_requested and not quiet:
        print(share_message(demo.local_url, demo.share_url), flush=True)
    if block:
        demo.block_thread()
    return result


def share_message(local_url: str, share_url: str | None) -> str:
    """What `--share` became, for the terminal."""
    if share_url:
        rule = "=" * (len(share_url) + 16)
        return f"{rule}\n  Public link:  {share_url}\n{rule}\n(also on {local_url}; the page header shows the link)"
    return (f"* Running on local URL:  {local_url} (--share: no public link is available: Gradio's share server "
            "cannot be reached, so the app serves locally only)")


def port_free(host: str, port: int) -> bool:
    """Whether the server could bind `port` on `host` now (as uvicorn binds: address reuse on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno != errno.EADDRINUSE  # another failure (a bad host) is launch's to report
    return True


def busy_port_message(host: str, port: int) -> str:
    """One line for a port another process holds, naming a free one nearby if there is one."""
    free = next((p for p in range(port + 1, min(port + 100, 65536)) if port_free(host, p)), None)
    other = f"--port {free} (free now)" if free is not None else "another --port"
    return f"port {port} is busy; pass {other}, or stop what is serving on {port}"


def anatomy_examples(model) -> Path | None:
    """The images the Model tab's anatomy is computed from; None (no anatomy) for other models."""
    return EXAMPLES_DIR if is_own(model) else None


def checkpoint_folder(source: str) -> Path | None:
    """The local folder `load_model(source, search_dirs=[ROOT])` read, where eval.json,
    faithfulness.json and anatomy.npz may lie beside the weights; None for a Hub repo id."""
    return next((folder for folder in candidate_folders(source, [ROOT]) if folder.is_dir()), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python demo/app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="checkpoint directory or Hugging Face Hub repo id (default: the shipped one); "
                             "also a timm ViT: a folder saved by timm's save_for_hf, or timm/<name>")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to bind; 0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve on a public *.gradio.live link")
    parser.add_argument("--walkthrough", action="store_true",
                        help="open the page on the Walkthrough (a shared link can also add ?tab=walkthrough)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("VIT_EXPLORER_WORKERS", 2)),
                        help="requests handled at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("VIT_EXPLORER_THREADS", 1)),
                        help="torch threads per request (default 1: the model is small and requests "
                             "run side by side, so intra-op threads only contend)")
    return parser.parse_args(argv)


def missing_default_checkpoint(source: str) -> str | None:
    """An install without a clone beside it (a wheel) has no shipped weights to fall back on: say
    so at once, instead of a loader error about a folder the user never named."""
    if source != str(DEFAULT_CHECKPOINT) or DEFAULT_CHECKPOINT.is_dir():
        return None
    return (f"no shipped checkpoint beside the app (installed without the repository's checkpoints/ "
            f"folder): pass --checkpoint DIR (a checkpoint folder, e.g. checkpoints/vit-cifar10 of a clone) "
            f"or --checkpoint USER/REPO (a Hugging Face Hub repo id)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_default_checkpoint(args.checkpoint)
    if missing:
        return fail(missing)
    if not port_free(args.host, args.port):  # before minutes of loading, not after
        return fail(busy_port_message(args.host, args.port))
    limit_heap_arenas()  # before the server starts its threads
    torch.set_num_threads(max(1, args.threads))
    try:
        model = load_model(args.checkpoint, search_dirs=[ROOT])  # relative paths: cwd, then the repo
    except CheckpointError as err:
        return fail(err)
    warm_up(model)
    evidence = Evidence.load(model, checkpoint_folder(args.checkpoint), anatomy_examples(model))
    demo = build_demo(model, workers=max(1, args.workers), evidence=evidence, walkthrough=args.walkthrough)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as error:  # taken while the model loaded, or a host that cannot be served on
        demo.close()
        return fail(busy_port_message(args.host, args.port) if not port_free(args.host, args.port)
                    else f"cannot serve on {args.host}:{args.port}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
