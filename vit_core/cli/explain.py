"""Explain images from the command line.

    python -m vit_core.cli.explain IMAGE... --checkpoint DIR --out DIR [--target CLASS]
                                   [--head-fusion mean|max|min] [--discard-ratio R]

For each image, writes into DIR (file names start with the image's stem):
  <stem>_patches.png        the model's 32x32 view cut into its numbered patches
  <stem>_attention.png      every block's attention matrix (heads fused), CLS/patch axes
  <stem>_attention_last.png the last block's attention matrix, larger and labelled
  <stem>_rollout.png, <stem>_grad_rollout.png, <stem>_last_layer.png   map overlays
  <stem>_layers.png         each block's CLS -> patch attention over the image
  <stem>.npz                attentions [L, H, T, T], raw maps, probabilities and the settings used
  <stem>_walkthrough.npz    with --walkthrough: every Walkthrough step's numbers (vit_core.walkthrough)
Every input is checked before anything is written: an unreadable image or checkpoint prints an
error and exits with status 2, leaving DIR untouched. Images are read as the app reads uploads
(`vit_core.images.read_image`, with its size limits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .. import viz
from ..checkpoints import CheckpointError, load_checkpoint
from ..images import ImageError, read_image
from ..model import ViTClassifier, preprocess, resampling, to_model_pixels
from ..rollout import HEAD_FUSIONS, Explanation, explain, fuse_heads
from ..walkthrough import walkthrough_arrays
from . import fail

OUTPUTS = ("patches", "attention", "attention_last", "layers", "rollout", "grad_rollout", "last_layer")


class BadArgument(ValueError):
    """A command-line value that does not fit the model or the file system."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_core.cli.explain",
                                     description="Draw attention explanations of a ViT's predictions.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size; resized to the model's)")
    parser.add_argument("--checkpoint", required=True, help="folder with config.json and model.safetensors, "
                                                            "or a Hub repo id")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--target", default=None, help="class to explain, by name or index (default: predicted)")
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="in [0, 1); default 0")
    parser.add_argument("--walkthrough", action="store_true",
                        help="also write <stem>_walkthrough.npz: logit lens, head knock-outs, what-if curves")
    args = parser.parse_args(argv)
    if not 0.0 <= args.discard_ratio < 1.0:
        parser.error(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    return args


def _read_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            images.append(read_image(path))
        except ImageError as error:
            raise ImageError(f"cannot read image {path!r}: {error}") from error
    return images


def parse_target(target: str | None, class_names: list[str]) -> int | None:
    """A class name or index -> index; None stays None (explain the predicted class)."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(class_names):
        return int(target)
    raise BadArgument(f"--target {target!r} is neither a class name nor an index in "
                      f"[0, {len(class_names)}); classes: {', '.join(class_names)}")


def output_stems(paths: list[str]) -> list[str]:
    """File-name stems for the outputs; the same name from different folders gets a number."""
    stems = [Path(p).stem or "image" for p in paths]
    if len(set(stems)) < len(stems):
        stems = [f"{i:03d}_{stem}" for i, stem in enumerate(stems)]
    return stems


def _write_one(out: Path, stem: str, i: int, image: Image.Image, model: ViTClassifier,
               result: Explanation, arrays: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> None:
    """Image i's drawings and .npz."""
    view = to_model_pixels(image, model.image_size, resampling(model))
    fused = fuse_heads(result.attentions[i], result.head_fusion).numpy()  # [L, T, T]
    drawings = {
        "patches": viz.patch_grid(view, model.patch_size),
        "attention": viz.attention_matrix_grid(fused, cell=2),
        "attention_last": viz.attention_matrix_image(
            fused[-1], title=f"block {len(fused)} attention ({result.head_fusion} of heads)"),
        "layers": viz.map_strip(arrays["layer_maps"][i], view),
    }
    for method in ("rollout", "grad_rollout", "last_layer"):
        drawings[method] = viz.overlay_map(view, arrays[method][i])
    for kind, drawing in drawings.items():
        drawing.save(out / f"{stem}_{kind}.png")
    np.savez_compressed(out / f"{stem}.npz", **{name: value[i] for name, value in arrays.items() if value.ndim > 0},
                        **extra)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        images = _read_images(args.images)
        model = load_checkpoint(args.checkpoint)
        target = parse_target(args.target, model.class_names)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise BadArgument(f"--out {args.out!r} exists and is not a folder")
    except (ImageError, CheckpointError, BadArgument) as error:
        return fail(error)

    batch = preprocess(images, model)
    result = explain(model, batch, target=target, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    arrays = result.as_numpy()
    out.mkdir(parents=True, exist_ok=True)
    names = model.class_names
    for i, (path, stem) in enumerate(zip(args.images, output_stems(args.images))):
        extra = dict(head_fusion=np.array(args.head_fusion), discard_ratio=np.array(args.discard_ratio),
                     target_given=np.array(target if target is not None else -1),
                     image=np.array(str(path)), checkpoint=np.array(str(args.checkpoint)),
                     class_names=np.array(names), image_size=np.array(model.image_size),
                     patch_size=np.array(model.patch_size))
        _write_one(out, stem, i, images[i], model, result, arrays, extra)
        if args.walkthrough:  # the what-if order follows the gradient rollout drawn beside it
            np.savez_compressed(out / f"{stem}_walkthrough.npz",
                                **walkthrough_arrays(model, batch[i], arrays["grad_rollout"][i]))
        predicted, explained = int(arrays["probs"][i].argmax()), int(arrays["target"][i])
        print(f"{path}: predicted {names[predicted]} ({arrays['probs'][i][predicted]:.2f}); explained "
              f"{names[explained]}; wrote {out / stem}_*.png and {stem}.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
