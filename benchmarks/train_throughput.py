"""Training throughput on this machine: our whole pipeline vs the bare model step vs the report's.

    python benchmarks/train_throughput.py [--data ../shared/cifar10] [--steps 15] [--preset seed]

- pipeline:  in-memory uint8 CIFAR-10 -> index -> normalise -> batch augmentation -> train step
             (the code path of vit_core.training), batch 128;
- bare step: the same train step on a ready, pre-augmented tensor batch, batch 128;
- report:    torchvision ImageFolder + per-image PIL RandomResizedCrop/flip/ToTensor/Normalize in a
             DataLoader + one-hot float targets, batch 64 (the 2022 report's input path).
All three are measured in this run, one after the other, with the same model preset. Prints images/s
and, on its last line, `pipeline/bare_step=X.XX pipeline/report=Y.YY`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vit_core.data import load_image_folder
from vit_core.model import ViTClassifier
from vit_core.training import TrainConfig, build_optimizer, make_batch, train_step

ROOT = Path(__file__).resolve().parents[1]


def timed(run_step, steps: int, warmup: int, batch: int) -> float:
    for _ in range(warmup):
        run_step()
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    return steps * batch / (time.perf_counter() - start)


def synthetic_folder(root: Path, n_per_class: int = 64) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i}.jpg", quality=75)
    return root


def train_folder(data: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """DATA/train, or a synthetic JPEG ImageFolder (and its temporary folder, to clean up) without data."""
    train_dir = Path(data) / "train"
    if train_dir.is_dir():
        return train_dir, None
    tmp = tempfile.TemporaryDirectory()
    print(f"no data at {data}; timing on a synthetic JPEG ImageFolder")
    return synthetic_folder(Path(tmp.name)), tmp


def report_pipeline_step(train_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         batch_size: int = 64):
    """One step of the 2022 report's input path and loss: torchvision ImageFolder + per-image PIL
    RandomResizedCrop/flip/ToTensor/Normalize in a DataLoader, one-hot float targets."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(32), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(model.mean, model.std)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(train_dir), transform=tf),
                                         batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        loss = F.cross_entropy(model(x), F.one_hot(y, 10).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "cifar10"))
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    train_dir, tmp = train_folder(args.data)
    device = torch.device("cpu")
    cfg = TrainConfig(data=str(args.data), out="", preset=args.preset, amp="off")  # pipelines compared in fp32
    print(f"preset {args.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    def fresh_model():
        torch.manual_seed(0)
        model = ViTClassifier.from_preset(args.preset).train()
        return model, build_optimizer(model, cfg)

    # Ours: the in-memory pipeline (decoding happens once, before training, and is not timed).
    n_images = (args.steps + args.warmup) * 128
    data = load_image_folder(train_dir, limit=n_images)
    model, optimizer = fresh_model()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator)
    position = [0]

    def pipeline_step():
        start = position[0] % max(1, len(data) - 128)
        images, labels, _ = make_batch(data, order[start:start + 128], "rrc", model.mean, model.std, device, generator)
        position[0] += 128
        train_step(model, optimizer, images, labels, cfg, device)

    # Bare step: ready tensors, no data work at all.
    images, labels, _ = make_batch(data, order[:128], "rrc", model.mean, model.std, device, generator)

    def bare_step():
        train_step(model, optimizer, images, labels, cfg, device)

    # The report: per-image PIL transforms in a DataLoader, one-hot targets, batch 64.
    report_step = report_pipeline_step(train_dir, *fresh_model())

    bare = timed(bare_step, args.steps, args.warmup, 128)
    pipeline = timed(pipeline_step, args.steps, args.warmup, 128)
    report = timed(report_step, args.steps * 2, args.warmup, 64)
    print(f"bare model step (batch 128):           {bare:7.1f} img/s")
    print(f"our whole pipeline (batch 128):        {pipeline:7.1f} img/s")
    print(f"report's pipeline (PIL, batch 64):     {report:7.1f} img/s")
    print(f"pipeline/bare_step={pipeline / bare:.2f} pipeline/report={pipeline / report:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
