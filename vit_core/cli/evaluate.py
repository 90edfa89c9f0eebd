"""Measure a checkpoint on the CIFAR-10 test split: accuracy, per-class accuracy, confusion matrix.

    python -m vit_core.cli.evaluate --checkpoint checkpoints/vit-cifar10 --data ../shared/cifar10

The checkpoint may be any model the app explains (ours, a timm or transformers ViT folder, a Hub
repo id) whose classes are the data's and whose input size is the data's image size.

With `--write-card`, the figures are also saved beside the checkpoint (eval.json, confusion.png)
and the model card is rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..card import EVAL_INFO, TRAIN_INFO, write_model_card
from ..adapters import load_model
from ..checkpoints import CheckpointError
from ..data import DataError, load_split
from ..devices import DeviceError, pick_device
from ..evaluate import evaluate
from ..viz import plot_confusion
from . import CHECKPOINT_HELP, ArgumentParser, fail, progress_bar, recorded_command, recorded_path

PROG = "python -m vit_core.cli.evaluate"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--data", required=True, help="ImageFolder root with test/, or a torchvision CIFAR-10 root")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision into --data if missing")
    parser.add_argument("--no-mirror", action="store_true", help="do not average each prediction with its mirror image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--write-card", action="store_true",
                        help="save eval.json + confusion.png beside the checkpoint and rebuild its README")
    return parser.parse_args(argv)


def _print_result(result: dict) -> None:
    print(f"test accuracy: {result['accuracy'] * 100:.2f} % on {result['n_images']} images "
          f"(mirror averaging {'on' if result['mirror'] else 'off'})")
    for name, acc in result["per_class"].items():
        print(f"  {name:>12s}: {acc * 100:5.1f} %")


def _write_card(folder: Path, result: dict, class_names: list[str]) -> None:
    (folder / EVAL_INFO).write_text(json.dumps(result, indent=2))
    plot_confusion(torch.tensor(result["confusion"]), class_names).save(folder / "confusion.png")
    print(f"wrote {folder / EVAL_INFO}, {folder / 'confusion.png'}, {write_model_card(folder)}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        device = pick_device(args.device)
        model = load_model(args.checkpoint)
        test = load_split(args.data, "test", download=args.download)
    except (DeviceError, CheckpointError, DataError) as error:
        return fail(error)
    if test.classes != model.class_names:
        return fail(f"the data's classes {test.classes} differ from the model's {model.class_names}")
    if tuple(test.images.shape[-2:]) != (model.image_size, model.image_size):
        return fail(f"the data's images are {tuple(test.images.shape[-2:])}, the model takes "
                    f"{model.image_size}x{model.image_size}")
    if args.write_card and not (Path(args.checkpoint) / TRAIN_INFO).is_file():  # the card is built from it
        return fail(f"--write-card needs a checkpoint folder written by train.py (with {TRAIN_INFO}); "
                    f"{args.checkpoint!r} has none")
    print(f"evaluating on {len(test)} test images from {args.data}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with progress_bar(len(test), "evaluate") as bar:
        result = evaluate(model.to(device), test.images, test.labels, device, mirror=not args.no_mirror,
                          progress=bar.update)
    result["seconds"] = time.perf_counter() - start
    result["data"] = recorded_path(Path(args.data) / "test")
    result["command"] = recorded_command(PROG, sys.argv[1:] if argv is None else argv)
    _print_result(result)
    if args.write_card:
        _write_card(Path(args.checkpoint), result, model.class_names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
