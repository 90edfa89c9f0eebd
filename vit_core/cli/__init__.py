"""The command-line tools over `vit_core`; each module has `main(argv) -> int`.

    python -m vit_core.cli.explain IMAGE... --checkpoint DIR --out DIR     drawings + .npz per image
    python -m vit_core.cli.evaluate --checkpoint DIR --data DIR            test and per-class accuracy
    python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR -n N   every map's trust over a test set
    python -m vit_core.cli.anatomy --checkpoint DIR [--data DIR]           the Model tab's cached figures
    python -m vit_core.cli.space USER/SPACE [--dry-run]                    deploy the app as a Space

Bad input (a flag or value argparse refuses, an unreadable image or checkpoint, missing data, a
`--device` that is not here) prints one `error: ...` line on stderr and returns status 2. Every
tool's parser, train.py's and the app's are `ArgumentParser`s from here, so they all fail alike;
the usage block appears only with `--help`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

BAD_INPUT = 2  # exit status for input the command cannot use (argparse uses 2 for usage errors too)
# The folder holding vit_core/: the commands run from here, and the files they record (results, the
# model card) name paths relative to it, so no machine's own folders end up in them.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def fail(message: object) -> int:
    """Print `error: message` on stderr; returns the exit status for bad input."""
    print(f"error: {message}", file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error: ...` line (naming --help) instead of the usage block on a bad
    flag or value; the exit status stays 2. Keeps the module docstring's layout in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")
        sys.exit(BAD_INPUT)


# What every tool that reads a model accepts (`vit_core.adapters.load_model`, as the app does).
CHECKPOINT_HELP = ("our checkpoint folder (save_pretrained), a timm ViT folder (save_for_hf), a transformers "
                   "ViT/DeiT folder (save_pretrained), or the Hub repo id of any of them")


def progress_bar(total: int, description: str):
    """A tqdm bar on stderr counting images; `update(n)` after each batch, close (or `with`) at the end."""
    from tqdm import tqdm  # imported here: parsing and bad-input paths never need it

    return tqdm(total=total, desc=description, unit="image", file=sys.stderr, dynamic_ncols=True)


def recorded_path(path: str | os.PathLike) -> str:
    """`path` as a results file records it: an absolute path relative to the project root (its
    name alone where no relative path leads there, e.g. another drive); a relative one as given."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        return path
    try:
        return os.path.relpath(path, PROJECT_ROOT)
    except ValueError:
        return Path(path).name


def recorded_command(prog: str, argv: Sequence[str]) -> str:
    """The command line `prog argv...` as a results file records it: every absolute path in it (an
    argument, or the value of `--flag=value`) through `recorded_path`."""
    def recorded(arg: str) -> str:
        flag, equals, value = arg.partition("=")
        if arg.startswith("--") and equals:
            return f"{flag}={recorded_path(value)}"
        return recorded_path(arg)
    return f"{prog} " + " ".join(shlex.quote(recorded(a)) for a in argv)
