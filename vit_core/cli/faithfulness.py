"""Deletion/insertion AUCs of the explanation maps on test images, and the model-randomisation check.

    python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR -n 500 [--sanity K]

Prints, for attention rollout, gradient rollout, last-layer attention and random maps, the mean ±
standard deviation over images (and the standard error) of the deletion and insertion AUCs, each
map explaining the model's predicted class; with `--sanity K`, the Spearman correlations of the
cascading randomisation check on the first K images (`vit_core.faithfulness`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from ..checkpoints import CheckpointError, load_checkpoint
from ..data import DataError, load_split
from ..faithfulness import SANITY_METHODS, deletion_insertion, random_maps, randomization_sanity
from ..model import ViTClassifier, normalize
from ..rollout import HEAD_FUSIONS, explain
from . import fail


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vit_core.cli.faithfulness",
        description="Deletion/insertion AUC of attention rollout, gradient rollout, last-layer attention "
                    "and random maps on test images (mean ± std over images, and the standard error).")
    parser.add_argument("--checkpoint", required=True, help="folder with config.json and model.safetensors, "
                                                            "or a Hub repo id")
    parser.add_argument("--data", required=True, help="CIFAR-10 root (ImageFolder train/ test/ or torchvision)")
    parser.add_argument("-n", type=int, default=500, help="number of test images (a fixed random subset)")
    parser.add_argument("--steps", type=int, default=None, help="curve steps (default: one patch per step)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset and random maps")
    parser.add_argument("--sanity", type=int, default=0, metavar="K",
                        help="also run the model-randomisation check on the first K images")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision if missing")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("-n must be at least 1")
    if not 0.0 <= args.discard_ratio < 1.0:
        parser.error(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    return args


def explain_in_chunks(model: ViTClassifier, images: torch.Tensor, head_fusion: str, discard_ratio: float,
                      chunk: int = 64) -> dict[str, torch.Tensor]:
    """Probabilities, targets and the three maps for many images, `chunk` images per pass."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), chunk):
        explanation = explain(model, images[start:start + chunk], head_fusion=head_fusion,
                              discard_ratio=discard_ratio)
        for name, value in {"probs": explanation.probs, "target": explanation.target, **explanation.maps()}.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def summary(values: torch.Tensor) -> str:
    """"mean ± std (sem s)" of per-image values."""
    values = values.double()
    std = values.std().item() if len(values) > 1 else 0.0
    return f"{values.mean().item():.3f} ± {std:.3f} (sem {std / math.sqrt(len(values)):.3f})"


def _print_sanity(model: ViTClassifier, images: torch.Tensor, args: argparse.Namespace) -> None:
    print(f"model randomisation (Spearman with the trained map, {len(images)} images):")
    for method in SANITY_METHODS:
        stages = randomization_sanity(model, images, method=method, head_fusion=args.head_fusion,
                                      discard_ratio=args.discard_ratio, seed=args.seed)
        print(f"  {method:<13} " + "  ".join(f"{s['stage']}: {s['spearman']:+.2f}" for s in stages))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint)
        data = load_split(args.data, "test", download=args.download, limit=args.n, seed=args.seed)
    except (CheckpointError, DataError) as error:
        return fail(error)
    if tuple(data.images.shape[-2:]) != (model.image_size, model.image_size):
        return fail(f"the data's image size {tuple(data.images.shape[-2:])} is not the model's "
                    f"{model.image_size}x{model.image_size}")
    images = normalize(data.images, model.mean, model.std)
    started = time.perf_counter()
    explained = explain_in_chunks(model, images, args.head_fusion, args.discard_ratio)
    target = explained["target"]
    maps = {name: explained[name] for name in ("rollout", "grad_rollout", "last_layer")}
    maps["random"] = random_maps(len(images), model.grid_size, seed=args.seed)
    accuracy = (target == data.labels).double().mean().item()
    steps = args.steps or model.grid_size ** 2
    print(f"checkpoint {args.checkpoint}: {len(images)} test images, accuracy {accuracy:.3f}; target = "
          f"predicted class; head fusion {args.head_fusion}, discard ratio {args.discard_ratio}; "
          f"{steps} steps over {model.grid_size ** 2} patches, fill = dataset mean")
    try:
        results = deletion_insertion(model, images, maps, target, steps=args.steps, batch_size=args.batch_size)
    except ValueError as error:  # --steps or --batch-size out of range for this model
        return fail(error)
    print(f"{'method':<14} {'deletion AUC (lower is better)':<34} insertion AUC (higher is better)")
    for name, entry in results.items():
        print(f"{name:<14} {summary(entry['deletion_auc']):<34} {summary(entry['insertion_auc'])}")
    if args.sanity > 0:
        _print_sanity(model, images[:args.sanity], args)
    print(f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
