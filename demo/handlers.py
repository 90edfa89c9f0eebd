"""The explorer's event handlers, free of layout.

Every `Explorer` method takes what Gradio passes it (the raw upload, the session, the controls as
keywords named like the `Settings` fields, event data) and answers {output name: value} for the
outputs it changes (an upload's handlers yield such answers in steps); an empty answer changes
nothing. Output names are panel names (demo.panels) plus "session", "patch", "image_in",
"deletion", "insertion", "auc", "sanity", "export_files", "all_probs", "trust", "trust_table",
"compare", "header", "anatomy_info", "arrays" and the Model tab's figure names (demo.panels.MODEL_FIGURES).
Panel pictures are PIL images (or paths of files written once). The app maps names to its
components and pictures to served files, so no handler depends on the order of anything.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from demo.evidence import Evidence, image_trust, trust_sentence, trust_table
from demo.panels import (FIRST, MODEL_FIGURES, PANELS, REDRAWN, View, anatomy_text, clicked_patch, compare_strip,
                          draw, view)
from demo.serving import export_dir, static_dir
from demo.session import (ATTENTION_DEFAULT, PICKER_LABELS, Session, Settings, analyze, current_explanation, is_own,
                          label_probs, methods_for, read_upload, upload_name, upload_path)
from vit_core import ViTClassifier, viz
from vit_core import faithfulness as faith
from vit_core.methods import METHOD

Answer = dict[str, Any]
FAITHFULNESS_OUTPUTS = ("deletion", "insertion", "auc", "sanity")
TRUST_OUTPUTS = ("trust", "trust_table", "compare", "compare_table")
TRUST_PENDING = "Measuring how far to trust each map on this image…"
# What the figures that need our own ViTClassifier (the anatomy, the test-set table) say for other
# models (vit_core.adapters); every map but token-dropped occlusion explains those too.
NOT_AVAILABLE = "Not available for this model (it needs the explorer's own ViT, trained on CIFAR-10)."


class Explorer:
    """The app's handlers around one model; `examples` are the gallery's files, in its order;
    `evidence` what is known about the checkpoint (default: nothing measured, no anatomy);
    `share` says whether a public link was asked for and which one Gradio gave, if any."""

    def __init__(self, model: ViTClassifier, examples: list[Path] = (), evidence: Evidence | None = None,
                 share: Callable[[], tuple[bool, str | None]] = lambda: (False, None)):
        self.model = model.eval()
        self.examples = list(examples)
        self.evidence = evidence or Evidence()
        method = self.evidence.default_method
        self.defaults = Settings(method=method if method in methods_for(model) else ATTENTION_DEFAULT)
        self.share = share
        anatomy = self.evidence.anatomy
        # Drawn once per checkpoint; written once, so every request serves the same files.
        self.model_figures = {f.name: f.draw(anatomy) for f in MODEL_FIGURES} if anatomy is not None else {}
        folder = Path(tempfile.mkdtemp(dir=static_dir())) if self.model_figures else None
        self.model_figure_files = {name: str(_saved(image, folder / f"{name}.png"))
                                   for name, image in self.model_figures.items()}

    def settings(self, controls: dict[str, Any]) -> Settings:
        return Settings.read(self.model, controls, self.defaults)

    def explain_steps(self, image, **controls) -> Iterator[Answer]:
        """Runs the model once on the uploaded image and answers twice: the panels one looks at
        first (panels.FIRST) as soon as they are drawn, then every panel for the settings, so the
        other panels (a large model's per-layer strips) never hold the main map back."""
        settings = self.settings(controls)
        picture, notes = read_upload(upload_path(image), size=self.model.image_size)
        # The backward pass only when the map shown is the gradient rollout, then in the same pass as
        # the forward; otherwise it waits until a gradient map is first shown (current_explanation).
        session = analyze(self.model, picture, name=upload_name(image), notes=notes,
                          gradients=settings.method == "grad_rollout")
        shown = view(self.model, session, settings)
        first = draw(shown, FIRST)
        yield {**first, "session": session, "patch": -1}
        rest = draw(shown, tuple(panel for panel in PANELS if not panel.first))
        yield {**{panel.name: first.get(panel.name, rest.get(panel.name)) for panel in PANELS}, "session": session,
               "patch": -1}

    def explain(self, image, **controls) -> Answer:
        """`explain_steps`' last answer: every panel for the settings."""
        *_, answer = self.explain_steps(image, **controls)
        return answer

    def explain_arrays(self, image, **controls) -> Answer:
        """/explain for scripts that want numbers: the same parameters, one model run, no pictures
        drawn; the session too, so /redraw and the other endpoints work on the image afterwards."""
        settings = self.settings(controls)
        picture, notes = read_upload(upload_path(image), size=self.model.image_size)
        session = analyze(self.model, picture, name=upload_name(image), notes=notes, gradients=False)
        return {"arrays": explanation_arrays(view(self.model, session, settings)), "session": session}

    def example(self, evt: gr.SelectData, **controls) -> Iterator[Answer]:
        """A gallery pick: explained as if uploaded (in the same steps), and shown as the input."""
        path = self.examples[evt.index]
        for answer in self.explain_steps({"path": str(path), "orig_name": path.name}, **controls):
            yield {"image_in": str(path), **answer}

    def redraw(self, session: Session | None, progress: gr.Progress = gr.Progress(), **controls) -> Answer:
        """Redraws the panels the settings change, from the session's cached explanation; a slow
        map computed for them (occlusion, Integrated Gradients) moves Gradio's progress bar."""
        if session is None:  # nothing uploaded yet: leave the empty panels as they are
            return {}
        shown = view(self.model, session, self.settings(controls), progress=map_progress(progress))
        return {**draw(shown, REDRAWN), "session": session}

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
        picture, _ = read_upload(upload_path(image), size=self.model.image_size)
        return {"all_probs": label_probs(self.model, picture)}

    def faithfulness(self, session: Session | None, **controls) -> Answer:
        """Deletion and insertion curves of the current map against a random map."""
        return faithfulness(self.model, require(session), self.settings(controls))

    def sanity_check(self, session: Session | None, **controls) -> Answer:
        """The model-randomisation check of the current method."""
        return {"sanity": sanity_check(self.model, require(session), self.settings(controls))}

    def export(self, session: Session | None, **controls) -> Answer:
        """Every panel and the Model tab's figures as PNG, the current explanation as .npz."""
        paths = export_files(self.model, require(session), self.settings(controls), export_dir(),
                             self.model_figures)
        return {"export_files": paths}

    def trust(self, session: Session | None, **controls) -> Answer:
        """How far to trust each fast map on this image (demo.evidence.image_trust): the chosen
        map's sentence, every map's figures, and the maps side by side for the Compare view."""
        if session is None:
            return {}
        settings = self.settings(controls)
        figures = image_trust(self.model, session, settings)
        # Pillow's built-in font draws ASCII only: "x" for "×", "rho" for "ρ".
        titles = {m: f"{METHOD[m].label.replace('×', 'x')}: {_beats(f)}, rho {_rho(f)}"
                  for m, f in figures.items()}
        table = trust_table(figures, settings.method)
        return {"trust": trust_sentence(settings.method, figures[settings.method]) if settings.method in figures
                else "",
                "trust_table": table, "compare_table": table,
                "compare": compare_strip(view(self.model, session, settings), list(figures), titles)}

    def anatomy(self) -> Answer:
        """The Model tab: the anatomy figures (files written once) and where they come from."""
        if not is_own(self.model):
            return {**{f.name: None for f in MODEL_FIGURES}, "anatomy_info": NOT_AVAILABLE}
        if self.evidence.anatomy is None:
            raise gr.Error("No anatomy for this model: the app was started without example images.")
        return {**self.model_figure_files, "anatomy_info": anatomy_text(self.evidence.anatomy,
                                                                         self.evidence.anatomy_note)}

    def header(self, method: str | None = None) -> Answer:
        """The header line: the model, its measured accuracy, what the page shows, the public link."""
        model = self.model
        parts = [f"**ViT attention explorer** · {model_name(model)}{model.depth} layers × {model.n_heads} heads on "
                 f"{model.grid_size}×{model.grid_size} patches of {model.patch_size} px"]
        if is_own(model) or self.evidence.accuracy is not None:
            parts.append(self.evidence.accuracy_text())
        method = method if method in methods_for(model) else self.defaults.method
        if not is_own(model):
            unavailable = [label for name, label in PICKER_LABELS.items() if name not in methods_for(model)]
            parts.append(f"Showing **{PICKER_LABELS[method]}**" + (f" ({', '.join(unavailable)}: not for this model)"
                                                                  if unavailable else ""))
        elif method == self.defaults.method:
            parts.append(self.evidence.default_text())
        else:
            parts.append(f"Showing **{PICKER_LABELS[method]}** (the app opens on "
                         f"{PICKER_LABELS[self.defaults.method]}; each map's trust on this image is beside the picker)")
        requested, url = self.share()
        if url:
            parts.append(f"Public link: [{url}]({url})")
        elif requested:
            parts.append("Public link unavailable (the share server cannot be reached): serving locally only")
        return {"header": " · ".join(parts)}

    @staticmethod
    def clear() -> Answer:
        return {**{panel.name: None for panel in PANELS}, "session": None, "patch": -1}

    @staticmethod
    def new_image() -> Answer:  # curves, checks and trust of the previous image no longer apply
        return {"deletion": None, "insertion": None, "auc": "", "sanity": "", "trust": TRUST_PENDING,
                "trust_table": "", "compare": None, "compare_table": ""}


def map_progress(tracker: gr.Progress) -> Callable[[int, int], None]:
    """vit_core's progress(done, total) as Gradio's progress bar ("inputs": perturbed images run)."""
    return lambda done, total: tracker((done, total), desc="computing the map", unit="inputs")


def model_name(model) -> str:
    """"name · " for a model from another library (its timm architecture or Hub name), "" for ours."""
    return "" if is_own(model) else f"**{model.name}** · "


def _beats(figures: dict[str, float]) -> str:
    return f"{min(figures['deletion_percentile'], figures['insertion_percentile']):.0f} %"


def _rho(figures: dict[str, float]) -> str:
    rho = figures["spearman_occlusion"]
    return "n/a" if math.isnan(rho) else f"{rho:+.2f}"


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
        rows.append(f"| {PICKER_LABELS.get(name, name)} | {_scalar(result['deletion_auc']):.3f} | "
                    f"{_scalar(result['insertion_auc']):.3f} |")
    return {**answer, "auc": "\n".join(rows)}


def sanity_check(model: ViTClassifier, session: Session, settings: Settings) -> str:
    """Model-randomisation test (Adebayo et al.): re-initialise layers from the top down and report
    the rank correlation of the map with the trained model's map, as a markdown table."""
    expl = current_explanation(model, session, settings)
    stages = faith.randomization_sanity(
        model, session.inputs, method=settings.method, target=expl.target,
        head_fusion=settings.head_fusion, discard_ratio=settings.discard_ratio, seed=0)
    rows = [f"Model-randomisation check for **{PICKER_LABELS[settings.method]}**: Spearman correlation between "
            "the trained model's map and the map after randomising the weights cumulatively from the "
            "top. A faithful method's maps should decorrelate (values near 0).", "",
            "| randomised | Spearman ρ |", "|---|---|"]
    rows += [f"| {s['stage']} | {_scalar(s['spearman']):.3f} |" for s in stages]
    return "\n".join(rows)


def explanation_arrays(v: View) -> dict[str, Any]:
    """The numbers behind a view's panels as JSON-ready values: the prediction and every class's
    probability, the explained class, the chosen method's map (grid × grid, raw values, patches
    row-major), each layer's CLS attention (layers × grid × grid, heads fused as set) and the
    chosen layer's attention matrix for the chosen head or the heads' mean (tokens × tokens, CLS
    first)."""
    names, expl = v.model.class_names, v.explanation
    return {
        "predicted": names[v.session.predicted],
        "probabilities": {name: float(p) for name, p in zip(names, expl.probs[0])},
        "method": v.settings.method,
        "target": names[int(expl.target[0])],
        "map": expl.maps()[v.settings.method][0].tolist(),
        "layer_maps": expl.layer_maps[0].tolist(),
        "layer": v.settings.layer,
        "head": v.settings.head,
        "attention": v.matrices[v.settings.layer - 1].tolist(),
        "notes": list(v.session.notes),
    }


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).mean())


def export_files(model: ViTClassifier, session: Session, settings: Settings, out_dir: Path,
                 figures: dict[str, Image.Image] | None = None) -> list[str]:
    """Every exported panel as a PNG, `figures` (the model's own, by name) as PNGs and the current
    explanation as an .npz, written into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    current = view(model, session, settings)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in session.name)[:40] or "image"
    paths = []
    for panel in PANELS:
        if panel.export is not None:
            path = out_dir / f"{stem}_{panel.export_name(settings)}.png"
            panel.draw(current).save(path)
            paths.append(str(path))
    paths += [str(_saved(image, out_dir / f"{name}.png")) for name, image in (figures or {}).items()]
    expl = current.explanation
    arrays = expl.as_numpy()
    arrays.update(method=np.array(settings.method), explained_map=expl.maps()[settings.method].numpy(),
                  class_names=np.array(model.class_names), image=np.asarray(session.pixels))
    npz = out_dir / f"{stem}_explanation.npz"
    np.savez_compressed(npz, **arrays)
    paths.append(str(npz))
    return paths


def _saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path
