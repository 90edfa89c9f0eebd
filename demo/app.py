"""ViT attention explorer: a Gradio Blocks app over `vit_core`.

    python demo/app.py                        # the shipped checkpoint, fully offline
    python demo/app.py --checkpoint user/repo # weights from the Hugging Face Hub
    python demo/app.py --host 0.0.0.0 --port 7860 --share

Layout and thin handlers only: every number drawn here comes from `vit_core` (model, rollout,
viz, faithfulness). An upload is run through the model once (one forward + one backward pass);
the Explanation is cached in the session's `gr.State`, and every setting (method, head fusion,
discard ratio, opacity, layer, head, selected patch) redraws from that cache. The only setting that
needs the model again is the class explained by gradient rollout, and each class is computed once
per image.

Named endpoints for `gradio_client`: /predict, /explain, /redraw, /faithfulness, /sanity_check,
/export (see docs/app_readme_snippets.md).
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
import atexit
import dataclasses
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import gradio as gr
import gradio.utils as gr_utils
import numpy as np
import torch
from PIL import Image

DEMO_DIR = Path(__file__).resolve().parent
ROOT = DEMO_DIR.parent
if str(ROOT) not in sys.path:  # `python demo/app.py` from anywhere finds vit_core
    sys.path.insert(0, str(ROOT))

from vit_core import CheckpointError, ViTClassifier, load_checkpoint, preprocess, to_model_pixels  # noqa: E402
from vit_core import faithfulness as faith  # noqa: E402
from vit_core import viz  # noqa: E402
from vit_core.images import FRAMES_KEY, MAX_FILE_BYTES, ImageError, read_image  # noqa: E402
from vit_core.rollout import (  # noqa: E402
    HEAD_FUSIONS, Explanation, explain, fuse_heads, token_map)

EXAMPLES_DIR = DEMO_DIR / "examples"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "vit-cifar10"

# Uploads over vit_core's file-size limit are refused by Gradio at upload (HTTP 413), and again by
# read_image for files that reach a handler another way; its pixel limit is checked from the header.
MAX_FILE_SIZE = f"{MAX_FILE_BYTES // 2**20}mb"

METHODS = {  # value -> label
    "rollout": "rollout",
    "grad_rollout": "gradient rollout",
    "last_layer": "last-layer attention",
}
PREDICTED = "predicted"
HEAD_MEAN = "all (mean)"
SCALE = 8  # screen pixels per image pixel in the large panels (32 px -> 256 px)
GAP = 2    # white gap between patches in the patch grid


# ------------------------------------------------------------------------------------------------
# Settings and the cached per-image session

@dataclasses.dataclass(frozen=True)
class Settings:
    """What the controls say. `layer` is 1-based as shown; 0 means the last layer. `patch` -1
    means no patch selected. `head` is HEAD_MEAN or "head k" (1-based)."""

    method: str = "rollout"
    target: str = PREDICTED
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    opacity: float = 0.5
    layer: int = 0
    head: str = HEAD_MEAN
    patch: int = -1

    def checked(self, model: ViTClassifier) -> "Settings":
        """Validated copy with defaults resolved; bad values raise gr.Error with the allowed ones."""
        if self.method not in METHODS:
            raise gr.Error(f"Unknown method {self.method!r}; choose one of {list(METHODS)}.")
        if self.target != PREDICTED and self.target not in model.class_names:
            raise gr.Error(f"Unknown class {self.target!r}; choose {PREDICTED!r} or one of {model.class_names}.")
        if self.head_fusion not in HEAD_FUSIONS:
            raise gr.Error(f"Unknown head fusion {self.head_fusion!r}; choose one of {list(HEAD_FUSIONS)}.")
        discard, opacity = _number(self.discard_ratio, "discard ratio"), _number(self.opacity, "opacity")
        if not 0.0 <= discard < 1.0:
            raise gr.Error(f"Discard ratio must be in [0, 1), got {discard}.")
        if not 0.0 <= opacity <= 1.0:
            raise gr.Error(f"Opacity must be in [0, 1], got {opacity}.")
        layer = int(_number(self.layer, "layer")) or model.depth
        if not 1 <= layer <= model.depth:
            raise gr.Error(f"Layer must be in 1..{model.depth}, got {layer}.")
        if self.head not in head_choices(model):
            raise gr.Error(f"Unknown head {self.head!r}; choose one of {head_choices(model)}.")
        patch = int(_number(-1 if self.patch is None else self.patch, "patch"))
        if not -1 <= patch < model.grid_size**2:
            raise gr.Error(f"Patch must be -1 (none) or in 0..{model.grid_size**2 - 1}, got {patch}.")
        return dataclasses.replace(self, discard_ratio=discard, opacity=opacity, layer=layer, patch=patch)

    @property
    def head_index(self) -> int | None:
        return None if self.head == HEAD_MEAN else int(self.head.split()[-1]) - 1


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(number):
        raise gr.Error(f"{name} must be finite, got {value!r}.")
    return number


def head_choices(model: ViTClassifier) -> list[str]:
    return [HEAD_MEAN] + [f"head {h + 1}" for h in range(model.n_heads)]


@dataclasses.dataclass
class Session:
    """One image's cached analysis: the model ran once (mean fusion, no discard); everything
    the settings change is recomputed from `explanation.attentions`."""

    explanation: Explanation              # batch of one
    pixels: Image.Image                   # what the model sees, image_size x image_size RGB
    inputs: torch.Tensor                  # [1, 3, S, S] normalised, for re-targeting and faithfulness
    name: str                             # file stem, for export names and the true label
    notes: list[str]                      # about decoding: resized from, first frame of, ...
    grad_maps: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # class -> [1, g, g]

    @property
    def predicted(self) -> int:
        return int(self.explanation.target[0])


# ------------------------------------------------------------------------------------------------
# Reading uploads: every failure becomes a gr.Error with a sentence a user can act on

def read_upload(path: str | os.PathLike | None) -> tuple[Image.Image, list[str]]:
    """An uploaded file -> RGB image (`vit_core.images.read_image`: first frame of an animation,
    upright, transparency on white, size limits) and notes about its decoding. Empty, oversized,
    non-image, truncated and decompression-bomb files raise gr.Error with the reader's message."""
    if path is None or str(path) == "":
        raise gr.Error("No image: upload one or pick an example.")
    try:
        image = read_image(path, max_bytes=MAX_FILE_BYTES)
    except ImageError as error:
        raise gr.Error(str(error)) from None
    frames = image.info.get(FRAMES_KEY, 1)
    return image, [f"animated image: first of {frames} frames used"] if frames > 1 else []


