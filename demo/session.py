"""What the explorer knows about one image and what its controls say.

`Settings` is the controls, read by name and checked; `Session` is one image's cached analysis
(the model runs once per image); `current_explanation` turns the two into the explanation the
panels draw, recomputed from the cache by `vit_core` (no forward pass, except once for each new
class and for each attribution map the first time it is asked for).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier, preprocess, to_model_pixels
from vit_core.preprocessing import resampling
from vit_core.images import FRAMES_KEY, FULL_SIZE_KEY, MAX_FILE_BYTES, ImageError, read_image
from vit_core.attribution import Progress
from vit_core.explanation import Explanation, MapCache, explain
from vit_core.methods import METHOD, PICKER, supported_methods
from vit_core.rollout import check_rollout_settings


def picker_label(method: str) -> str:
    """How the method picker names a method: its label, and for a slow one that it takes longer."""
    entry = METHOD[method]
    return entry.label if entry.fast else f"{entry.label} (slower, on request)"


PICKER_LABELS = {method: picker_label(method) for method in PICKER}  # value -> label, in the picker's order
# At most one forward and one backward pass each: shown with trust figures for every image.
FAST_METHODS = tuple(m for m in PICKER if METHOD[m].fast)
# The picker's default when no test-set measurement says otherwise (see demo.evidence).
DEFAULT_METHOD = "lrp_composite"
# A model that cannot be explained by that default (vit_core.methods.supported_methods) opens on
# this one, which needs only the model's attentions: one forward and one backward pass.
ATTENTION_DEFAULT = "grad_rollout"
PREDICTED = "predicted"
HEAD_MEAN = "all (mean)"


def is_own(model) -> bool:
    """Our own ViTClassifier: token dropping, the anatomy and the test-set evidence need it (the LRP
    family and LibraGrad also explain adapted timm and transformers ViTs)."""
    return isinstance(model, ViTClassifier)


def methods_for(model) -> dict[str, str]:
    """The picker's {value: label} for this model (vit_core.methods.supported_methods)."""
    return {m: PICKER_LABELS[m] for m in PICKER_LABELS if m in supported_methods(model)}


def model_inputs(model, image: Image.Image) -> tuple[Image.Image, torch.Tensor]:
    """What the model sees (RGB, image_size a side, resized with the model's own resampling) and
    its normalised input [1, 3, S, S]."""
    pixels = to_model_pixels(image, model.image_size, resampling(model))
    return pixels, preprocess(pixels, model)


def head_choices(model: ViTClassifier) -> list[str]:
    return [HEAD_MEAN] + [f"head {h + 1}" for h in range(model.n_heads)]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the controls say, one field per control (the app's controls carry these names).
    `layer` is 1-based as shown; 0 means the last layer. `patch` -1 means no patch selected.
    `head` is HEAD_MEAN or "head k" (1-based)."""

    method: str = DEFAULT_METHOD
    target: str = PREDICTED
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    opacity: float = 0.5
    layer: int = 0
    head: str = HEAD_MEAN
    patch: int = -1

    @classmethod
    def read(cls, model: ViTClassifier, controls: Mapping[str, object],
             defaults: "Settings | None" = None) -> "Settings":
        """Checked settings from control values by name. A value left None (an API caller
        leaving a parameter out) gets the control's default: `defaults`' value, else the field's."""
        unknown = set(controls) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"no setting is called {sorted(unknown)}")
        given = {name: value for name, value in controls.items() if value is not None}
        return dataclasses.replace(defaults or cls(), **given).checked(model)

    def checked(self, model: ViTClassifier) -> "Settings":
        """Validated copy with defaults resolved; bad values raise gr.Error with the allowed ones."""
        if self.method not in methods_for(model):
            raise gr.Error(f"Unknown method {self.method!r}; choose one of {list(methods_for(model))}.")
        if self.target != PREDICTED and self.target not in model.class_names:
            raise gr.Error(f"Unknown class {self.target!r}; choose {PREDICTED!r} or one of {model.class_names}.")
        discard, opacity = _number(self.discard_ratio, "discard ratio"), _number(self.opacity, "opacity")
        try:
            check_rollout_settings(self.head_fusion, discard)
        except ValueError as error:
            raise gr.Error(sentence(error)) from None
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


def sentence(error: Exception) -> str:
    """vit_core's message for a bad value as a sentence for the page."""
    text = str(error)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(number):
        raise gr.Error(f"{name} must be finite, got {value!r}.")
    return number


