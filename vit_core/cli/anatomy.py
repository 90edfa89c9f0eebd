"""Compute a checkpoint's model anatomy (vit_core.anatomy) and cache it beside the weights.

    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10 --data ../shared/cifar10 -n 1000
    python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10    # the app's 30 example images

Writes DIR/anatomy.npz (or --out FILE), which the app reads instead of computing anything per
request. Run it again whenever the weights change: the cache records which weights it describes.
With --data, a fixed (seeded) subset of -n test images is used (all of them when the split holds
fewer; the line printed says how many); without, the example images, and -n is refused. The
anatomy reads our own ViT's weights (patch filters, position embeddings), so a timm or transformers
model is refused: the app shows no Model tab for those.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..anatomy import ANATOMY_NAME, AnatomyError, compute_anatomy, load_example_images, save_anatomy
from ..adapters import load_model
from ..checkpoints import CheckpointError, looks_like_repo_id
from ..data import DataError, load_split
from ..model import ViTClassifier
from ..preprocessing import normalize
from . import ArgumentParser, fail, progress_bar

PROG = "python -m vit_core.cli.anatomy"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "demo" / "examples"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="our checkpoint folder (save_pretrained), or its Hub repo id (then --out)")
    parser.add_argument("--data", help="ImageFolder root with test/, or a torchvision CIFAR-10 root "
                                       "(default: the example images)")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision into --data if missing")
    parser.add_argument("-n", type=int, default=None, help="test images to use with --data (default 1000)")
    parser.add_argument("--examples", default=str(EXAMPLES_DIR),
                        help="folder of <class>_NNNN.jpg images used without --data (default: demo/examples)")
    parser.add_argument("--out", help=f"where to write the cache (default: CHECKPOINT/{ANATOMY_NAME})")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: its own choice; 1 is faster on a CPU "
                             "another job keeps busy)")
    args = parser.parse_args(argv)
    if args.data is None and (args.n is not None or args.download):
        parser.error("-n and --download choose test images and need --data; without it the example images are used")
    args.n = 1000 if args.n is None else args.n
    if args.n < 1 or args.batch_size < 1 or (args.num_threads is not None and args.num_threads < 1):
        parser.error("-n, --batch-size and --num-threads must be at least 1")
    return args


def _images(args: argparse.Namespace, model) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The image set: (normalised images, labels, a description of where they came from)."""
    if args.data is None:
        images, labels = load_example_images(args.examples, model)
        return images, labels, f"{len(images)} example images from {args.examples}"
    test = load_split(args.data, "test", download=args.download, limit=args.n, seed=0)
    if test.classes != model.class_names:
        raise DataError(f"the data's classes {test.classes} differ from the model's {model.class_names}")
    if tuple(test.images.shape[-2:]) != (model.image_size, model.image_size):
        raise DataError(f"the test images are {tuple(test.images.shape[-2:])}, the model takes "
                        f"{model.image_size}x{model.image_size}")
    subset = "seeded subset, seed 0" if len(test) == args.n else f"all of them: -n {args.n} asked for more"
    source = f"{len(test)} test images from {args.data} ({subset})"
    return normalize(test.images, model.mean, model.std), test.labels, source


def _load(args: argparse.Namespace) -> ViTClassifier:
    """The model, which must be our own ViT; CheckpointError otherwise."""
    model = load_model(args.checkpoint)
    if not isinstance(model, ViTClassifier):
        raise CheckpointError(f"{args.checkpoint!r} holds a {getattr(model, 'name', type(model).__name__)}; the "
                              f"anatomy reads our own ViT's weights, so it takes only this project's "
                              f"checkpoints (a folder from save_pretrained, or its Hub repo id)")
    return model


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.out is None and not Path(args.checkpoint).exists() and looks_like_repo_id(args.checkpoint):
        return fail(f"{args.checkpoint!r} is a Hub repo id, not a local checkpoint folder; pass --out FILE to "
                    f"say where the cache goes")
    try:
        model = _load(args)
        images, labels, source = _images(args, model)
    except (CheckpointError, DataError, AnatomyError) as error:
        return fail(error)
    out = Path(args.out) if args.out else Path(args.checkpoint) / ANATOMY_NAME
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    print(f"anatomy of {source}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with progress_bar(len(images), "anatomy") as bar:
        anatomy = compute_anatomy(model, images, labels, batch_size=args.batch_size, image_source=source,
                                  progress=bar.update)
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