def analyze(model: ViTClassifier, image: Image.Image, name: str = "image",
            notes: list[str] | None = None) -> Session:
    """The one model run per image: probabilities, attentions, rollouts (vit_core.explain)."""
    notes = list(notes or [])
    if image.size != (model.image_size, model.image_size):
        notes.append(f"resized from {image.width}×{image.height} to {model.image_size}×{model.image_size}")
    pixels = to_model_pixels(image, model.image_size)
    inputs = preprocess(pixels, model)
    explanation = explain(model, inputs)
    session = Session(explanation=explanation, pixels=pixels, inputs=inputs, name=name, notes=notes)
    session.grad_maps[session.predicted] = explanation.grad_rollout
    return session


def predict_probs(model: ViTClassifier, image: Image.Image) -> dict[str, float]:
    """Class probabilities for one image (forward pass only), as a gr.Label value."""
    with torch.inference_mode():
        probs = model(preprocess(image, model)).softmax(dim=-1)[0]
    return {name: float(p) for name, p in zip(model.class_names, probs)}


# ------------------------------------------------------------------------------------------------
# From the cache to the current settings, and to pictures

def target_index(model: ViTClassifier, session: Session, settings: Settings) -> int:
    return session.predicted if settings.target == PREDICTED else model.class_names.index(settings.target)


def current_explanation(model: ViTClassifier, session: Session, settings: Settings) -> Explanation:
    """The session's Explanation as the settings ask for it, without a forward pass: rollout and
    per-layer maps recomputed from the cached attentions for this head fusion and discard ratio;
    the gradient rollout of the chosen class (computed once per class, with the model)."""
    target = target_index(model, session, settings)
    if target not in session.grad_maps:
        session.grad_maps[target] = explain(model, session.inputs, target=target).grad_rollout
    reconfigured = session.explanation.with_settings(settings.head_fusion, settings.discard_ratio)
    return dataclasses.replace(reconfigured, target=torch.tensor([target]), grad_rollout=session.grad_maps[target])


