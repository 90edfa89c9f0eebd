"""Deploy the explorer to a Hugging Face Space: exactly the files the Space needs, nothing else.

    python -m vit_core.cli.space user/space-name --dry-run   # every file and the total size, offline
    python -m vit_core.cli.space user/space-name             # upload (after `hf auth login`, or with HF_TOKEN)
    make space-dry-run / make space SPACE=user/space-name    # the same through the Makefile

Uploading the whole folder would also send what a working copy accumulates (.venv/, runs/,
tests/artifacts/, caches). This command sends an allow-list instead: README.md (its front matter
configures the Space), requirements.txt, demo/ (the app and its example images), the library's
Python files, each checkpoint's weights, config, card, figures and anatomy cache, the pages under
docs/ that README.md links to, and the local images README.md and those pages show. The upload is one commit that also deletes files on the Space that are not
in the list (`--keep-others` keeps them), so the Space mirrors the list.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..checkpoints import hub_offline_reason, looks_like_repo_id
from . import ArgumentParser, fail

PROG = "python -m vit_core.cli.space"


def repository_or_cwd(folder: Path) -> Path:
    """`folder` when it is the repository (a clone, or an editable install of one); installed from a
    wheel, the package lies among others in site-packages, so deploy the current folder instead."""
    return folder if (folder / "pyproject.toml").is_file() else Path.cwd()


ROOT = repository_or_cwd(Path(__file__).resolve().parents[2])

# Glob patterns relative to the repository root; what the running Space reads.
INCLUDE = (
    "README.md", "requirements.txt", "LICENSE", "LICENSE.*",
    "demo/**/*",                      # the app, its helper modules, its example images
    "vit_core/**/*.py",               # the library the app imports
    "checkpoints/*/model.safetensors", "checkpoints/*/config.json", "checkpoints/*/anatomy.npz",
    "checkpoints/*/*.md", "checkpoints/*/*.png", "checkpoints/*/*.json", "checkpoints/*/*.log",
    "docs/*.md",                      # the pages README.md links to
)
# Never sent, even inside an included folder: caches, hidden files, pickles, temporary files, and
# the distillation teachers' weights (train.py reads them; the app never does).
EXCLUDE_DIRS = {"__pycache__", "cnn-teacher", "whitened-teacher"}
EXCLUDE_SUFFIXES = {".pyc", ".pyo", ".tmp", ".pt", ".pth", ".bin", ".ckpt", ".pkl"}
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\s[^>]*src=[\"']([^\"']+)[\"']")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


class SpaceError(RuntimeError):
    """The folder cannot be deployed as it is, or the upload failed; the message says why."""


def _excluded(relative: Path) -> bool:
    return (any(part.startswith(".") or part in EXCLUDE_DIRS for part in relative.parts)
            or relative.suffix in EXCLUDE_SUFFIXES)


def readme_images(root: Path) -> set[str]:
    """Local files that README.md or a page under docs/ shows as images (Markdown or <img>), relative
    to `root`."""
    found = set()
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if page.is_file():
            found |= _shown_images(page, root)
    return found


def _shown_images(page: Path, root: Path) -> set[str]:
    found = set()
    for match in _IMAGE_LINK.finditer(page.read_text(encoding="utf-8")):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if "://" in target or target.startswith(("/", "data:")):
            continue
        path = (page.parent / target).resolve()
        if path.is_file() and path.is_relative_to(root.resolve()):
            found.add(path.relative_to(root.resolve()).as_posix())
    return found


def space_files(root: str | Path = ROOT) -> list[str]:
    """Every file under `root` the Space gets, as sorted POSIX paths relative to `root`."""
    root = Path(root)
    files = set(readme_images(root))
    for pattern in INCLUDE:
        for path in root.glob(pattern):
            relative = path.relative_to(root)
            if path.is_file() and not _excluded(relative):
                files.add(relative.as_posix())
    return sorted(files)


def check_front_matter(root: Path, files: list[str]) -> str:
    """The app file README.md's front matter names; SpaceError unless it configures a Gradio
    Space whose app file is among `files`."""
    readme = root / "README.md"
    match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8")) if readme.is_file() else None
    if match is None:
        raise SpaceError(f"{readme} must start with the Space's front matter (--- sdk: gradio, app_file: ... ---)")
    settings = dict(re.findall(r"^(\w+):\s*(.+?)\s*$", match.group(1), re.MULTILINE))
    if settings.get("sdk") != "gradio":
        raise SpaceError(f"README.md's front matter must say `sdk: gradio`, not {settings.get('sdk')!r}")
    app_file = settings.get("app_file", "").strip("'\"")
    if app_file not in files:
        raise SpaceError(f"README.md's front matter names app_file {app_file!r}, which is not in the upload")
    return app_file


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def describe(root: Path, files: list[str]) -> str:
    """The upload as text: one line per file with its size, then the count and total."""
    sizes = [(root / f).stat().st_size for f in files]
    width = max(len(f) for f in files)
    lines = [f"  {f:<{width}}  {_size(s):>10}" for f, s in zip(files, sizes)]
    return "\n".join(lines + [f"{len(files)} files, {_size(sum(sizes))} in all"])


def upload(root: Path, files: list[str], space: str, keep_others: bool = False) -> str:
    """One commit to `space` (created as a Gradio Space if needed) adding `files` and, unless
    `keep_others`, deleting the Space's other files. Returns the commit URL. Checks that the Hub
    answers and a token is there before anything is sent, so offline it fails in seconds."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    reason = hub_offline_reason()
    if reason is not None:
        raise SpaceError(f"cannot upload to {space}: {reason}. `--dry-run` shows what would be sent.")
    token = get_token()
    if token is None:
        raise SpaceError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then try again")
    api = HfApi(token=token)
    try:
        api.create_repo(space, repo_type="space", space_sdk="gradio", exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in files]
        if not keep_others:
            remote = api.list_repo_files(space, repo_type="space")
            operations += [CommitOperationDelete(path_in_repo=f) for f in remote
                           if f not in set(files) and f != ".gitattributes"]  # the Hub needs .gitattributes
        info = api.create_commit(space, operations=operations, repo_type="space",
                                 commit_message=f"Deploy the ViT attention explorer ({len(files)} files)")
    except Exception as error:  # the Hub client raises many kinds (HTTP, auth, I/O); all end here
        raise SpaceError(f"upload to {space} failed ({type(error).__name__}: {error})") from error
    return info.commit_url


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("space", nargs="?", help="the Space's id, user/name (optional with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send nothing")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep files on the Space that are not in the upload (default: delete them)")
    parser.add_argument("--root", default=str(ROOT), help="the folder to deploy (default: this repository; installed from a wheel, the "
                             "current folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.space is not None and not looks_like_repo_id(args.space):
        return fail(f"{args.space!r} is not a Space id; pass user/name")
    if args.space is None and not args.dry_run:
        return fail("pass the Space's id, e.g. `make space SPACE=user/name` (or --dry-run to only list files)")
    root = Path(args.root)
    if not root.is_dir():
        return fail(f"--root {args.root}: no such folder (give the folder of a clone of this project)")
    try:
        files = space_files(root)
        check_front_matter(root, files)
    except (SpaceError, OSError) as error:
        return fail(error)
    print(describe(root, files))
    if args.dry_run:
        print(f"dry run: nothing sent{f' to {args.space}' if args.space else ''}")
        return 0
    try:
        url = upload(root, files, args.space, keep_others=args.keep_others)
    except SpaceError as error:
        return fail(error)
    print(f"uploaded to https://huggingface.co/spaces/{args.space} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
