"""What the app tells its audience about how far to trust what it shows, and about the model.

- Per image (`image_trust`): for the current image and class, each fast map's deletion and
  insertion AUC as a percentile among random maps and its Spearman correlation with
  leave-one-patch-out occlusion (`vit_core.trust`), computed once per image, class and map and
  kept in the session.
- Per checkpoint (`Evidence.load`, once at start-up): the measured test accuracy (eval.json, from
  `python -m vit_core.cli.evaluate --write-card`), the test-set faithfulness table
  (faithfulness.json, from `python -m vit_core.cli.faithfulness`), both read from the checkpoint
  folder and never computed here; the method the app opens on, picked from that table; and the
  model's anatomy (anatomy.npz, or computed once from the example images when it is missing or
  describes other weights).

faithfulness.json is what `python -m vit_core.cli.faithfulness` writes: per method, per removal
mode ("drop", the token left out, is what the app's own trust figures use for our ViT), each
figure's mean, standard error and count over the test images.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from demo.session import (DEFAULT_METHOD, FAST_METHODS, PICKER_LABELS, Session, Settings, current_explanation,
                          is_own, methods_for)
from vit_core import ViTClassifier
from vit_core.anatomy import Anatomy, AnatomyError, compute_anatomy, load_anatomy, load_example_images
from vit_core.card import EVAL_INFO
from vit_core.devices import uses_bf16
from vit_core.faithfulness import REFERENCES, RESULTS_FILE, read_results, result_mean
from vit_core.methods import METHOD
from vit_core.trust import trust_figures

MAKE_FAITHFULNESS = "python -m vit_core.cli.faithfulness --checkpoint {folder} --data DATA_DIR"
# Test-set columns: (figure in faithfulness.json, heading, shown as a percentage).
TEST_SET_COLUMNS = (
    ("spearman_occlusion", "Spearman ρ with occlusion ↑", False),
    ("deletion_win_rate", "beats random: deletion ↑", True),
    ("insertion_win_rate", "insertion ↑", True),
    ("deletion_auc", "deletion AUC ↓", False),
    ("insertion_auc", "insertion AUC ↑", False),
)
# How the per-image figures remove a patch: our ViT's patch token is left out (the input it saw in
# training with patch dropout, and fewer tokens to run); another model's patch is filled with the
# dataset mean (it may not take a shortened sequence). The test-set table (our ViT's) shows "drop" too.
TEST_SET_REMOVAL = "drop"
# The perturbed inputs run in bf16 where the CPU has bf16 units (vit_core.devices.uses_bf16), about
# twice as fast (benchmarks/explain_latency.py); the AUCs move slightly, the occlusion reference not at all.
TRUST_BF16 = uses_bf16(torch.device("cpu"), "auto")


# ------------------------------------------------------------------------------------------------
# Per image

def _trust_key(method: str, target: int, settings: Settings) -> tuple:
    if METHOD[method].rollout_settings:  # its map, and so its figures, depend on them
        return target, method, settings.head_fusion, settings.discard_ratio
    return target, method


def trust_methods(model, settings: Settings) -> list[str]:
    """The maps scored for an image: every fast one the model has, and the chosen one if it is slow."""
    fast = [m for m in FAST_METHODS if m in methods_for(model)]
    return fast + ([] if METHOD[settings.method].fast else [settings.method])


def trust_removal(model) -> str:
    """"drop" for our ViT, "mean" for another model (see TEST_SET_REMOVAL)."""
    return TEST_SET_REMOVAL if is_own(model) else "mean"


def image_trust(model: ViTClassifier, session: Session, settings: Settings) -> dict[str, dict[str, float]]:
    """{method: trust figures} for the session's image and the settings' class (`trust_methods`):
    "deletion_percentile" and "insertion_percentile" (% of 20 random maps the map beats),
    "spearman_occlusion", and the two AUCs, removing patches as `trust_removal` says. Each map is
    scored once (per class and, for rollout and last-layer attention, per head fusion and discard
    ratio); the occlusion reference (removing the same way) is computed once per class and also
    serves the method picker."""
    methods, removal = trust_methods(model, settings), trust_removal(model)
    reference = REFERENCES[removal]
    explanation = current_explanation(model, session, settings).with_maps(
        model, session.inputs, methods + [reference], session.cache)
    target = int(explanation.target[0])
    keys = {method: _trust_key(method, target, settings) for method in methods}
    missing = [method for method in methods if keys[method] not in session.trust]
    if missing:
        maps = explanation.maps()
        figures = trust_figures(model, session.inputs, {m: maps[m] for m in missing}, explanation.target,
                                occlusion_map=maps[reference], removal=removal, bf16=TRUST_BF16)
        session.trust.update({keys[m]: figures[m].for_image(0) for m in missing})
    return {method: session.trust[keys[method]] for method in methods}


def trust_sentence(method: str, figures: dict[str, float]) -> str:
    """One line a presenter can read out: how the chosen map fares on this image."""
    deletion, insertion = figures["deletion_percentile"], figures["insertion_percentile"]
    rho = figures["spearman_occlusion"]
    rho_text = "n/a (a flat map)" if math.isnan(rho) else f"{rho:+.2f}"
    return (f"**{PICKER_LABELS[method]}** beats **{min(deletion, insertion):.0f} %** of random maps on this image "
            f"(deletion {deletion:.0f} %, insertion {insertion:.0f} %); Spearman ρ {rho_text} with "
            f"leave-one-patch-out")


def trust_table(figures: dict[str, dict[str, float]], current: str) -> str:
    """Every scored map's figures for this image as a compact markdown table (the chosen one bold)."""
    rows = ["| map | beats random: deletion | insertion | ρ with occlusion |", "|---|---|---|---|"]
    for method, values in figures.items():
        name = f"**{PICKER_LABELS[method]}**" if method == current else PICKER_LABELS[method]
        rho = values["spearman_occlusion"]
        rows.append(f"| {name} | {values['deletion_percentile']:.0f} % | {values['insertion_percentile']:.0f} % | "
                    f"{'n/a' if math.isnan(rho) else f'{rho:+.2f}'} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Per checkpoint: the files beside it

@dataclasses.dataclass(frozen=True)
class TestSetTable:
    """The test-set faithfulness figures (means over images) of the methods the app shows."""

    rows: dict[str, dict[str, float | None]]  # method (or "random") -> {figure: mean}
    n_images: int | None

    @classmethod
    def read(cls, folder: Path) -> "TestSetTable | None":
        """None when `folder` has no faithfulness results, they are unreadable or hold no method the
        app shows."""
        try:
            data = read_results(folder)
        except (OSError, ValueError):
            return None
        shown = [m for m in PICKER_LABELS if isinstance(data["methods"].get(m), dict)] if data else []
        if not shown:
            return None
        rows = {method: {figure: result_mean(data, method, TEST_SET_REMOVAL, figure)
                         for figure, _, _ in TEST_SET_COLUMNS}
                for method in shown + ["random"]}  # the random maps' AUCs: the baseline
        n_images = data.get("n")
        return cls(rows, int(n_images) if isinstance(n_images, (int, float)) else None)

    def spearman(self, method: str) -> float | None:
        return self.rows.get(method, {}).get("spearman_occlusion")

    def markdown(self) -> str:
        """The table, with one sentence on how to read it."""
        over = f"{self.n_images} test images" if self.n_images else "the test set"
        lines = [f"**Over the test set** ({RESULTS_FILE}: means over {over}, each map explaining the "
                 "predicted class, a removed patch's token left out). How to read it: ρ says how "
                 "closely a map ranks patches the way removing each one alone changes the prediction (1: "
                 "exactly); \"beats random\" is the chance it orders patches better than a random map "
                 "(50 %: no better than chance).", "",
                 "| map | " + " | ".join(heading for _, heading, _ in TEST_SET_COLUMNS) + " |",
                 "|---|" + "---|" * len(TEST_SET_COLUMNS)]
        for method, row in self.rows.items():
            cells = [_cell(row[figure], percent) for figure, _, percent in TEST_SET_COLUMNS]
            lines.append(f"| {PICKER_LABELS.get(method, 'random map')} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{100 * value:.0f} %" if percent else f"{value:.3f}"


def read_accuracy(folder: Path | None) -> tuple[float, int | None] | None:
    """(test accuracy, number of test images) from eval.json beside the checkpoint, if there."""
    try:
        data = json.loads((folder / EVAL_INFO).read_text())
        accuracy = float(data["accuracy"])
    except (TypeError, OSError, ValueError, KeyError):
        return None
    n_images = data.get("n_images")
    return accuracy, int(n_images) if isinstance(n_images, (int, float)) else None


def default_method(table: TestSetTable | None) -> str:
    """The fast method with the highest test-set Spearman correlation with occlusion; without a
    measurement, DEFAULT_METHOD."""
    measured = {m: table.spearman(m) for m in FAST_METHODS} if table else {}
    measured = {m: rho for m, rho in measured.items() if rho is not None and not math.isnan(rho)}
    return max(measured, key=measured.get) if measured else DEFAULT_METHOD


def model_anatomy(model: ViTClassifier, folder: Path | None, examples: Path) -> tuple[Anatomy, str]:
    """The anatomy cached beside the checkpoint if it describes these weights; otherwise computed
    now from the example images (one thread: a fraction of a second for 30 images, where two
    threads contend with the server's). Returns it and a note on where it came from."""
    if folder is not None:
        try:
            anatomy = load_anatomy(folder)
        except AnatomyError:
            anatomy = None
        if anatomy is not None and anatomy.matches(model):
            return anatomy, "read from the cache beside the checkpoint"
    images, labels = load_example_images(examples, model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        anatomy = compute_anatomy(model, images, labels, image_source=f"the {len(images)} example images")
    finally:
        torch.set_num_threads(threads)
    return anatomy, "computed at start-up (no cache for these weights)"


@dataclasses.dataclass
class Evidence:
    """What the app knows about its checkpoint, read once at start-up (see the module docstring)."""

    folder: Path | None = None                    # the checkpoint folder (None: from the Hub)
    accuracy: tuple[float, int | None] | None = None  # eval.json: test accuracy, images
    test_set: TestSetTable | None = None          # faithfulness.json
    anatomy: Anatomy | None = None
    anatomy_note: str = ""

    @classmethod
    def load(cls, model: ViTClassifier, folder: Path | None, examples: Path | None = None) -> "Evidence":
        """Reads the files in `folder`; with `examples`, the anatomy too (cached or computed once)."""
        anatomy, note = model_anatomy(model, folder, examples) if examples is not None else (None, "")
        return cls(folder=folder, accuracy=read_accuracy(folder),
                   test_set=TestSetTable.read(folder) if folder else None,
                   anatomy=anatomy, anatomy_note=note)

    @property
    def default_method(self) -> str:
        return default_method(self.test_set)

    def default_text(self) -> str:
        """What the app opens on and why, in one sentence."""
        method = self.default_method
        rho = self.test_set.spearman(method) if self.test_set else None
        if rho is not None:
            over = f" over {self.test_set.n_images} images" if self.test_set.n_images else ""
            why = (f"the most faithful of the fast methods on the test set (Spearman {rho:.2f} with "
                   f"occlusion{over})")
        else:
            why = "not yet measured on the test set for this checkpoint (the Compare tab says how)"
        rest = "" if method == "rollout" else "; rollout is one click away"
        return f"Showing **{PICKER_LABELS[method]}**: {why}{rest}."

    def how_to_measure(self) -> str:
        folder = self.folder if self.folder is not None else "CHECKPOINT_DIR"
        return f"`{MAKE_FAITHFULNESS.format(folder=folder)}` writes {RESULTS_FILE} beside the checkpoint"

    def test_set_markdown(self) -> str:
        """The test-set table with how to read it, or how to make it."""
        if self.test_set is not None:
            return self.test_set.markdown()
        return (f"**Over the test set:** not measured for this checkpoint yet: {self.how_to_measure()}; the "
                "app then shows the table here and opens on the most faithful fast method.")

    def accuracy_text(self) -> str:
        if self.accuracy is None:
            return "test accuracy not measured (no eval.json beside the checkpoint)"
        accuracy, n_images = self.accuracy
        return f"**{accuracy:.1%} test accuracy**" + (f" ({n_images:,} images)" if n_images else "")
