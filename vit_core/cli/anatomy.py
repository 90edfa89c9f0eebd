"""Compute a checkpoint's model anatomy (vit_core.anatomy) and cache it beside the weights.

    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10 --data ../shared/cifar10 -n 1000
    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10    # the app's 30 example images

Writes DIR/anatomy.npz (or --out FILE), which the app reads instead of computing anything per
request. Run it again whenever the weights change: the cache records which weights it describes.
With --data, a fixed (seeded) subset of N test images is used; without, the example images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..anatomy import ANATOMY_NAME, AnatomyError, compute_anatomy, load_example_images, save_anatomy
from ..checkpoints import CheckpointError, load_checkpoint
from ..data import DataError, load_split
from ..preprocessing import normalize
from . import fail

PROG = "python -m vit_core.cli.anatomy"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "demo" / "examples"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder from save_pretrained, or a Hub repo id (then --out)")
    parser.add_argument("--data", help="ImageFolder root with test/, or a torchvision CIFAR-10 root "
                                       "(default: the example images)")
    parser.add_argument("-n", type=int, default=1000, help="test images to use with --data (default 1000)")
    parser.add_argument("--examples", default=str(EXAMPLES_DIR),
                        help="folder of <class>_NNNN.jpg images used without --data (default: demo/examples)")
    parser.add_argument("--out", help=f"where to write the cache (default: CHECKPOINT/{ANATOMY_NAME})")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: its own choice; 1 is faster on a CPU "
                             "another job keeps busy)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or (args.num_threads is not None and args.num_threads < 1):
        parser.error("-n, --batch-size and --num-threads must be at least 1")
    return args


def _images(args: argparse.Namespace, model) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The image set: (normalised images, labels, a description of where they came from)."""
    if args.data is None:
        images, labels = load_example_images(args.examples, model)
        return images, labels, f"{len(images)} example images from {args.examples}"
    test = load_split(args.data, "test", limit=args.n, seed=0)
    if test.classes != model.class_names:
        raise DataError(f"the data's classes {test.classes} differ from the model's {model.class_names}")
    if tuple(test.images.shape[-2:]) != (model.image_size, model.image_size):
        raise DataError(f"the test images are {tuple(test.images.shape[-2:])}, the model takes "
                        f"{model.image_size}x{model.image_size}")
    source = f"{len(test)} test images from {args.data} (seeded subset, seed 0)"
    return normalize(test.images, model.mean, model.std), test.labels, source


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.out is None and not Path(args.checkpoint).is_dir():
        return fail(f"{args.checkpoint!r} is not a local checkpoint folder; pass --out FILE to say "
                    f"where the cache goes")
    out = Path(args.out) if args.out else Path(args.checkpoint) / ANATOMY_NAME
    try:
        model = load_checkpoint(args.checkpoint)
        images, labels, source = _images(args, model)
    except (CheckpointError, DataError, AnatomyError) as error:
        return fail(error)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    anatomy = compute_anatomy(model, images, labels, batch_size=args.batch_size, image_source=source)
    seconds = time.perf_counter() - start
    try:
        save_anatomy(anatomy, out)
    except OSError as error:
        return fail(f"cannot write {out}: {error}")
    print(f"anatomy of {source} computed in {seconds:.2f} s; wrote {out} "
          f"({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