@dataclasses.dataclass
class Panels:
    model_view: Image.Image
    patch_grid: Image.Image
    overlay: Image.Image
    patch_attention: Image.Image
    probabilities: dict[str, float]
    matrices: Image.Image
    matrix: Image.Image
    layer_strip: Image.Image
    info: str


def render(model: ViTClassifier, session: Session, settings: Settings) -> Panels:
    """Every panel for the current settings, drawn by vit_core.viz from the cached explanation."""
    expl = current_explanation(model, session, settings)
    patch = settings.patch if settings.patch >= 0 else None
    token = 0 if patch is None else patch + 1
    highlight_token = None if patch is None else token  # row/column outlined in the matrices
    layer, head = settings.layer - 1, settings.head_index
    attentions = expl.attentions[0]                     # [L, H, T, T]
    if head is None:
        per_layer = fuse_heads(attentions, "mean")      # [L, T, T]
    else:
        per_layer = attentions[:, head]
    head_text = "mean of heads" if head is None else f"head {head + 1}"
    token_text = "CLS" if patch is None else f"patch {patch}"
    method_map = expl.maps()[settings.method][0]
    probs = expl.probs[0]
    names = model.class_names
    target = int(expl.target[0])

    info = [f"**Prediction:** {names[session.predicted]} ({float(probs[session.predicted]):.1%})"]
    true_label = example_label(session.name, names)
    if true_label:
        info.append(f"**true label:** {true_label}")
    if settings.method == "grad_rollout":
        info.append(f"**explaining:** {names[target]}")
    info.append(f"**token:** {token_text} — where it attends in layer {settings.layer}, {head_text}")
    info.extend(session.notes)

    return Panels(
        model_view=viz.upscale_nearest(session.pixels, SCALE),
        patch_grid=viz.patch_grid(session.pixels, model.patch_size, scale=SCALE, gap=GAP, highlight=patch),
        overlay=viz.overlay_map(session.pixels, method_map, alpha=settings.opacity, scale=SCALE, highlight=patch),
        patch_attention=viz.overlay_map(session.pixels, token_map(attentions, token, layer, head),
                                        alpha=settings.opacity, scale=SCALE, highlight=patch),
        probabilities={name: float(p) for name, p in zip(names, probs)},
        matrices=viz.attention_matrix_grid(per_layer, cell=2, highlight_token=highlight_token),
        matrix=viz.attention_matrix_image(per_layer[layer], title=f"layer {settings.layer}, {head_text}",
                                          highlight_token=highlight_token, cell=4),
        layer_strip=viz.map_strip(expl.layer_maps[0], image=session.pixels, alpha=settings.opacity, scale=4),
        info=" · ".join(info),
    )


def example_label(name: str, class_names: list[str]) -> str | None:
    """The true label of a shipped example, from its file name (`cat_0003` -> "cat")."""
    stem = name.rsplit("_", 1)[0]
    return stem if stem in class_names and name != stem else None


def clicked_patch(model: ViTClassifier, panel: str, x: float, y: float) -> int | None:
    """Pixel (x, y) clicked on a panel -> patch index (None in a gap of the patch grid)."""
    if panel == "patch_grid":
        return viz.patch_grid_index(x, y, model.grid_size, model.patch_size, scale=SCALE, gap=GAP)
    side = model.image_size * SCALE
    return viz.patch_index_at(x, y, side, side, model.grid_size)


# ------------------------------------------------------------------------------------------------
# Faithfulness, sanity check, export

def faithfulness(model: ViTClassifier, session: Session, settings: Settings, steps: int | None = None):
    """Deletion and insertion curves of the current map against a random map, with AUCs."""
    expl = current_explanation(model, session, settings)
    grid = model.grid_size
    maps = {settings.method: expl.maps()[settings.method], "random": faith.random_maps(1, grid, seed=0)}
    results = faith.deletion_insertion(model, session.inputs, maps, expl.target, steps=steps)
    target_name = model.class_names[int(expl.target[0])]
    aucs = {mode: {k: _scalar(v[f"{mode}_auc"]) for k, v in results.items()} for mode in ("deletion", "insertion")}
    deletion = viz.plot_curves({k: np.asarray(v["deletion"]) for k, v in results.items()},
                               title=f"deletion (lower is better), class {target_name}", aucs=aucs["deletion"])
    insertion = viz.plot_curves({k: np.asarray(v["insertion"]) for k, v in results.items()},
                                title=f"insertion (higher is better), class {target_name}", aucs=aucs["insertion"])
    rows = ["| map | deletion AUC ↓ | insertion AUC ↑ |", "|---|---|---|"]
    for name, result in results.items():
        rows.append(f"| {METHODS.get(name, name)} | {_scalar(result['deletion_auc']):.3f} | "
                    f"{_scalar(result['insertion_auc']):.3f} |")
    return deletion, insertion, "\n".join(rows)


