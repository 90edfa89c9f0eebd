"""Paths as the records a run leaves (train_info.json, eval.json, faithfulness.json, the model
card) keep them: never an absolute path of the machine that ran, which means nothing on another.

A path given relative stays as given (`../shared/cifar10`, `runs/mine`); an absolute one under the
working folder becomes relative to it; any other absolute one is kept by its last name only.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """`path` as a record may keep it; `root` is the folder relative paths start from (the cwd)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    root = Path(os.getcwd() if root is None else root)
    for candidate, base in ((Path(os.path.abspath(text)), Path(os.path.abspath(root))),
                            (Path(text).resolve(), root.resolve())):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()  # "." for the folder itself
    return Path(text).name or text


def portable_command(prog: str, argv: Sequence[str], root: str | os.PathLike | None = None) -> str:
    """The command line `prog argv...` as a record keeps it: every absolute path in it, alone or
    as a `--flag=value` value, made portable (`portable_path`)."""
    words = []
    for word in argv:
        flag, equals, value = word.partition("=")
        if equals and flag.startswith("-") and os.path.isabs(value):
            word = f"{flag}={portable_path(value, root)}"
        elif os.path.isabs(word):
            word = portable_path(word, root)
        words.append(shlex.quote(word))
    return " ".join([prog, *words])
