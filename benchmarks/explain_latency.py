"""Latency of one full explanation of a single 32x32 image on this CPU (prints figures; not a test).

    python benchmarks/explain_latency.py [--checkpoint DIR] [--repeats N] [--trust-repeats N] [--threads N]

"explain": PIL image -> preprocess -> `vit_core.explain` (one forward + one backward pass:
probabilities, every block's per-head attention, rollout, gradient rollout, per-layer maps) ->
the drawn images (patch grid, attention-matrix thumbnails, rollout and gradient-rollout overlays,
per-layer strip).
"report": the 2022 report's way, reconstructed only to time it: for each block l, a full forward
pass in which block l's nn.MultiheadAttention is asked for its need_weights=True per-head weights
(L forward passes), then the report's rollout (heads averaged, no identity, transposed product).
No drawing, no gradient method - it does less work than "explain".
Both run interleaved in the same process with torch's default thread count (or --threads);
medians are printed, and the last line is `explain_ms=X report_ms=Y report/explain=Z`.

Trust (`--trust-repeats N`, 0 skips it): the same image through every map the app scores for
each image (`explain`'s three maps plus every other fast, class-specific map of the app's picker,
`CHEAP_METHODS` from `vit_core.methods`, computed the app's way with shared passes, and each on its
own for comparison; the slow maps are left to be computed on demand) and their `vit_core.trust`
figures with the interactive defaults (8 steps, 20 random maps), occlusion reference included;
the summary line uses what the app runs (token drop, bf16 where the CPU has bf16 units). Rebuilt
here only to time them in the same run: "before", the trust figures as first written (every column
of every map's and random map's curves evaluated, per mode, in float32 with mean fill), and the
curves with one pass per sequence length instead of one packed pass. p50 of wall and process CPU
time (on a machine busy with other work the CPU time is the steadier figure); goal: maps + trust
figures <= 150 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier, explain, fuse_heads, preprocess
from vit_core import viz
from vit_core.attribution import occlusion, predicted_class
from vit_core.devices import uses_bf16
from vit_core.faithfulness import auc, perturbation_curve, random_maps, spearman
from vit_core.methods import METHOD, PICKER, attribute
from vit_core.preprocessing import to_model_pixels
from vit_core.trust import TrustContext

ROOT = Path(__file__).resolve().parents[1]

# The class-specific maps the app scores for every image (demo.session.FAST_METHODS but the class-free ones);
# occlusion and Integrated Gradients wait to be asked for.
CHEAP_METHODS = tuple(m for m in PICKER if METHOD[m].fast and METHOD[m].class_specific)


def full_explanation(model: ViTClassifier, image: Image.Image) -> list[Image.Image]:
    batch = preprocess(image, model)
    result = explain(model, batch)
    view = to_model_pixels(image, model.image_size)
    fused = fuse_heads(result.attentions[0], result.head_fusion)
    return [
        viz.patch_grid(view, model.patch_size),
        viz.attention_matrix_grid(fused, cell=2),
        viz.overlay_map(view, result.rollout[0]),
        viz.overlay_map(view, result.grad_rollout[0]),
        viz.map_strip(result.layer_maps[0], view),
    ]


def compute_only(model: ViTClassifier, image: Image.Image):
    return explain(model, preprocess(image, model))


@torch.no_grad()
def report_way(model: ViTClassifier, image: Image.Image) -> torch.Tensor:
    batch = preprocess(image, model)
    attentions = []
    for block in model.blocks:
        captured = {}

        def keep_weights(module, args, output):
            # On a CPU the model spells its attention out instead of calling nn.MultiheadAttention,
            # so the block's normalised input is caught here and its MHA asked for the weights.
            captured["weights"] = block.attn(output, output, output, need_weights=True,
                                             average_attn_weights=False)[1]

        handle = block.norm1.register_forward_hook(keep_weights)
        try:
            model(batch)
        finally:
            handle.remove()
        attentions.append(captured["weights"])
    joint = attentions[0].mean(dim=1)[0]
    for weights in attentions[1:]:
        joint = joint @ weights.mean(dim=1)[0].T
    return joint[0, 1:]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# The app scores in bf16 where the CPU has bf16 units (demo.evidence.TRUST_BF16).
APP_BF16 = uses_bf16(torch.device("cpu"), "auto")


def cheap_maps(model: ViTClassifier, batch: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The app's way: the upload's forward pass, then `with_maps`, which shares passes where it can."""
    return explain(model, batch, target=target, gradients=False).with_maps(model, batch, CHEAP_METHODS).maps()


