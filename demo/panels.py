"""The explorer's panels: one entry each in PANELS, from which everything else derives.

An entry says how to build the panel's component, where the layout puts it, how it is drawn from
a `View` (one image's cached explanation under the current settings), whether a settings change
redraws it, what an export calls its PNG and how a click on it maps to a patch. The /explain
answer is every panel in PANELS' order, then the patch; /redraw answers the redrawn ones in the
same order (README, "Scripting with gradio_client", lists both: keep it true). Adding a panel is
adding an entry; the layout places it by `place`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cached_property, partial
from typing import Any

import gradio as gr
import torch
from PIL import Image

from demo.session import PICKER_LABELS, Session, Settings, current_explanation, example_label
from vit_core import ViTClassifier, viz
from vit_core.anatomy import Anatomy
from vit_core.attribution import Progress
from vit_core.explanation import Explanation
from vit_core.methods import METHOD

SCALE = 8  # screen pixels per image pixel in the large panels (32 px -> 256 px)
GAP = 2    # white gap between patches in the patch grid
DISPLAY_SIDE = SCALE * 32  # the large panels' side in screen pixels, whatever the model's input size
# The per-layer strips' thumbnails: at most about this many pixels a side, however long the
# sequence or large the input (a 12-layer strip of a 224-px model at full size is a few megapixels
# that the page shows a few hundred pixels wide, but that must still be encoded and sent).
STRIP_SIDE = DISPLAY_SIDE // 2
MATRIX_THUMB = 160


def scale_for(model) -> int:
    """Screen pixels per image pixel: SCALE for a 32-px model, 1 for a 224-px one."""
    return max(1, DISPLAY_SIDE // model.image_size)


def matrix_cell(tokens: int, widest: int) -> int:
    """Pixels per matrix entry: `widest` for up to 80 tokens, fewer for long sequences."""
    return max(1, min(widest, widest * 80 // tokens))


def matrix_shrink(tokens: int) -> int:
    """Entries per thumbnail pixel (a side) in the matrices strip: 1 up to MATRIX_THUMB tokens."""
    return -(-tokens // MATRIX_THUMB)


def strip_picture(image: Image.Image) -> tuple[Image.Image, int]:
    """The picture and integer scale the strips' thumbnails are drawn from: a small input enlarged
    to STRIP_SIDE, a larger one reduced (box filter) by the integer factor that brings it to at
    most STRIP_SIDE."""
    if image.width <= STRIP_SIDE:
        return image, STRIP_SIDE // image.width
    return image.reduce(-(-image.width // STRIP_SIDE)), 1


@dataclasses.dataclass
class View:
    """What every panel is drawn from: one image's explanation as the settings ask for it."""

    model: ViTClassifier
    session: Session
    settings: Settings
    explanation: Explanation  # batch of one: retargeted and re-fused for `settings`

    @property
    def pixels(self) -> Image.Image:
        return self.session.pixels

    @property
    def patch(self) -> int | None:
        return self.settings.patch if self.settings.patch >= 0 else None

    @property
    def prefix(self) -> int:
        """Tokens before the patches (CLS, distillation, registers): patch i is token i + prefix."""
        return self.explanation.layout.n_prefix_tokens

    @property
    def token(self) -> int | None:
        """The followed token: the (first) explained prefix token, usually CLS, while no patch is
        chosen (None for a model that reads the mean of its patch tokens), else patch + prefix."""
        if self.patch is not None:
            return self.patch + self.prefix
        explained = self.explanation.layout.explained_tokens
        return explained[0] if explained else None

    @property
    def token_text(self) -> str:
        if self.patch is not None:
            return f"patch {self.patch}"
        return "CLS" if self.token is not None else "mean of the patch tokens"

    @property
    def scale(self) -> int:
        return scale_for(self.model)

    @property
    def highlight_token(self) -> int | None:
        """The row and column outlined in the matrices (none while following CLS)."""
        return None if self.patch is None else self.token

    @property
    def head_text(self) -> str:
        head = self.settings.head_index
        return "mean of heads" if head is None else f"head {head + 1}"

    @cached_property
    def matrices(self) -> torch.Tensor:
        """[L, T, T]: every block's attention for the chosen head, or the mean of the heads."""
        return self.explanation.head_attention(self.settings.head_index)[0]


def view(model: ViTClassifier, session: Session, settings: Settings, progress: Progress | None = None) -> View:
    return View(model, session, settings, current_explanation(model, session, settings, progress))


# ------------------------------------------------------------------------------------------------
# Drawing: each takes a View and returns the panel's value (vit_core.viz does the pictures)

def _overlay(v: View, patch_map: torch.Tensor) -> Image.Image:
    return viz.overlay_map(v.pixels, patch_map, alpha=v.settings.opacity, scale=v.scale, highlight=v.patch)


