"""The Walkthrough tab: one image's whole way through the model, step by step, for an audience.

The numbers of every step come from `vit_core.walkthrough.walkthrough_payload`, computed once per
image (on the session the Explorer made for it, so one upload serves both) and cached on the
session; the browser draws each step from them (demo/walkthrough.js, gr.HTML's js_on_load), so
stepping never waits for the server. The page gets them in two answers: every step with the
what-if curves at the first k only, as the upload's last answer, then every what-if row (the
curves are most of the work). Two things arrive later as the HTML component's props: the
decision map's trust figures on this image (`trust`, from the Explorer's own per-image trust
computation, chained after it) and the prediction with patches removed by hand (`manual`, one
model run per click). Each carries the image's key, so the page never shows another image's figures.

Named endpoints for scripts: /walkthrough (image -> the payload), /whatif (the k most relevant
patches removed, then the listed patches toggled -> the prediction) and /knockout (one head off ->
the prediction, from the payload).
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from demo.evidence import TRUST_BF16, image_trust, trust_sentence
from demo.handlers import Explorer, require
from demo.session import (PREDICTED, Session, Settings, analyze, current_explanation, example_label, is_own,
                          read_upload, upload_name, upload_path)
from vit_core import viz
from vit_core.methods import METHOD
from vit_core.narration import percent
from vit_core.walkthrough import coarse_ks, default_k, walkthrough_payload, what_if, what_if_curves, whatif_sentence

Answer = dict[str, Any]
WHATIF_STEPS = 16
JS = (Path(__file__).resolve().parent / "walkthrough.js").read_text()
# The tab's example gallery: small square thumbnails, two a row (the page's CSS, demo.app.launch).
CSS = """
#wt-examples .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important;
  grid-auto-rows: min-content !important; align-content: start !important; gap: 4px !important; }
