"""Attribution maps and their per-image trust figures: cost and agreement (prints figures; not a test).

    python benchmarks/trust_probe.py [--checkpoint DIR] [--repeats N]            # (a) timing only
    python benchmarks/trust_probe.py --data ../shared/cifar10 -n 50              # (a) + (b)

(a) One image (the first test image with --data, else a shipped example): the wall time of every
map (each method of `vit_core.methods`, on its own passes) and of `vit_core.trust.trust_figures` for all of them; medians over --repeats.
(b) Over n test images (a fixed random subset), per method: the mean Spearman correlation with
leave-one-patch-out occlusion (dataset-mean fill, drop in the predicted class's log-probability)
and the deletion/insertion win rate against random maps (the chance that the map's AUC beats one
random map's, i.e. the mean trust percentile / 100), with the standard error over images, and the
share of images on which the map's deletion AUC beats the median random map ("images > median").
The target is always the predicted class. --methods picks the maps (default: all), --removal how a
patch is removed (mean fill or token drop; the occlusion reference removes it the same way),
--bf16 runs the perturbed inputs in bfloat16, --threads sets torch's thread count.
--reference-bf16 also computes the occlusion reference under bfloat16 autocast (final LayerNorm and
head in float32) and prints how far each map's Spearman figure moves with it: why the trust
figures keep that reference in float32. Times are given as
wall and process CPU time: on a machine busy with other work the CPU time is the steadier figure.
`lrp_composite`'s rules were picked on the default subset (-n 50 --seed 0); judge it on another
--seed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier, normalize, preprocess
from vit_core.attribution import predicted_class
from vit_core.methods import METHOD_NAMES, attribute, check_methods
from vit_core.faithfulness import spearman_rows
from vit_core.trust import trust_figures

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Wall and process CPU seconds since creation. On a busy machine the wall time mostly measures
    the other processes; the CPU time is the work itself (on idle cores, wall ~ CPU / threads)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def all_maps(model, images, target, methods: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                  dict[str, tuple[float, float]]]:
    """The maps of `methods` for `images`, the occlusion map (computed even when not among them)
    and the (wall, CPU) seconds each took, each method on its own passes."""
    maps, seconds = {}, {}
    for name in methods + ([] if "occlusion" in methods else ["occlusion"]):
        clock = Clock()
        maps[name] = attribute(model, images, name, target)
        seconds[name] = clock.read()
    loo = maps["occlusion"] if "occlusion" in methods else maps.pop("occlusion")
    return maps, loo, seconds


def reference(model, images, target, maps, loo, removal: str) -> torch.Tensor:
    """The leave-one-patch-out map that removes patches as `removal` does."""
    if removal == "mean":
        return loo
    return maps["occlusion_drop"] if "occlusion_drop" in maps else attribute(model, images, "occlusion_drop", target)


def time_one_image(model, image: torch.Tensor, args) -> None:
    timings: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        total = Clock()
        target = predicted_class(model, image)
        maps, loo, seconds = all_maps(model, image, target, args.methods)
        clock = Clock()
        loo = reference(model, image, target, maps, loo, args.removal)
        trust_figures(model, image, maps, target, occlusion_map=loo, steps=args.steps, n_random=args.n_random,
                      bf16=args.bf16, removal=args.removal)
        seconds["trust figures"] = clock.read()
        seconds["total"] = total.read()
        for name, value in seconds.items():
            timings.setdefault(name, []).append(value)
    print(f"one image, {len(maps)} maps, trust figures with {args.steps} steps and {args.n_random} random "
          f"maps, removal {args.removal}{' (bf16)' if args.bf16 else ''}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}:")
    print(f"  {'part':<24} {'wall ms':>9} {'CPU ms':>9}")
    for name, values in timings.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"  {name:<24} {1000 * wall:9.1f} {1000 * cpu:9.1f}")


def _mean_sem(values: np.ndarray) -> str:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "   nan"
    sem = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():6.3f} ± {sem:.3f}"


class Float32(torch.nn.Module):
    """`module` run in float32 with autocast off."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.inner(x.float())


@contextmanager
def bf16_blocks(model):
    """bfloat16 autocast for the blocks; the final LayerNorm and the head stay in float32."""
    norm, head = model.norm, model.head
    model.norm, model.head = Float32(norm), Float32(head)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        model.norm, model.head = norm, head


def reference_shift(model, batch, target, maps, loo, removal) -> dict[str, list[float]]:
    """|Spearman(map, reference) - Spearman(map, bf16 reference)| per map and image, and under
    "(reference itself)" the Spearman correlation of the two references."""
    with bf16_blocks(model):
        low = attribute(model, batch, "occlusion" if removal == "mean" else "occlusion_drop", target)
    low = low.float()
    shifts = {"(reference itself)": spearman_rows(loo, low).tolist()}
    for name, value in maps.items():
        value = value.detach().float()
        shifts[name] = (spearman_rows(value, loo) - spearman_rows(value, low)).abs().tolist()
    return shifts