def _matrix(v: View) -> Image.Image:
    # viz labels token 0 as CLS and token i + 1 as patch i: true for one prefix token only
    return viz.attention_matrix_image(v.matrices[v.settings.layer - 1], title=f"layer {v.settings.layer}, "
                                      f"{v.head_text}", highlight_token=v.highlight_token,
                                      cell=matrix_cell(v.matrices.shape[-1], 4), labels=v.prefix == 1)


def _matrices(v: View) -> Image.Image:
    tokens = v.matrices.shape[-1]
    return viz.attention_matrix_grid(v.matrices, cell=matrix_cell(tokens, 2), highlight_token=v.highlight_token,
                                     shrink=matrix_shrink(tokens))


def _strip(v: View, maps: torch.Tensor, titles: list[str] | None = None) -> Image.Image:
    picture, scale = strip_picture(v.pixels)
    return viz.map_strip(maps, image=picture, alpha=v.settings.opacity, titles=titles, scale=scale)


def _summary(v: View) -> str:
    names, probs, predicted = v.model.class_names, v.explanation.probs[0], v.session.predicted
    info = [f"**Prediction:** {names[predicted]} ({float(probs[predicted]):.1%})"]
    true_label = example_label(v.session.name, names)
    if true_label:
        info.append(f"**true label:** {true_label}")
    if METHOD[v.settings.method].class_specific:
        info.append(f"**explaining:** {names[int(v.explanation.target[0])]}")
    info.append(f"**token:** {v.token_text} — where it attends in layer {v.settings.layer}, {v.head_text}")
    return " · ".join(info + v.session.notes)


def _token_attention(v: View) -> Image.Image:
    layer = v.settings.layer - 1
    if v.token is None:  # no CLS to follow: where the patch tokens attend on average (heads fused)
        return _overlay(v, v.explanation.layer_maps[0, layer])
    return _overlay(v, v.explanation.token_attention(v.token, layer, v.settings.head_index)[0])


def grid_patch(model: ViTClassifier, x: float, y: float) -> int | None:
    """Pixel (x, y) of the patch grid -> patch index (None in a gap)."""
    return viz.patch_grid_index(x, y, model.grid_size, model.patch_size, scale=scale_for(model), gap=GAP)


def image_patch(model: ViTClassifier, x: float, y: float) -> int | None:
    """Pixel (x, y) of a full-image panel -> patch index."""
    side = model.image_size * scale_for(model)
    return viz.patch_index_at(x, y, side, side, model.grid_size)


# ------------------------------------------------------------------------------------------------
# The registry

def image_panel(label: str, elem_id: str, height: int, clickable: bool = False, show_label: bool | None = None,
                **kwargs) -> gr.Image:
    """An output image panel. Clickable panels (a click selects a patch) show their label and may be
    downloaded and are drawn crisp (nearest neighbour); the wide, self-titled ones only go full
    screen, so fewer buttons cover their titles."""
    return gr.Image(label=label, show_label=clickable if show_label is None else show_label, format="png",
                    interactive=False, height=height, elem_id=elem_id,
                    buttons=["download", "fullscreen"] if clickable else ["fullscreen"],
                    elem_classes=["pixelated", "clickable"] if clickable else None, **kwargs)


@dataclasses.dataclass(frozen=True)
class Panel:
    name: str                              # the key handlers answer with; the layout's name for it
    make: Callable[[], gr.components.Component]  # builds its component, where the layout says
    draw: Callable[[View], Any]            # its value for a view
    place: str                             # "side" (under the upload), "summary", "top" (the maps row),
                                           # "left" / "right" (the attention row)
    redraw: bool = True                    # False: depends on the image only, not on the settings
    export: str | Callable[[Settings], str] | None = None  # PNG name in an export (after the image's)
    click: Callable[[ViTClassifier, float, float], int | None] | None = None  # clicked pixel -> patch
    first: bool = False                    # sent ahead of the others after an upload (what one looks at first)

    def export_name(self, settings: Settings) -> str:
        return self.export if isinstance(self.export, str) else self.export(settings)


def _clickable(label: str, elem_id: str) -> Callable[[], gr.Image]:
    return partial(image_panel, label, elem_id, 205, clickable=True)