def sanity_check(model: ViTClassifier, session: Session, settings: Settings) -> str:
    """Model-randomisation test (Adebayo et al.): re-initialise layers from the top down and report
    the rank correlation of the map with the trained model's map."""
    expl = current_explanation(model, session, settings)
    stages = faith.randomization_sanity(
        model, session.inputs, method=settings.method, target=expl.target,
        head_fusion=settings.head_fusion, discard_ratio=settings.discard_ratio, seed=0)
    rows = [f"Model-randomisation check for **{METHODS[settings.method]}**: Spearman correlation between "
            "the trained model's map and the map after randomising the weights cumulatively from the "
            "top. A faithful method's maps should decorrelate (values near 0).", "",
            "| randomised | Spearman ρ |", "|---|---|"]
    rows += [f"| {s['stage']} | {_scalar(s['spearman']):.3f} |" for s in stages]
    return "\n".join(rows)


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).mean())


def export_files(model: ViTClassifier, session: Session, settings: Settings, out_dir: Path) -> list[str]:
    """The panels as PNGs and the current explanation as an .npz, written into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = render(model, session, settings)
    expl = current_explanation(model, session, settings)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in session.name)[:40] or "image"
    files = {
        "model_view": panels.model_view, "patch_grid": panels.patch_grid,
        f"overlay_{settings.method}": panels.overlay, "token_attention": panels.patch_attention,
        "attention_matrices": panels.matrices, f"attention_layer{settings.layer}": panels.matrix,
        "cls_per_layer": panels.layer_strip,
    }
    paths = []
    for name, image in files.items():
        path = out_dir / f"{stem}_{name}.png"
        image.save(path)
        paths.append(str(path))
    arrays = expl.as_numpy()
    arrays.update(method=np.array(settings.method), explained_map=expl.maps()[settings.method].numpy(),
                  class_names=np.array(model.class_names), image=np.asarray(session.pixels))
    npz = out_dir / f"{stem}_explanation.npz"
    np.savez_compressed(npz, **arrays)
    paths.append(str(npz))
    return paths


# ------------------------------------------------------------------------------------------------
# The Blocks app

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
"""


