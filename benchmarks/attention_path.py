"""Train-step throughput on a CPU: MHA's fused attention kernel vs the spelled-out attention the
model uses on CPUs, and the spelled-out path with patch dropout (train.py's --patch-drop).

    python benchmarks/attention_path.py [--preset wide] [--batch-size 128] [--steps 12] [--rounds 3]

Every variant runs the same model (same weights at the start), the same batch and AdamW step.
Variants are interleaved over `--rounds` rounds and each one's best round is kept, so a passing load
on a shared machine skews all of them alike. Prints images/s and, last, the ratios against the fused
kernel measured in this run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vit_core.model import Block, ViTClassifier

explicit_forward = Block.forward


def fused_forward(self: Block, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
    """Block.forward as it runs on CUDA: the same maths through `nn.MultiheadAttention`'s kernel."""
    x = x + self.fused_attention(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def images_per_second(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor,
                      drop_patches: float, steps: int, warmup: int = 3) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(images, drop_patches=drop_patches), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wide", help="model size (default: the shipped one)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    initial = ViTClassifier.from_preset(args.preset).state_dict()
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    variants = {  # name: (Block.forward, patch drop)
        "fused MHA kernel": (fused_forward, 0.0),
        "spelled-out attention": (explicit_forward, 0.0),
        "spelled-out + patch drop 0.25": (explicit_forward, 0.25),
        "spelled-out + patch drop 0.5": (explicit_forward, 0.5),
    }
    best = {name: 0.0 for name in variants}
    print(f"preset {args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    try:
        for _ in range(args.rounds):
            for name, (forward, drop) in variants.items():
                Block.forward = forward
                model = ViTClassifier.from_preset(args.preset).train()
                model.load_state_dict(initial)
                best[name] = max(best[name], images_per_second(model, images, labels, drop, args.steps))
    finally:
        Block.forward = explicit_forward
    for name, rate in best.items():
        print(f"{name:32s} {rate:7.1f} img/s")
    base = best["fused MHA kernel"]
    print(" ".join(f"{name.replace(' ', '_')}/fused={rate / base:.2f}" for name, rate in best.items()
                   if name != "fused MHA kernel"))


if __name__ == "__main__":
    main()
