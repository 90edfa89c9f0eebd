"""Time to accuracy: minutes until a training run first reached each mark (70 to 90 %) of
validation accuracy, and what an epoch costs on this machine for the shipped recipe against the
2022 report's.

    python benchmarks/time_to_accuracy.py --checkpoint checkpoints/vit-cifar10 [runs/v11 ...] [--data ../shared/cifar10]

- From each checkpoint's history.json (several side by side), after those of the runs it
  warm-started from (`--init-from`), if any: training minutes (validation included, teacher
  excluded) to each mark, as the model card gives them.
- Measured in this run, one after the other on the same CPU: images/s of the shipped recipe's
  training step (batch 128, bf16 where `--amp auto` picks it, the CNN teacher's forward pass,
  CutMix; with patch dropout and on whole images) and of the report's input path and step
  (torchvision ImageFolder + per-image PIL RandomResizedCrop/flip, batch 64, its 256-wide network,
  fp32), turned into minutes per epoch of 45 000 images. The report's accuracy curve has not been
  run here (160 epochs would take days on this CPU), so for it only the cost per epoch is printed.
Run it on an idle machine: a training run beside it halves every figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from train_throughput import report_pipeline_step, timed, train_folder
from vit_core.card import ACCURACY_MARKS, lineage, minutes_to_accuracy
from vit_core.config import RECIPES, TrainConfig
from vit_core.data import load_image_folder
from vit_core.devices import pick_device
from vit_core.teacher import ConvTeacher
from vit_core.training import build_model, build_optimizer, make_batch, train_step

ROOT = Path(__file__).resolve().parents[1]

EPOCH_IMAGES = 45_000


def shipped_step(data, cfg: TrainConfig, drop: float):
    """One step of the shipped recipe on ready data; returns a closure for `timed`."""
    device = pick_device("cpu")
    model = build_model(cfg, data.classes).train()
    optimizer = build_optimizer(model, cfg)
    teacher = ConvTeacher(n_classes=len(data.classes), class_names=data.classes).eval().requires_grad_(False)
    teacher = teacher.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=generator)
        images, _, targets = make_batch(data, idx, cfg.augment, model.mean, model.std, device, generator,
                                        cfg.random_erase, cfg.cutmix, cfg.mixup)
        train_step(model, optimizer, images, targets, cfg, device, drop, teacher)
    return step


def report_step(train_dir: Path, cfg: TrainConfig):
    """The report's input path and step with its network, in fp32."""
    model = build_model(cfg, [str(c) for c in range(10)]).train()
    return report_pipeline_step(train_dir, model, build_optimizer(model, cfg), cfg.batch_size)


def print_history(checkpoint: Path) -> None:
    history = lineage(checkpoint)
    reached = minutes_to_accuracy(history)
    print(f"{checkpoint}: {len(history)} epochs, best validation {max(h['val_acc'] for h in history):.4f}")
    for mark in ACCURACY_MARKS:
        minutes = reached[mark]
        print(f"  {mark:.0%} validation: " + (f"{minutes:6.1f} min" if minutes is not None else "not reached"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", default=[str(ROOT / "checkpoints" / "vit-cifar10")],
                        help="run or checkpoint folders whose histories to compare")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "cifar10"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for checkpoint in args.checkpoint:
        print_history(Path(checkpoint))
    train_dir, tmp = train_folder(args.data)
    data = load_image_folder(train_dir, limit=2048)
    shipped = TrainConfig(data="", out="")
    report = TrainConfig(data="", out="", **RECIPES["report"].settings)
    rates = {
        "shipped, patch dropout": timed(shipped_step(data, shipped, shipped.patch_drop), args.steps, 2, 128),
        "shipped, whole images": timed(shipped_step(data, shipped, 0.0), args.steps, 2, 128),
        "report": timed(report_step(train_dir, report), args.steps * 2, 2, report.batch_size),
    }
    for name, rate in rates.items():
        print(f"{name:>24s}: {rate:7.1f} img/s = {EPOCH_IMAGES / rate / 60:6.2f} min per epoch")
    ship_epoch = (shipped.patch_drop_end * EPOCH_IMAGES / rates["shipped, patch dropout"]
                  + (1 - shipped.patch_drop_end) * EPOCH_IMAGES / rates["shipped, whole images"]) / 60
    print(f"shipped {shipped.epochs} epochs ≈ {shipped.epochs * ship_epoch / 60:.1f} h; report {report.epochs} "
          f"epochs ≈ {report.epochs * EPOCH_IMAGES / rates['report'] / 3600:.1f} h (validation excluded)")
    report_epoch = EPOCH_IMAGES / rates["report"] / 60
    print(f"report/shipped minutes per epoch={report_epoch / ship_epoch:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