def print_shifts(shifts: dict[str, list[float]]) -> None:
    values = {name: np.array([v for v in vs if math.isfinite(v)]) for name, vs in shifts.items()}
    itself = values.pop("(reference itself)")
    print("\nocclusion reference in bf16 (blocks autocast, head float32) instead of float32: Spearman of the two "
          f"references median {np.median(itself):.3f}, 5th percentile {np.quantile(itself, 0.05):.3f}, "
          f"min {itself.min():.3f}; the shown Spearman of each map moves by")
    print(f"  {'map':<22} {'median':>8} {'p95':>8} {'max':>8}")
    for name, moved in values.items():
        print(f"  {name:<22} {np.median(moved):8.3f} {np.quantile(moved, 0.95):8.3f} {moved.max():8.3f}")


def agreement(model, images: torch.Tensor, args) -> None:
    rows: dict[str, dict[str, list]] = {}
    shifts: dict[str, list[float]] = {}
    spent: dict[str, float] = {}  # CPU seconds
    for start in range(0, len(images), args.chunk):
        batch = images[start:start + args.chunk]
        target = predicted_class(model, batch)
        maps, loo, seconds = all_maps(model, batch, target, args.methods)
        for name, value in seconds.items():
            spent[name] = spent.get(name, 0.0) + value[1]
        loo = reference(model, batch, target, maps, loo, args.removal)
        if args.reference_bf16:
            for name, values in reference_shift(model, batch, target, maps, loo, args.removal).items():
                shifts.setdefault(name, []).extend(values)
        figures = trust_figures(model, batch, maps, target, occlusion_map=loo,
                                steps=args.steps, n_random=args.n_random, seed=args.seed, bf16=args.bf16,
                                removal=args.removal)
        for name, entry in figures.items():
            row = rows.setdefault(name, {"spearman": [], "deletion": [], "insertion": []})
            row["spearman"] += entry.spearman_occlusion.tolist()
            row["deletion"] += (entry.deletion_percentile / 100).tolist()
            row["insertion"] += (entry.insertion_percentile / 100).tolist()
    print(f"\n{len(images)} test images, target = predicted class, removal {args.removal}; "
          "mean ± standard error over images")
    print(f"{'method':<22} {'Spearman with LOO':<18} {'deletion win rate':<18} {'insertion win rate':<18} "
          f"{'images > median':<16} CPU ms/image")
    for name, row in rows.items():
        cost = 1000 * spent.get(name, float("nan")) / len(images)
        # The share of images on which the map's deletion AUC beats the median random map's.
        beats = float(np.mean(np.array(row["deletion"]) > 0.5))
        print(f"{name:<22} {_mean_sem(np.array(row['spearman'])):<18} {_mean_sem(np.array(row['deletion'])):<18} "
              f"{_mean_sem(np.array(row['insertion'])):<18} {beats:<16.3f} {cost:7.1f}")
    if shifts:
        print_shifts(shifts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "vit-cifar10"))
    parser.add_argument("--data", default=None, help="CIFAR-10 root (ImageFolder train/ test/); enables (b)")
    parser.add_argument("-n", type=int, default=50, help="number of test images for (b)")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion curve steps")
    parser.add_argument("--n-random", type=int, default=20, help="random maps per image")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for (a)")
    parser.add_argument("--chunk", type=int, default=10, help="images per batch in (b)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset and random maps")
    parser.add_argument("--bf16", action="store_true", help="perturbed inputs in bfloat16")
    parser.add_argument("--reference-bf16", action="store_true",
                        help="also: how far the Spearman figures move with the occlusion reference in bf16")
    parser.add_argument("--removal", choices=("mean", "drop"), default="mean",
                        help="how a patch is removed in the curves and the occlusion reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="comma-separated maps to compute and score (default: all)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or args.chunk < 1:
        parser.error("-n, --repeats and --chunk must be at least 1")
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    try:
        check_methods(args.methods or [""])
    except ValueError as error:
        parser.error(str(error))

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = ViTClassifier.from_pretrained(args.checkpoint)
    if args.data is None:
        image = preprocess(Image.open(ROOT / "demo" / "examples" / "cat_0000.jpg"), model)
        time_one_image(model, image, args)
        return 0
    from vit_core.data import load_split

    data = load_split(args.data, "test", limit=args.n, seed=args.seed)
    images = normalize(data.images, model.mean, model.std)
    time_one_image(model, images[:1], args)
    agreement(model, images, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
