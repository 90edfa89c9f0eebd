"""The command-line tools over `vit_core`; each module has `main(argv) -> int`.

    python -m vit_core.cli.explain IMAGE... --checkpoint DIR --out DIR     drawings + .npz per image
    python -m vit_core.cli.evaluate --checkpoint DIR --data DIR            test and per-class accuracy
    python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR -n N   every map's trust over a test set
    python -m vit_core.cli.anatomy --checkpoint DIR [--data DIR]           the Model tab's cached figures
    python -m vit_core.cli.space USER/SPACE [--dry-run]                    deploy the app as a Space
    python -m vit_core.cli.train --data DIR --out DIR                      train (from a clone: python train.py)

Installed (`pip install -e .`), each is also a command: vit-explain, vit-evaluate, vit-faithfulness,
vit-anatomy, vit-space, vit-train (and vit-explorer, the app).

Bad input (an unreadable image or checkpoint, missing data, a `--device` that is not here) prints
one `error: ...` line on stderr and returns status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import sys

BAD_INPUT = 2  # exit status for input the command cannot use (argparse uses 2 for usage errors too)


def fail(message: object) -> int:
    """Print `error: message` on stderr; returns the exit status for bad input."""
    print(f"error: {message}", file=sys.stderr)
    return BAD_INPUT