#wt-examples .thumbnail-item { width: 100% !important; height: auto !important; aspect-ratio: 1 / 1; }
#wt-examples .thumbnail-item img { width: 100% !important; height: 100% !important; object-fit: cover; }
#wt-examples .caption-label { font-size: 11px; padding: 0 3px; }
"""


# ------------------------------------------------------------------------------------------------
# The numbers

def first_payload(explorer: Explorer, session: Session, model) -> dict:
    """The walkthrough payload of the session's image, computed on `model` (see `Walkthrough`),
    with the what-if curves at k = 0 and the step's first k only ("whatif_pending": the other rows
    follow, `with_curves`). Its map is the one the Explorer opens on (the most faithful fast map by
    the checkpoint's faithfulness.json) for the predicted class; "key" names this image for the
    later props, "k" is the what-if step's first k and "whatif_sentences" phrase each k of the
    curves' rows ("whatif"["ks"]), so the slider needs no round-trip."""
    method = explorer.defaults.method
    settings = Settings(method=method, target=PREDICTED).checked(explorer.model)
    relevance = current_explanation(explorer.model, session, settings).maps()[method][0]
    k = default_k(model.grid_size ** 2)
    # The head knock-outs in bf16 where the CPU has bf16 units, as the trust figures (faster:
    # benchmarks/walkthrough_latency.py times both); the what-if rows stay float32 (`with_curves`).
    payload = walkthrough_payload(model, session.inputs, model.class_names, relevance=relevance, method=method,
                                  label=METHOD[method].label, whatif_ks=[0, k], bf16=TRUST_BF16)
    # "rgb": the model's view as raw bytes (base64), which the page draws without decoding a PNG.
    rgb = base64.b64encode(np.asarray(session.pixels.convert("RGB"), dtype=np.uint8).tobytes()).decode("ascii")
    payload.update(key=uuid.uuid4().hex, k=k, whatif_pending=True, rgb=rgb,
                   whatif_sentences=[whatif_sentence(payload, k) for k in payload["whatif"]["ks"]])
    return payload


def with_curves(payload: dict, model, inputs: torch.Tensor) -> dict:
    """A copy of `payload` with its what-if curves at every k of `whatif_ks(model)`, removing
    patches in the payload's own two orders (one batch, `vit_core.walkthrough.what_if_curves`)."""
    whatif = payload["whatif"]
    ks = sorted({0, *(whatif_ks(model) or range(len(whatif["order"]) + 1))})
    curves = what_if_curves(model, inputs, torch.tensor([whatif["order"], whatif["random_order"]]), ks)
    rows = np.round(curves.numpy().astype(np.float64), 4)
    full = {**payload, "whatif": {**whatif, "ks": ks, "relevant": rows[0].tolist(), "random": rows[1].tolist()},
            "whatif_pending": False}
    full["whatif_sentences"] = [whatif_sentence(full, k) for k in ks]
    full["narration"] = {**payload["narration"], "whatif": full["whatif_sentences"][ks.index(payload["k"])]}
    return full


def whatif_ks(model) -> list[int] | None:
    """Every k for our ViT (a what-if row is a short forward pass); for another model, whose rows
    are full forward passes of a larger network, WHATIF_STEPS evenly spaced ones."""
    return None if is_own(model) else coarse_ks(model.grid_size ** 2, WHATIF_STEPS)


def removed_patches(payload: dict, k, patches) -> list[int]:
    """The k most relevant patches (the payload's order), then each of `patches` toggled (removed if
    kept, kept if removed), as the page's slider and clicks set them; gr.Error for a k or patch
    that does not exist."""
    n_patches = len(payload["whatif"]["order"])
    k = _integer(k, "k")
    if not 0 <= k <= n_patches:
        raise gr.Error(f"k must be in 0..{n_patches} (this image has {n_patches} patches), got {k}.")
    listed = _patch_list(patches, n_patches)
    removed = set(payload["whatif"]["order"][:k])
    return sorted(removed.symmetric_difference(listed))


def _patch_list(patches, n_patches: int) -> list[int]:
    if isinstance(patches, str):
        patches = [p for p in patches.replace(",", " ").split() if p]
    values = [_integer(p, "patch") for p in (patches or [])]
    bad = [p for p in values if not 0 <= p < n_patches]
    if bad:
        raise gr.Error(f"Patches are numbered 0..{n_patches - 1}; there is no patch {bad[0]}.")
    return list(dict.fromkeys(values))


def _integer(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.") from None
    if not np.isfinite(number) or number != int(number):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def whatif_answer(payload: dict, model, inputs: torch.Tensor, k, patches) -> dict:
    """The prediction with `removed_patches(...)` taken away (one model run)."""
    removed = removed_patches(payload, k, patches)
    probs = what_if(model, inputs, removed).tolist()
    classes, predicted = payload["classes"], payload["predicted"]
    top = int(np.argmax(probs))
    says = f"{classes[top]} {percent(probs[top])}"
    if top != predicted:
        says += f" · {classes[predicted]} {percent(probs[predicted])}"
    return {"removed": removed, "probs": [round(p, 4) for p in probs], "top": classes[top],
            "caption": f"{len(removed)} removed by hand: {says}"}


def knockout_answer(payload: dict, layer, head) -> dict:
    """Block `layer`, head `head` (1-based, as shown) knocked out: the prediction, from the payload."""
    knockout = payload["knockout"]
    layers, heads = len(knockout["prob"]), len(knockout["prob"][0])
    layer, head = _integer(layer, "layer"), _integer(head, "head")
    if not 1 <= layer <= layers:
        raise gr.Error(f"The model has blocks 1..{layers}; there is no block {layer}.")
    if not 1 <= head <= heads:
        raise gr.Error(f"Each block has heads 1..{heads}; there is no head {head}.")
    classes, predicted = payload["classes"], payload["predicted"]
    top, top_prob = knockout["top"][layer - 1][head - 1], knockout["top_prob"][layer - 1][head - 1]
    prob = knockout["prob"][layer - 1][head - 1]
    return {"layer": layer, "head": head, "top": classes[top], "top_prob": top_prob, "predicted_prob": prob,
            "sentence": f"With head {head} of block {layer} knocked out the model says {classes[top]} at "
                        f"{percent(top_prob)}; {classes[predicted]} goes from {percent(payload['probs'][predicted])} "
                        f"to {percent(prob)}."}


def lens_figure(payload: dict) -> Image.Image | None:
    """The logit lens as a picture for Export: each class's probability after every block."""
    if not payload.get("lens"):
        return None
    cls = np.asarray(payload["lens"]["cls"])
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    blocks = np.arange(1, len(cls) + 1)
    for c in np.argsort(-cls.max(axis=0))[:5]:
        ax.plot(blocks, cls[:, c], marker="o", label=payload["classes"][c])
    ax.set(xlabel="after block", ylabel="probability", ylim=(0, 1), xticks=blocks,
           title=f"logit lens: {payload['reads']}")
    ax.legend(fontsize=8)
    return viz.figure_to_image(fig)


# ------------------------------------------------------------------------------------------------
# The handlers ({output name: value}, as demo.handlers')

# Where the what-if curves are computed beside the Explorer's other panels. Not daemon threads: at
# exit the interpreter waits for a computation under way instead of tearing torch down beneath it
# (which aborts the process after everything else has ended well).
BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="walkthrough-curves")


class Walkthrough:
    """The tab's handlers around the Explorer's, on the Explorer's model: the head knock-outs'
    hooks act on their own thread's passes only (`vit_core.scope`), so other requests may run
    meanwhile. The lock makes a request wait for a payload already being computed rather than
    compute it again."""

    def __init__(self, explorer: Explorer):
        self.explorer = explorer
        self.model = explorer.model
        self.lock = threading.Lock()

    def payload(self, session: Session) -> dict:
        """The session's payload, its what-if curves perhaps still pending (`first_payload`)."""
        if session.walkthrough is None:
            with self.lock:  # a computation already under way for this session is waited for, not repeated
                if session.walkthrough is None:
                    session.walkthrough = first_payload(self.explorer, session, self.model)
        return session.walkthrough

    def complete(self, session: Session) -> dict:
        """The session's payload with every what-if row."""
        if self.payload(session)["whatif_pending"]:
            with self.lock:
                if session.walkthrough["whatif_pending"]:
                    session.walkthrough = with_curves(session.walkthrough, self.model, session.inputs)
        return session.walkthrough

    def explaining(self, handler: Callable) -> Callable:
        """An Explorer handler that answers an image in steps, extended with this image's
        walkthrough: right after the first panels, every step but the what-if curves (a few
        batched passes, cheaper than drawing the Explorer's other panels, which follow); the
        curves are computed beside those panels (`show` then completes the page's copy)."""
        @functools.wraps(handler)
        def steps(*args, **kwargs):
            for index, answer in enumerate(handler(*args, **kwargs)):
                yield answer
                if index == 0 and answer.get("session") is not None:
                    session = answer["session"]
                    yield {"walkthrough": self.payload(session)}
                    BACKGROUND.submit(self._prepare, session)
        return steps

    def _prepare(self, session: Session) -> None:
        try:
            self.complete(session)
        except Exception:  # `show` computes it again and reports the error to the page
            pass

    def _whatif(self, session: Session, k, patches) -> dict:
        return whatif_answer(self.payload(session), self.model, session.inputs, k, patches)

    def show(self, session: Session | None) -> Answer:
        """The page's walkthrough for the session's image, every what-if row in (none: the empty
        walkthrough)."""
        return {"walkthrough": None if session is None else self.complete(session)}

    def trust(self, session: Session | None) -> Answer:
        """The decision map's trust figures on this image (demo.evidence.image_trust: computed by the
        Explorer's chained trust event just before, so usually already in the session)."""
        if session is None:
            return {}
        payload = self.payload(session)
        model, method = self.explorer.model, payload["map"]["method"]
        figures = image_trust(model, session, Settings(method=method, target=PREDICTED).checked(model))[method]
        finite = {name: float(v) if np.isfinite(v) else None for name, v in figures.items()}  # JSON has no NaN
        return {"walkthrough": gr.update(trust={"key": payload["key"], "sentence": trust_sentence(method, figures),
                                                "figures": finite})}

    def manual(self, evt: gr.EventData, session: Session | None) -> Answer:
        """The page's patches removed by hand (event data: key, k, toggled) -> the `manual` prop."""
        data = getattr(evt, "_data", None) or {}
        if session is None or session.walkthrough is None or data.get("key") != session.walkthrough["key"]:
            return {}  # another image's click: nothing to say about this one
        answer = self._whatif(session, data.get("k"), data.get("toggled"))
        return {"walkthrough": gr.update(manual={**answer, "key": data["key"], "k": data["k"],
                                                 "toggled": list(data.get("toggled") or [])})}

    def endpoint(self, image) -> Answer:
        """/walkthrough: an image in, its payload out; the session then serves /whatif and /knockout."""
        model = self.explorer.model
        picture, notes = read_upload(upload_path(image), size=model.image_size)
        session = analyze(model, picture, name=upload_name(image), notes=notes, gradients=False)
        return {"walkthrough_json": self.complete(session), "session": session}

    def whatif(self, session: Session | None, k: float = 0, patches: str = "") -> Answer:
        """/whatif: the k most relevant patches removed, then `patches` ("3, 10") toggled."""
        return {"whatif_json": self._whatif(require(session), k, patches)}

    def knockout(self, session: Session | None, layer: float = 1, head: float = 1) -> Answer:
        """/knockout: head `head` of block `layer` (1-based) knocked out, from the payload."""
        return {"knockout_json": knockout_answer(self.payload(require(session)), layer, head)}

    def export(self, session: Session | None, **controls) -> Answer:
        """The Explorer's export, plus the walkthrough's numbers (.json) and its logit lens (.png)."""
        paths = self.explorer.export(session, **controls)["export_files"]
        payload = self.complete(require(session))
        folder = Path(paths[-1]).parent
        stem = Path(paths[-1]).name.removesuffix("_explanation.npz")
        numbers = folder / f"{stem}_walkthrough.json"
        numbers.write_text(json.dumps(payload))
        paths.append(str(numbers))
        lens = lens_figure(payload)
        if lens is not None:
            lens.save(folder / f"{stem}_walkthrough_lens.png")
            paths.append(str(folder / f"{stem}_walkthrough_lens.png"))
        return {"export_files": paths}


# ------------------------------------------------------------------------------------------------
# Layout and wiring

def walkthrough_tab(model, examples: list[Path], land: bool = False) -> dict[str, gr.components.Component]:
    """The tab: its own upload button and examples (feeding the same session as the Explorer's) and
    the one HTML component that draws every step. `land`: scroll to it when the page opens (as
    ?tab=walkthrough does)."""
    ui = {}
    with gr.Tab("Walkthrough", id="walkthrough", elem_id="walkthrough-tab"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=150, elem_id="wt-side"):
                ui["wt_upload"] = gr.UploadButton("Upload an image", file_types=["image"], elem_id="wt-upload")
                items = [(str(p), example_label(p.stem, model.class_names) or p.stem) if is_own(model) else str(p)
                         for p in examples]
                ui["wt_gallery"] = gr.Gallery(items, label="…or pick one", columns=2, height=440, allow_preview=False,
                                              interactive=False, object_fit="contain", elem_id="wt-examples",
                                              elem_classes="pixelated")
            with gr.Column(scale=8, min_width=320):
                ui["walkthrough"] = gr.HTML(None, html_template="", js_on_load=JS, elem_id="walkthrough",
                                            apply_default_css=False, trust=None, manual=None, land=land)
        ui.update(_endpoint_inputs())
    return ui


def _endpoint_inputs() -> dict[str, gr.components.Component]:
    """Hidden: the scripting endpoints' buttons, inputs and answers."""
    ui = {}
    # Hidden: the scripting endpoints' inputs and answers.
    ui["walkthrough_button"], ui["walkthrough_json"] = gr.Button(visible=False), gr.JSON(visible=False)
    ui["whatif_button"], ui["whatif_json"] = gr.Button(visible=False), gr.JSON(visible=False)
    ui["wt_k"], ui["wt_patches"] = gr.Number(0, precision=0, visible=False), gr.Textbox("", visible=False)
    ui["knockout_button"], ui["knockout_json"] = gr.Button(visible=False), gr.JSON(visible=False)
    ui["wt_layer"], ui["wt_head"] = gr.Number(1, precision=0, visible=False), gr.Number(1, precision=0, visible=False)
    return ui


def wire_walkthrough(ui, wt: Walkthrough, out: Callable, new_images: list, fast: dict) -> None:
    """Connects the tab: the walkthrough follows each of the `new_images` events (an upload, an
    example picked, the image cleared) as soon as it succeeds; `wt.after_trust` is then the event
    that follows the Explorer's trust figures with the decision's."""
    for event in new_images:
        event.success(out(wt.show), [ui["session"]], ui["walkthrough"], api_visibility="private",
                      show_progress="hidden", **fast)
    wt.after_trust = dict(fn=out(wt.trust), inputs=[ui["session"]], outputs=ui["walkthrough"],
                          api_visibility="private", show_progress="hidden", concurrency_id="trust")
    ui["walkthrough"].whatif(out(wt.manual), [ui["session"]], ui["walkthrough"], api_visibility="private",
                             show_progress="hidden", **fast)
    ui["walkthrough_button"].click(out(wt.endpoint), [ui["image_in"]], [ui["walkthrough_json"], ui["session"]],
                                   api_name="walkthrough", preprocess=False, **fast)
    ui["whatif_button"].click(out(wt.whatif), [ui["session"]], ui["whatif_json"], api_name="whatif",
                              inputs_kwargs={"k": ui["wt_k"], "patches": ui["wt_patches"]}, **fast)
    ui["knockout_button"].click(out(wt.knockout), [ui["session"]], ui["knockout_json"], api_name="knockout",
                                inputs_kwargs={"layer": ui["wt_layer"], "head": ui["wt_head"]}, **fast)


def own_upload(explorer: Explorer) -> Callable:
    """The tab's upload button: the Explorer's upload handler, which also shows the file there."""
    def upload(file, **controls):
        for answer in explorer.explain_steps(file, **controls):
            yield {"image_in": upload_path(file), **answer}
    return upload
