"""Train the ViT on CIFAR-10 and export the best validation weights.

    python train.py --data ../shared/cifar10 --out runs/mine                  # the default recipe, from scratch
    python train.py --data ../shared/cifar10 --out runs/quick --epochs 30     # the same recipe, shorter
    python train.py --data ~/data --download --recipe report --out runs/rep   # the 2022 report's settings
    torchrun --nproc_per_node 2 train.py --data ... --out ...                 # data parallel

The defaults (`--recipe default`) train the wide ViT from scratch, distilled from a CNN teacher: the
recipe the shipped weights' training began with (`wide-v7`); the shipped weights themselves come
from its warm restarts, the last `--recipe wide-v14 --init-from FOLDER --teacher
checkpoints/whitened-teacher`. `--recipe` picks a named recipe and any flag overrides it. Before
training, the run says which teacher it uses: with CIFAR-10's default split the shipped one
(checkpoints/cnn-teacher), else one it trains first. A run writes `train_state.pt` after every
epoch; `--resume` continues a killed run exactly. Installed, `vit-train` is the same command as
`python train.py`.
"""

from __future__ import annotations

import sys

from ..config import TrainConfig, TrainError, build_parser, config_from_args
from ..data import DataError
from ..records import portable_command
from ..training import train
from . import ArgumentParser

PROG = "vit-train"


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> TrainConfig:
    args = build_parser(__doc__, ArgumentParser, prog=prog).parse_args(argv)
    # The command goes into train_info.json and the model card: no path of this machine in it.
    return config_from_args(args, portable_command(prog, sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    cfg = parse_args(argv, prog)
    try:
        train(cfg)
    except (TrainError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