@dataclasses.dataclass
class Session:
    """One image's cached analysis: the model ran once (mean fusion, no discard); everything
    the settings change is recomputed from `explanation` (see `current_explanation`)."""

    explanation: Explanation              # batch of one: the predicted class, mean fusion, no discard
    pixels: Image.Image                   # what the model sees, image_size x image_size RGB
    inputs: torch.Tensor                  # [1, 3, S, S] normalised, for re-targeting and faithfulness
    name: str                             # file stem, for export names and the true label
    notes: list[str]                      # about decoding: resized from, first frame of, ...
    # Trust figures already computed for this image (demo.evidence.image_trust), by map.
    trust: dict = dataclasses.field(default_factory=dict, repr=False)
    # The class-specific maps computed so far for this image, by class (vit_core.explanation).
    cache: MapCache = dataclasses.field(default_factory=MapCache, repr=False)
    # The Walkthrough's numbers for this image (demo.walkthrough.Walkthrough.payload), once computed.
    walkthrough: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def predicted(self) -> int:
        return int(self.explanation.target[0])  # analyze explains the predicted class


# ------------------------------------------------------------------------------------------------
# Uploads: every failure becomes a gr.Error with a sentence a user can act on

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


def read_upload(path: str | os.PathLike | None, size: int | None = None) -> tuple[Image.Image, list[str]]:
    """An uploaded file -> RGB image (`vit_core.images.read_image`: first frame of an animation,
    upright, transparency on white, size limits; a JPEG decoded at a reduced scale when `size`
    pixels a side are all that is needed) and notes about its decoding. Empty, oversized,
    non-image, truncated and decompression-bomb files raise gr.Error with the reader's message."""
    if path is None or str(path) == "":
        raise gr.Error("No image: upload one or pick an example.")
    try:
        image = read_image(path, max_bytes=MAX_FILE_BYTES, size=size)
    except ImageError as error:
        raise gr.Error(str(error)) from None
    frames = image.info.get(FRAMES_KEY, 1)
    return image, [f"animated image: first of {frames} frames used"] if frames > 1 else []


# ------------------------------------------------------------------------------------------------
# The model's part

def analyze(model: ViTClassifier, image: Image.Image, name: str = "image",
            notes: list[str] | None = None, gradients: bool = True) -> Session:
    """The one model run per image: probabilities, attentions, rollouts (vit_core.explain). Other
    maps are computed when first asked for (`current_explanation`); so is the gradient rollout
    with `gradients=False` (a forward pass only, for an upload shown with another method)."""
    notes = list(notes or [])
    width, height = image.info.get(FULL_SIZE_KEY, image.size)  # a JPEG may have been decoded reduced
    if (width, height) != (model.image_size, model.image_size):
        notes.append(f"resized from {width}×{height} to {model.image_size}×{model.image_size}")
    pixels, inputs = model_inputs(model, image)
    return Session(explanation=explain(model, inputs, gradients=gradients), pixels=pixels, inputs=inputs, name=name,
                   notes=notes)


def label_probs(model: ViTClassifier, image: Image.Image) -> dict[str, float]:
    """Class probabilities for one image (forward pass only), as a gr.Label value."""
    with torch.inference_mode():
        probs = model(model_inputs(model, image)[1]).softmax(dim=-1)[0]
    return {name: float(p) for name, p in zip(model.class_names, probs)}


def target_index(model: ViTClassifier, session: Session, settings: Settings) -> int:
    return session.predicted if settings.target == PREDICTED else model.class_names.index(settings.target)


def current_explanation(model: ViTClassifier, session: Session, settings: Settings,
                        progress: Progress | None = None) -> Explanation:
    """The session's explanation as the settings ask for it: the chosen class's gradient rollout
    (the model runs once per new class), rollout and per-layer maps for this head fusion and
    discard ratio from the cached attentions, and the chosen method's map (computed on first use
    for this class, then cached; a slow one reports to `progress(done, total)`)."""
    retargeted = session.explanation.retarget(model, session.inputs, target_index(model, session, settings),
                                              session.cache)
    return retargeted.with_settings(settings.head_fusion, settings.discard_ratio).with_maps(
        model, session.inputs, [settings.method], session.cache, progress)


def example_label(name: str, class_names: list[str]) -> str | None:
    """The true label of a shipped example, from its file name (`cat_0003` -> "cat")."""
    stem = name.rsplit("_", 1)[0]
    return stem if stem in class_names and name != stem else None