class PanelFiles:
    """Writes panels as PNG files straight into Gradio's cache folder, for Gradio to serve.

    Returning a PIL image would make Gradio encode it at PNG level 6 and hash it; level 1 is about
    4x faster for ~10% more bytes, and a file already in the cache is served as is (Gradio tracks
    it and `delete_cache` removes it later). Names are unique, so concurrent requests never write
    the same file. Files Gradio never picked up (a cancelled event) are pruned after `max_age` s."""

    def __init__(self, max_age: float = 7200.0):
        self.dir = Path(gr_utils.get_upload_folder()) / "vit-explorer-panels"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_age = max_age
        self._written = 0

    def __call__(self, image: Image.Image) -> str:
        path = self.dir / f"{uuid.uuid4().hex}.png"
        image.save(path, format="png", compress_level=1)
        self._written += 1
        if self._written % 512 == 0:
            self.prune()
        return str(path)

    def prune(self) -> None:
        cutoff = time.time() - self.max_age
        for old in self.dir.glob("*.png"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except FileNotFoundError:
                pass


def upload_path(payload) -> str | None:
    """The server-side path of an uploaded file from a raw (not preprocessed) gr.Image payload."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", payload)


def upload_name(payload) -> str:
    name = payload.get("orig_name") if isinstance(payload, dict) else None
    return Path(name or upload_path(payload) or "image").stem


def panel(label: str, elem_id: str, height: int, clickable: bool = False, show_label: bool | None = None,
          **kwargs) -> gr.Image:
    """An output image panel. Clickable panels (a click selects a patch) show their label and may be
    downloaded and are drawn crisp (nearest neighbour); the wide, self-titled ones only go full
    screen, so fewer buttons cover their titles."""
    return gr.Image(label=label, show_label=clickable if show_label is None else show_label, format="png",
                    interactive=False, height=height, elem_id=elem_id,
                    buttons=["download", "fullscreen"] if clickable else ["fullscreen"],
                    elem_classes=["pixelated", "clickable"] if clickable else None, **kwargs)


def build_demo(model: ViTClassifier, workers: int = 2) -> gr.Blocks:
    """The explorer around one loaded model, `workers` requests at a time. Launch with `launch(demo)`."""
    model.eval()
    examples = sorted(EXAMPLES_DIR.glob("*.jpg")) + sorted(EXAMPLES_DIR.glob("*.png"))
    gallery_items = [(str(p), example_label(p.stem, model.class_names) or p.stem) for p in examples]
    class_choices = [PREDICTED] + list(model.class_names)

    with gr.Blocks(title="ViT attention explorer", fill_width=True, analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        session = gr.State(None, time_to_live=3600)
        gr.Markdown(f"**ViT attention explorer** · {model.image_size}×{model.image_size} images in "
                    f"{model.grid_size}×{model.grid_size} patches of {model.patch_size} px · {model.depth} "
                    f"layers × {model.n_heads} heads · classes: {', '.join(model.class_names)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=250):
                image_in = gr.Image(label="Upload an image (any size)", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard"], height=150, elem_id="image-in")
                gallery = gr.Gallery(gallery_items, label="…or pick a CIFAR-10 test image (true label)",
                                     columns=3, height=600, allow_preview=False, interactive=False,
                                     object_fit="contain", elem_id="examples", elem_classes="pixelated")
            with gr.Column(scale=5):
                with gr.Row(equal_height=True, elem_id="controls"):
                    method = gr.Dropdown([(v, k) for k, v in METHODS.items()], value="rollout",
                                         label="Explanation", elem_id="method", min_width=170)
                    target = gr.Dropdown(class_choices, value=PREDICTED, label="Target class",
                                         elem_id="target", min_width=120)
                    head_fusion = gr.Dropdown(list(HEAD_FUSIONS), value="mean", label="Head fusion",
                                              elem_id="head-fusion", min_width=90)
                    discard = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Discard ratio",
                                        elem_id="discard", min_width=120)
                    opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="opacity",
                                        min_width=120)
                    layer = gr.Slider(1, model.depth, value=model.depth, step=1, label="Layer",
                                      elem_id="layer", min_width=120)
                    head = gr.Dropdown(head_choices(model), value=HEAD_MEAN, label="Head", elem_id="head",
                                       min_width=110)
                    patch = gr.Number(-1, precision=0, label="Patch (-1: CLS)", minimum=-1,
                                      maximum=model.grid_size**2 - 1, elem_id="patch", min_width=100)
                info = gr.Markdown("Upload an image or pick an example.", label="summary", elem_id="info")
                with gr.Row(equal_height=False):
                    model_view = panel("As the model sees it", "model-view", 250, clickable=True)
                    patch_grid = panel("Patches (click one)", "patch-grid", 250, clickable=True)
                    overlay = panel("CLS explanation", "overlay", 250, clickable=True)
                    patch_attention = panel("Token attention", "token-attention", 250, clickable=True)
                    top5 = gr.Label(num_top_classes=5, label="Top-5 classes", elem_id="top5", min_width=170)
                with gr.Row(equal_height=False):
                    matrix = panel("Attention matrix", "matrix", 320, scale=2, min_width=300)
                    with gr.Column(scale=3):
                        matrices = panel("Every layer's attention matrix", "matrices", 150)
                        layer_strip = panel("CLS attention per layer (heads fused)", "layer-strip", 150)
        with gr.Tab("Faithfulness"):
            with gr.Row():
                faith_button = gr.Button("Deletion / insertion curves vs. a random map", variant="primary",
                                         elem_id="faith-button")
                sanity_button = gr.Button("Model-randomisation sanity check", elem_id="sanity-button")
            with gr.Row():
                deletion_plot = panel("Deletion", "deletion", 300, show_label=True)
                insertion_plot = panel("Insertion", "insertion", 300, show_label=True)
                with gr.Column():
                    auc_table = gr.Markdown(label="AUC", elem_id="auc")
                    sanity_table = gr.Markdown(label="sanity check", elem_id="sanity")
        with gr.Tab("Export"):
            export_button = gr.Button("Export PNGs + .npz of the current explanation", elem_id="export-button")
            export_out = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")
        # Hidden: /predict writes all class probabilities here (the visible label keeps the top 5).
        predict_button = gr.Button(visible=False)
        all_probs = gr.Label(visible=False)

        settings_inputs = [method, target, head_fusion, discard, opacity, layer, head]
        # What a new image fills, and the subset a settings change or a click redraws.
        explain_outputs = [model_view, patch_grid, overlay, patch_attention, top5, matrices, matrix,
                           layer_strip, info, session, patch]
        redraw_outputs = [patch_grid, overlay, patch_attention, matrices, matrix, layer_strip, info, session]
        png = PanelFiles()

        def redraw_values(state: Session, panels: Panels) -> list:
            return [png(panels.patch_grid), png(panels.overlay), png(panels.patch_attention),
                    png(panels.matrices), png(panels.matrix), png(panels.layer_strip), panels.info, state]

        def settings_of(*values) -> Settings:
            return Settings(*values).checked(model)

        def on_explain(image, method="rollout", target=PREDICTED, head_fusion="mean", discard_ratio=0.0,
                       opacity=0.5, layer=0, head=HEAD_MEAN):
            values = [method, target, head_fusion, discard_ratio, opacity, layer, head]
            # Parameters an API caller sends as None get the control defaults.
            defaults = dataclasses.astuple(Settings())
            settings = settings_of(*[d if v is None else v for v, d in zip(values, defaults)])
            picture, notes = read_upload(upload_path(image))
            state = analyze(model, picture, name=upload_name(image), notes=notes)
            panels = render(model, state, settings)
            return [png(panels.model_view), png(panels.patch_grid), png(panels.overlay),
                    png(panels.patch_attention), panels.probabilities, png(panels.matrices),
                    png(panels.matrix), png(panels.layer_strip), panels.info, state, -1]

        def on_example(evt: gr.SelectData, *values):
            path = examples[evt.index]
            return [str(path), *on_explain({"path": str(path), "orig_name": path.name}, *values)]

        def on_redraw(state, method, target, head_fusion, discard_ratio, opacity, layer, head, patch):
            if state is None:  # nothing uploaded yet: leave the empty panels as they are
                return [gr.skip()] * len(redraw_outputs)
            settings = settings_of(method, target, head_fusion, discard_ratio, opacity, layer, head, patch)
            return redraw_values(state, render(model, state, settings))

        def on_click(panel_name):
            def handler(evt: gr.SelectData, state, *values):
                if state is None or not isinstance(evt.index, (list, tuple)):
                    return [gr.skip()] * (len(redraw_outputs) + 1)
                index = clicked_patch(model, panel_name, *evt.index[:2])
                settings = dataclasses.replace(settings_of(*values), patch=-1 if index is None else index)
                return [*redraw_values(state, render(model, state, settings)), settings.patch]
            return handler

        def on_predict(image):
            picture, _ = read_upload(upload_path(image))
            return predict_probs(model, picture)

        def require(state) -> Session:
            if state is None:
                raise gr.Error("Upload an image or pick an example first.")
            return state

        def on_faithfulness(state, method, target, head_fusion, discard_ratio, opacity, layer, head):
            settings = settings_of(method, target, head_fusion, discard_ratio, opacity, layer, head)
            deletion, insertion, table = faithfulness(model, require(state), settings)
            return png(deletion), png(insertion), table

        def on_sanity(state, method, target, head_fusion, discard_ratio, opacity, layer, head):
            settings = settings_of(method, target, head_fusion, discard_ratio, opacity, layer, head)
            return sanity_check(model, require(state), settings)

        def on_export(state, method, target, head_fusion, discard_ratio, opacity, layer, head, patch):
            settings = settings_of(method, target, head_fusion, discard_ratio, opacity, layer, head, patch)
            return export_files(model, require(state), settings, _export_dir())

        def on_clear():
            return [None] * (len(explain_outputs) - 1) + [-1]

        def on_new_image():  # curves and checks of the previous image no longer apply
            return None, None, "", ""

        # The fast handlers share `workers` threads (torch runs one thread per request, so two
        # requests use both cores of a small machine); the slow buttons have a worker of their own.
        # With one worker, one session's clicks and slider moves are also drawn strictly in order.
        fast = dict(concurrency_id="fast", concurrency_limit=workers)
        slow = dict(concurrency_id="slow", concurrency_limit=1)
        faith_outputs = [deletion_plot, insertion_plot, auc_table, sanity_table]
        # preprocess=False: the handler gets the raw upload and decodes it itself, so corrupt or
        # hostile files end in a clear gr.Error instead of a failure inside Gradio's image decoding.
        image_in.upload(on_explain, [image_in, *settings_inputs], explain_outputs, api_name="explain",
                        preprocess=False, show_progress="minimal", **fast
                        ).success(on_new_image, None, faith_outputs, api_visibility="private")
        image_in.clear(on_clear, None, explain_outputs, api_visibility="private")
        gallery.select(on_example, settings_inputs, [image_in, *explain_outputs], api_visibility="private",
                       show_progress="minimal", **fast
                       ).success(on_new_image, None, faith_outputs, api_visibility="private")
        gr.on([c.change for c in settings_inputs] + [patch.input], on_redraw,
              [session, *settings_inputs, patch], redraw_outputs, api_name="redraw",
              trigger_mode="always_last", show_progress="hidden", **fast)
        for panel_name, component in [("patch_grid", patch_grid), ("image", model_view), ("image", overlay),
                                      ("image", patch_attention)]:
            component.select(on_click(panel_name), [session, *settings_inputs], [*redraw_outputs, patch],
                             api_visibility="private", show_progress="hidden", **fast)
        faith_button.click(on_faithfulness, [session, *settings_inputs],
                           [deletion_plot, insertion_plot, auc_table], api_name="faithfulness", **slow)
        sanity_button.click(on_sanity, [session, *settings_inputs], sanity_table, api_name="sanity_check",
                            **slow)
        export_button.click(on_export, [session, *settings_inputs, patch], export_out, api_name="export", **slow)
        predict_button.click(on_predict, image_in, all_probs, api_name="predict", preprocess=False, **fast)
    return demo


_EXPORT_ROOT: Path | None = None


def _export_dir() -> Path:
    """A fresh folder per export under one per-process temp dir; folders older than an hour go."""
    global _EXPORT_ROOT
    if _EXPORT_ROOT is None:
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="vit-explorer-export-"))
        atexit.register(shutil.rmtree, _EXPORT_ROOT, True)
    now = time.time()
    for old in _EXPORT_ROOT.iterdir():
        if now - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=_EXPORT_ROOT))


# ------------------------------------------------------------------------------------------------
# Loading, launching, command line

def warm_up(model: ViTClassifier) -> None:
    """One explanation and one drawing of every panel, so the first user does not pay for them."""
    blank = Image.new("RGB", (model.image_size, model.image_size), (128, 128, 128))
    render(model, analyze(model, blank), Settings().checked(model))


def share_server_reachable(timeout: float = 3.0) -> bool:
    """Whether Gradio's share server answers within `timeout` seconds (DNS included)."""
    result = []

    def probe():
        try:
            socket.create_connection(("api.gradio.app", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
           block: bool = True, quiet: bool = False):
    """demo.launch with this app's settings: upload cap, examples servable, nothing phoning home.
    With share and no route to the share server, warns and serves locally."""
    if share and not share_server_reachable():
        warnings.warn("--share: Gradio's share server is unreachable (offline?); serving locally only.",
                      stacklevel=2)
        share = False
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       quiet=quiet, max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES_DIR)],
                       css=CSS, show_error=False, run_history=False, enable_monitoring=False,
                       ssr_mode=False, state_session_capacity=500, max_threads=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="checkpoint directory or Hugging Face Hub repo id (default: the shipped one)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to bind; 0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve on a public *.gradio.live link")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("VIT_EXPLORER_WORKERS", 2)),
                        help="requests handled at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("VIT_EXPLORER_THREADS", 1)),
                        help="torch threads per request (default 1: the model is small and requests "
                             "run side by side, so intra-op threads only contend)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        model = load_checkpoint(args.checkpoint, search_dirs=[ROOT])  # relative paths: cwd, then the repo
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warm_up(model)
    launch(build_demo(model, workers=max(1, args.workers)), host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