PANELS: tuple[Panel, ...] = (
    Panel("model_view", _clickable("As the model sees it", "model-view"),
          lambda v: viz.upscale_nearest(v.pixels, v.scale), "top", redraw=False, export="model_view",
          click=image_patch, first=True),
    Panel("patch_grid", _clickable("Patches (click one)", "patch-grid"),
          lambda v: viz.patch_grid(v.pixels, v.model.patch_size, scale=v.scale, gap=GAP, highlight=v.patch),
          "top", export="patch_grid", click=grid_patch),
    Panel("overlay", _clickable("Explanation map", "overlay"),
          lambda v: _overlay(v, v.explanation.maps()[v.settings.method][0]), "top",
          export=lambda s: f"overlay_{s.method}", click=image_patch, first=True),
    Panel("token_attention", _clickable("Token attention", "token-attention"), _token_attention, "top",
          export="token_attention", click=image_patch),
    Panel("top5", partial(gr.Label, num_top_classes=5, label="Top-5 classes", elem_id="top5", min_width=170),
          lambda v: {name: float(p) for name, p in zip(v.model.class_names, v.explanation.probs[0])},
          "side", redraw=False, first=True),
    Panel("matrices", partial(image_panel, "Every layer's attention matrix", "matrices", 150), _matrices,
          "right", export="attention_matrices"),
    Panel("matrix", partial(image_panel, "Attention matrix", "matrix", 320, scale=2, min_width=300), _matrix,
          "left", export=lambda s: f"attention_layer{s.layer}"),
    Panel("layer_strip", partial(image_panel, "CLS attention per layer (heads fused)", "layer-strip", 150),
          lambda v: _strip(v, v.explanation.layer_maps[0]),
          "right", export="cls_per_layer"),
    Panel("summary", partial(gr.Markdown, "Upload an image or pick an example.", label="summary", elem_id="info"),
          _summary, "summary", first=True),
)
PANEL = {panel.name: panel for panel in PANELS}
REDRAWN = tuple(panel for panel in PANELS if panel.redraw)
FIRST = tuple(panel for panel in PANELS if panel.first)


def draw(v: View, panels: tuple[Panel, ...] = PANELS) -> dict[str, Any]:
    """{panel name: value} for `panels` (all by default), drawn from one view."""
    return {panel.name: panel.draw(v) for panel in panels}


def clicked_patch(model: ViTClassifier, panel: str, x: float, y: float) -> int | None:
    """Pixel (x, y) clicked on the named panel -> patch index (None where no patch is)."""
    if PANEL[panel].click is None:
        raise ValueError(f"panel {panel!r} cannot be clicked")
    return PANEL[panel].click(model, x, y)


def compare_strip(v: View, methods: list[str], titles: dict[str, str] | None = None) -> Image.Image:
    """Every map of `methods` for the view's image and class side by side, each over the image and
    titled with its label (or `titles`' text), for the Compare view. Maps not yet computed for this
    class are computed now, and kept in the session's cache."""
    maps = v.explanation.with_maps(v.model, v.session.inputs, methods, v.session.cache).maps()
    titles = titles or {}
    return _strip(v, torch.stack([maps[m][0] for m in methods]), [titles.get(m, PICKER_LABELS[m]) for m in methods])


# ------------------------------------------------------------------------------------------------
# The Model tab: figures of the model itself (vit_core.anatomy), drawn once per checkpoint

@dataclasses.dataclass(frozen=True)
class ModelFigure:
    name: str                              # the key handlers answer with; also its export name
    label: str
    draw: Callable[[Anatomy], Image.Image]


def _class_maps(method: str) -> Callable[[Anatomy], Image.Image]:
    return lambda a: viz.class_map_grid(a.class_maps[method], a.class_names, counts=a.class_counts, side=80)


MODEL_FIGURES: tuple[ModelFigure, ...] = (
    ModelFigure("anatomy_distance", "Mean attention distance per head, by depth",
                lambda a: viz.plot_attention_distance(a.attention_distance, reference=a.uniform_distance)),
    ModelFigure("anatomy_entropy", "Attention entropy per head",
                lambda a: viz.entropy_heatmap(a.attention_entropy, a.max_entropy)),
    ModelFigure("anatomy_positions", "Position-embedding similarity",
                lambda a: viz.position_similarity_grid(a.position_similarity)),
    ModelFigure("anatomy_filters", "Patch-embedding filters (principal components)",
                lambda a: viz.filter_grid(a.filters, a.filter_variance)),
    ModelFigure("anatomy_class_grad_rollout", "Average gradient rollout per class", _class_maps("grad_rollout")),
    ModelFigure("anatomy_class_rollout", "Average rollout per class", _class_maps("rollout")),
)


def anatomy_text(anatomy: Anatomy, note: str) -> str:
    """The line under the Model tab's title: which images the figures come from."""
    grouped = "its label" if anatomy.grouped_by == "label" else "the predicted class"
    return (f"Attention distances, entropies and class maps from **{anatomy.n_images} images** "
            f"({anatomy.image_source}), each explained for {grouped}; the position embedding and the "
            f"filters are read off the weights. {note[0].upper()}{note[1:]}.")
