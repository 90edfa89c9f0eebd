"""Measure a checkpoint on the CIFAR-10 test split: accuracy, per-class accuracy, confusion matrix.

    python -m vit_core.evaluate --checkpoint checkpoints/vit-cifar10 --data ../shared/cifar10

With `--write-card`, the figures are also saved beside the checkpoint (eval.json, confusion.png)
and the model card is rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from .data import DataError, load_split
from .model import ViTClassifier
from .training import pick_device, predict_probs


def evaluate(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             mirror: bool = True) -> dict:
    probs = predict_probs(model, images, device, mirror=mirror)
    predicted = probs.argmax(-1)
    n_classes = probs.shape[-1]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1).float()
    return {
        "accuracy": (predicted == labels).float().mean().item(),
        "per_class": {name: per_class[i].item() for i, name in enumerate(model.class_names)},
        "confusion": confusion.tolist(),
        "n_images": len(labels),
        "mirror": mirror,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder from save_pretrained, or a Hub repo id")
    parser.add_argument("--data", required=True, help="ImageFolder root with test/, or a torchvision CIFAR-10 root")
    parser.add_argument("--no-mirror", action="store_true", help="do not average each prediction with its mirror image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write-card", action="store_true", help="save eval.json + confusion.png beside the checkpoint and rebuild its README")
    args = parser.parse_args(argv)
    try:
        model = ViTClassifier.from_pretrained(args.checkpoint)
        test = load_split(args.data, "test")
    except (DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if test.classes != model.class_names:
        print(f"error: the data's classes {test.classes} differ from the model's {model.class_names}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    start = time.perf_counter()
    result = evaluate(model.to(device), test.images, test.labels, device, mirror=not args.no_mirror)
    result["seconds"] = time.perf_counter() - start
    result["data"] = str(Path(args.data) / "test")
    result["command"] = "python -m vit_core.evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"test accuracy: {result['accuracy'] * 100:.2f} % on {result['n_images']} images "
          f"(mirror averaging {'on' if result['mirror'] else 'off'})")
    for name, acc in result["per_class"].items():
        print(f"  {name:>12s}: {acc * 100:5.1f} %")
    if args.write_card:
        from .card import write_model_card
        from .viz import plot_confusion

        out = Path(args.checkpoint)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        plot_confusion(torch.tensor(result["confusion"]), model.class_names).save(out / "confusion.png")
        print(f"wrote {out / 'eval.json'}, {out / 'confusion.png'}, {write_model_card(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