def separate_maps(model: ViTClassifier, batch: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same maps, each method with its own passes (before they were shared)."""
    maps = explain(model, batch, target=target).maps()
    maps.update({name: attribute(model, batch, name, target) for name in CHEAP_METHODS
                 if name != "grad_rollout"})
    return maps


def trust_before(model: ViTClassifier, batch: torch.Tensor, target: torch.Tensor, maps: dict) -> dict:
    """The first trust figures' work: all columns of the curves of every map and 20 random maps, per
    mode, float32, mean fill; then leave-one-patch-out and the percentiles and Spearman figures."""
    stacked = torch.stack(list(maps.values()), dim=1)
    every = torch.cat([stacked, random_maps(20, model.grid_size, seed=0)[None]], dim=1).flatten(0, 1)
    images = batch.repeat_interleave(len(every), dim=0)
    areas = {mode: auc(perturbation_curve(model, images, every, target.expand(len(every)), mode=mode, steps=8,
                                          batch_size=512)) for mode in ("deletion", "insertion")}
    reference = occlusion(model, batch, target)
    beaten = (areas["deletion"][len(maps):, None] > areas["deletion"][None, :len(maps)]).double().mean(0)
    return {"percentiles": beaten, "spearman": [spearman(m[0], reference[0]) for m in maps.values()]}


class OnePassPerLength(TrustContext):
    """The trust figures with the token-drop rows scored one pass per sequence length, as before
    `ViTClassifier.subset_logits` packed every length into one pass (rebuilt to time it)."""

    def _probabilities(self, keep: torch.Tensor) -> torch.Tensor:
        counts, probs = keep.sum(dim=-1), torch.empty(keep.shape[:2])
        for count in counts.unique():
            columns = (counts[0] == count).nonzero().squeeze(1)  # one image: every row's count is in counts[0]
            probs[:, columns] = super()._probabilities(keep[:, columns])
        return probs


def trust_runs(model: ViTClassifier, batch: torch.Tensor) -> dict:
    target = predicted_class(model, batch)
    maps = cheap_maps(model, batch, target)

    def now(removal: str, bf16: bool, spearman_too: bool = True):
        context = TrustContext(model, batch, target, removal=removal, bf16=bf16)
        return context.figures(maps) if spearman_too else context.curve_figures(maps)

    return {
        f"maps ({len(maps)}, passes shared)": lambda: cheap_maps(model, batch, target),
        "  the same, each method on its own": lambda: separate_maps(model, batch, target),
        "trust before": lambda: trust_before(model, batch, target, maps),
        "trust mean fill, fp32": lambda: now("mean", False),
        "trust mean fill, bf16": lambda: now("mean", True),
        "trust token drop, fp32": lambda: now("drop", False),
        "trust token drop, bf16": lambda: now("drop", True),
        "  of which curves only": lambda: now("drop", True, spearman_too=False),
        "  curves, one pass per length": lambda: OnePassPerLength(model, batch, target, removal="drop",
                                                                  bf16=True).curve_figures(maps),
        "  of which occlusion": lambda: occlusion(model, batch, target, mode="drop"),
    }


def clocked(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def trust_latency(model: ViTClassifier, image: Image.Image, repeats: int) -> str:
    """Prints p50 wall and CPU ms of every part; returns the summary line."""
    runs = trust_runs(model, preprocess(image, model))
    for run in runs.values():  # warm-up
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(clocked(run))
    p50 = {name: (median_ms([v[0] for v in values]), median_ms([v[1] for v in values]))
           for name, values in samples.items()}
    print(f"\ntrust figures for one image (8 steps, 20 random maps), p50 of {repeats}:")
    print(f"  {'part':<36} {'wall ms':>9} {'CPU ms':>9}")
    for name, (wall, cpu) in p50.items():
        print(f"  {name:<36} {wall:9.1f} {cpu:9.1f}")
    maps = p50[next(iter(p50))]
    app_way = f"trust token drop, {'bf16' if APP_BF16 else 'fp32'}"  # what demo.evidence.image_trust runs
    before, best = p50["trust before"], p50[app_way]
    total, baseline = maps[0] + best[0], maps[0] + before[0]
    print(f"maps + trust figures, the app's way ({app_way[6:]}): {total:.0f} ms wall ({maps[1] + best[1]:.0f} ms CPU); "
          f"before: {baseline:.0f} ms wall; goal <= 150 ms {'met' if total <= 150 else 'NOT met'} in this run")
    return f"trust_ms={total:.1f} baseline_trust_ms={baseline:.1f} baseline/trust={baseline / total:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "vit-cifar10"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--trust-repeats", type=int, default=5, help="repeats of the trust timing (0: skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if os.path.isfile(os.path.join(args.checkpoint, "model.safetensors")):
        model = ViTClassifier.from_pretrained(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        preset = "wide"  # the shipped checkpoint's size
        model = ViTClassifier.from_preset(preset)
        source = f"NO checkpoint at {args.checkpoint}: random weights, preset '{preset}'"
    model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    print(f"model: {source}; {model.n_params / 1e6:.2f} M parameters, depth {model.depth}, "
          f"{model.n_heads} heads, {model.grid_size ** 2 + 1} tokens")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.repeats} repeats after warm-up")

    runs = {"explain": lambda: full_explanation(model, image),
            "explain (no drawing)": lambda: compute_only(model, image),
            "report": lambda: report_way(model, image)}
    for run in runs.values():  # warm-up: allocator, font and colormap caches
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so background load hits all of them alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    for name, values in samples.items():
        print(f"{name:<22} median {median_ms(values):7.2f} ms   "
              f"min {min(values) * 1000:7.2f} ms   max {max(values) * 1000:7.2f} ms")
    explain_ms, report_ms = median_ms(samples["explain"]), median_ms(samples["report"])
    print(f"goal: explain <= 30 ms and faster than the report's way "
          f"({'met' if explain_ms <= 30 and explain_ms < report_ms else 'NOT met'} in this run)")
    if args.trust_repeats > 0:
        print(trust_latency(model, image, args.trust_repeats))
    print(f"explain_ms={explain_ms:.2f} report_ms={report_ms:.2f} report/explain={report_ms / explain_ms:.2f}")


if __name__ == "__main__":
    main()
