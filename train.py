"""Train the ViT on CIFAR-10: `python train.py --help` lists every setting.

The command itself is `vit_core.cli.train` (installed as `vit-train`); this file keeps
`python train.py` working from a clone without installing anything.
"""

import sys

from vit_core.cli import train as command

PROG = "python train.py"  # what train_info.json records as the command that ran


def parse_args(argv=None):
    return command.parse_args(argv, prog=PROG)


def main(argv=None) -> int:
    return command.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
