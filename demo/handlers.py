"""The explorer's event handlers, free of layout.

Every `Explorer` method takes what Gradio passes it (the raw upload, the session, the controls as
keywords named like the `Settings` fields, event data) and answers {output name: value} for the
outputs it changes; an empty answer changes nothing. Output names are panel names (demo.panels)
plus "session", "patch", "image_in", "deletion", "insertion", "auc", "sanity", "export_files" and
"all_probs". Panel pictures are PIL images. The app maps names to its components and pictures to
served files, so no handler depends on the order of anything.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from demo.panels import PANELS, REDRAWN, clicked_patch, draw, view
from demo.session import (METHODS, Session, Settings, analyze, current_explanation, label_probs, read_upload,
                          upload_name, upload_path)
from vit_core import ViTClassifier, viz
from vit_core import faithfulness as faith

Answer = dict[str, Any]
FAITHFULNESS_OUTPUTS = ("deletion", "insertion", "auc", "sanity")


class Explorer:
    """The app's handlers around one model; `examples` are the gallery's files, in its order."""

    def __init__(self, model: ViTClassifier, examples: list[Path] = ()):
        self.model = model.eval()
        self.examples = list(examples)

    def settings(self, controls: dict[str, Any]) -> Settings:
        return Settings.read(self.model, controls)

    def explain(self, image, **controls) -> Answer:
        """Runs the model once on the uploaded image; answers every panel for the settings."""
        settings = self.settings(controls)
        picture, notes = read_upload(upload_path(image))
        session = analyze(self.model, picture, name=upload_name(image), notes=notes)
        return {**draw(view(self.model, session, settings)), "session": session, "patch": -1}

    def example(self, evt: gr.SelectData, **controls) -> Answer:
        """A gallery pick: explained as if uploaded, and shown as the input."""
        path = self.examples[evt.index]
        return {"image_in": str(path), **self.explain({"path": str(path), "orig_name": path.name}, **controls)}

    def redraw(self, session: Session | None, **controls) -> Answer:
        """Redraws the panels the settings change, from the session's cached explanation."""
        if session is None:  # nothing uploaded yet: leave the empty panels as they are
            return {}
        return {**draw(view(self.model, session, self.settings(controls)), REDRAWN), "session": session}

    def click_on(self, panel: str) -> Callable[..., Answer]:
        """The handler for clicks on `panel`: follows the clicked patch (a gap: back to CLS)."""
        def click(evt: gr.SelectData, session: Session | None, **controls) -> Answer:
            if session is None or not isinstance(evt.index, (list, tuple)):
                return {}
            index = clicked_patch(self.model, panel, *evt.index[:2])
            settings = dataclasses.replace(self.settings(controls), patch=-1 if index is None else index)
            return {**draw(view(self.model, session, settings), REDRAWN), "session": session,
                    "patch": settings.patch}
        return click

    def predict(self, image) -> Answer:
        """Class probabilities of the uploaded image (a forward pass only)."""
        picture, _ = read_upload(upload_path(image))
        return {"all_probs": label_probs(self.model, picture)}

    def faithfulness(self, session: Session | None, **controls) -> Answer:
        """Deletion and insertion curves of the current map against a random map."""
        return faithfulness(self.model, require(session), self.settings(controls))

    def sanity_check(self, session: Session | None, **controls) -> Answer:
        """The model-randomisation check of the current method."""
        return {"sanity": sanity_check(self.model, require(session), self.settings(controls))}

    def export(self, session: Session | None, **controls) -> Answer:
        """Every panel as PNG and the current explanation as .npz."""
        paths = export_files(self.model, require(session), self.settings(controls), _export_dir())
        return {"export_files": paths}

    @staticmethod
    def clear() -> Answer:
        return {**{panel.name: None for panel in PANELS}, "session": None, "patch": -1}

    @staticmethod
    def new_image() -> Answer:  # curves and checks of the previous image no longer apply
        return {"deletion": None, "insertion": None, "auc": "", "sanity": ""}


def require(session: Session | None) -> Session:
    if session is None:
        raise gr.Error("Upload an image or pick an example first.")
    return session


# ------------------------------------------------------------------------------------------------
# Faithfulness, sanity check, export

def faithfulness(model: ViTClassifier, session: Session, settings: Settings, steps: int | None = None) -> Answer:
    """Deletion and insertion curves of the current map against a random map, with AUCs:
    {"deletion": figure, "insertion": figure, "auc": markdown table}."""
    expl = current_explanation(model, session, settings)
    maps = {settings.method: expl.maps()[settings.method], "random": faith.random_maps(1, model.grid_size, seed=0)}
    results = faith.deletion_insertion(model, session.inputs, maps, expl.target, steps=steps)
    target_name = model.class_names[int(expl.target[0])]
    answer = {}
    for mode, title in [("deletion", "deletion (lower is better)"), ("insertion", "insertion (higher is better)")]:
        answer[mode] = viz.plot_curves({k: np.asarray(v[mode]) for k, v in results.items()},
                                       title=f"{title}, class {target_name}",
                                       aucs={k: _scalar(v[f"{mode}_auc"]) for k, v in results.items()})
    rows = ["| map | deletion AUC ↓ | insertion AUC ↑ |", "|---|---|---|"]
    for name, result in results.items():
        rows.append(f"| {METHODS.get(name, name)} | {_scalar(result['deletion_auc']):.3f} | "
                    f"{_scalar(result['insertion_auc']):.3f} |")
    return {**answer, "auc": "\n".join(rows)}


def sanity_check(model: ViTClassifier, session: Session, settings: Settings) -> str:
    """Model-randomisation test (Adebayo et al.): re-initialise layers from the top down and report
    the rank correlation of the map with the trained model's map, as a markdown table."""
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
    """Every exported panel as a PNG and the current explanation as an .npz, written into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    current = view(model, session, settings)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in session.name)[:40] or "image"
    paths = []
    for panel in PANELS:
        if panel.export is not None:
            path = out_dir / f"{stem}_{panel.export_name(settings)}.png"
            panel.draw(current).save(path)
            paths.append(str(path))
    expl = current.explanation
    arrays = expl.as_numpy()
    arrays.update(method=np.array(settings.method), explained_map=expl.maps()[settings.method].numpy(),
                  class_names=np.array(model.class_names), image=np.asarray(session.pixels))
    npz = out_dir / f"{stem}_explanation.npz"
    np.savez_compressed(npz, **arrays)
    paths.append(str(npz))
    return paths


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
