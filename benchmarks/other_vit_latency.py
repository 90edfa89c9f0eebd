"""How fast is the explorer on another library's ViT? Prints figures; not a test.

    python benchmarks/other_vit_latency.py [--family timm|transformers] [--repeats 20] [--browser N]

The model is a ViT-Tiny/16 at 224 px with random weights (the FLOPs of the trained one): timm's
`vit_tiny_patch16_224`, or transformers' `ViTForImageClassification` with the same shape (192 wide,
12 blocks of 3 heads, 1000 classes). In this process, with torch's default thread count:

- plain: one forward pass of the library's own code (the floor an explanation cannot beat);
- explain: prediction + every block's attention + rollout + gradient rollout (`vit_core.explain`:
  one forward and one backward pass), p50 over `--repeats`; goal <= 150 ms;
- its ratio to plain.

With `--browser N` the model is also saved to a temporary folder (`save_for_hf` / `save_pretrained`)
and `benchmarks/app_latency.py --browser N` times upload -> first panels and -> every panel shown
in Chromium on it; goal: first panels <= 400 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vit_core import explain, preprocess
from vit_core.adapters import adapt

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = sorted((ROOT / "demo" / "examples").glob("*.jpg"))[0]


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "timm":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                       intermediate_size=768, num_labels=1000)
    return ViTForImageClassification(config).eval()


def save(model: torch.nn.Module, family: str, folder: Path) -> None:
    if family == "timm":
        from timm.models import save_for_hf

        save_for_hf(model, folder, safe_serialization=True)
    else:
        model.save_pretrained(folder)


def p50_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("timm", "transformers"), default="timm")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--browser", type=int, default=0, help="also time N uploads in Chromium")
    args = parser.parse_args(argv)
    raw = build(args.family)
    model = adapt(raw)
    images = preprocess(Image.open(EXAMPLE), model)
    with torch.no_grad():
        plain = p50_ms(lambda: model(images), args.repeats)
    explained = p50_ms(lambda: explain(model, images), args.repeats)
    print(f"{args.family} ViT-Tiny/16 at 224 px, random weights, {torch.get_num_threads()} threads")
    print(f"  plain forward pass:                                        p50 {plain:6.1f} ms")
    print(f"  explain (prediction, attentions, rollout, gradient rollout): p50 {explained:6.1f} ms   "
          f"(goal <= 150 ms; {explained / plain:.2f}x the plain pass)")
    if args.browser:
        import app_latency

        with tempfile.TemporaryDirectory() as folder:
            save(raw, args.family, Path(folder))
            app_latency.main(["--browser", str(args.browser), "--checkpoint", folder])
        print("  (browser goal for this model: upload -> first panels p50 <= 400 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
