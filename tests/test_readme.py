"""The README (and docs/) stay true: every command named exists and accepts every flag given to it,
every make target and linked file exists, the gradio_client example names real endpoints and the
shipped model's heads, the Python quick start runs, and the README stays short."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MAX_LINES = 200


def code_lines(text: str) -> list[str]:
    """Command lines from fenced blocks (backslash continuations joined) and inline code spans."""
    lines = []
    for block in re.findall(r"```[\w-]*\n(.*?)```", text, re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return [line.split(" #")[0] for line in lines]


# A documented command -> the tool whose --help lists its flags: a vit-* entry point's name without
# "vit-", or a benchmark's path.
TOOL_PATTERNS = [
    (re.compile(r"(?:^|\s)(?:python -m vit_core\.cli\.|vit-)(\w+)\b"), None),
    (re.compile(r"(?:^|\s)(?:python |torchrun .*?)train\.py\b"), "train"),
    (re.compile(r"(?:^|\s)python demo/app\.py\b"), "explorer"),
    (re.compile(r"(?:^|\s)python (benchmarks/\w+\.py)\b"), None),
]
PROJECT_TOOLS = [name.removeprefix("vit-") for name in SCRIPTS]
BENCHMARKS = [f"benchmarks/{path.name}" for path in sorted((ROOT / "benchmarks").glob("*.py"))]
EXTERNAL_FLAGS = {"-e", "-r", "-m", "-v", "--no-deps"}  # pip's, pytest's and time's, around the commands


def commands(text: str) -> list[tuple[str, str]]:
    """(tool, the words after it) for every documented command of this project."""
    found = []
    for line in code_lines(text):
        for pattern, tool in TOOL_PATTERNS:
            match = pattern.search(line)
            if match:
                found.append((tool or match.group(1), line[match.end():]))
                break
    return found


@cache
def help_text(tool: str) -> str:
    if tool.startswith("benchmarks/"):
        result = subprocess.run([sys.executable, str(ROOT / tool), "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                              "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        return result.stdout
    module, _, function = SCRIPTS[f"vit-{tool}"].partition(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        getattr(importlib.import_module(module), function)(["--help"])
    return out.getvalue()


def documented_flags() -> list[tuple[str, str, str]]:
    """(file, tool, flag) for every flag given to one of the project's commands in README and docs/."""
    rows = []
    for path in [README, *DOCS]:
        for tool, rest in commands(path.read_text()):
            for flag in re.findall(r"(?:^|\s)(--?[A-Za-z][\w-]*)", rest):
                rows.append((path.name, tool, flag))
    return sorted(set(rows))


def test_readme_is_short_and_opens_with_the_space_config_and_the_screenshot():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    front = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL).group(1)
    assert "license: mit" in front and (ROOT / re.search(r"app_file: (\S+)", front).group(1)).is_file()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    first_screen = text[text.index("\n# "):].splitlines()[:15]
    assert any(line.startswith("![") and "docs/screenshot.png" in line for line in first_screen)


def test_every_command_named_exists():
    tools = {tool for path in [README, *DOCS] for tool, _ in commands(path.read_text())}
    assert {"train", "explorer", "evaluate", "faithfulness"} <= tools  # the parser sees the commands
    for tool in tools:
        if tool.startswith("benchmarks/"):
            assert (ROOT / tool).is_file(), tool
        else:
            assert f"vit-{tool}" in SCRIPTS, tool
    table = [line for line in README.read_text().splitlines() if line.startswith("| `vit-")]
    assert sorted(re.match(r"\| `(vit-[\w-]+)`", line).group(1) for line in table) == sorted(SCRIPTS)


def test_every_flag_anywhere_in_the_docs_belongs_to_one_of_the_commands():
    # Flags written apart from their command (`-n 200`, `--methods`) still have to exist somewhere.
    flags = {flag for path in [README, *DOCS] for line in code_lines(path.read_text())
             for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line)} - EXTERNAL_FLAGS
    helps = [help_text(tool) for tool in PROJECT_TOOLS + BENCHMARKS]
    unknown = {flag for flag in flags
               if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) for text in helps)}
    assert not unknown


@pytest.mark.parametrize("document,tool,flag", documented_flags())
def test_every_flag_named_is_accepted_by_its_command(document, tool, flag):
    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(tool)), \
        f"{document}: {tool} has no {flag}"


def make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"([\w. -]+):(?!=)", line)
        if match and not line.startswith(("\t", ".PHONY")):
            targets |= set(match.group(1).split())
    return targets


def test_every_make_target_named_exists():
    named = {m for path in [README, *DOCS] for line in code_lines(path.read_text())
             for m in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", line)}
    assert {"app", "test"} <= named and named <= make_targets(), named - make_targets()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file) if file else document
        assert path.exists(), f"{document.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"{document.name}: {target}"


def test_every_project_path_the_readme_names_exists():
    paths = {m.rstrip(".,:;)") for line in code_lines(README.read_text())
             for m in re.findall(r"(?<![\w/.-])((?:vit_core|demo|checkpoints|docs|benchmarks|tests)/[\w./-]*"
                                 r"|train\.py|LICENSE|requirements(?:-dev)?\.txt)", line)}
    assert "checkpoints/vit-cifar10" in paths and "demo/examples/cat_0000.jpg" in paths
    assert not [p for p in paths if not (ROOT / p).exists()]


def test_the_client_example_names_real_endpoints_and_the_shipped_models_heads():
    text = README.read_text()
    wired = {name for path in (ROOT / "demo").glob("*.py")
             for name in re.findall(r'api_name="(\w+)"', path.read_text())}
    for document in [README, *DOCS]:
        named = set(re.findall(r'api_name="/(\w+)"', document.read_text()))
        assert named <= wired, (document.name, named - wired)
    n_heads = json.loads((ROOT / "checkpoints" / "vit-cifar10" / "config.json").read_text())["n_heads"]
    heads = [int(h) for h in re.findall(r'"head (\d+)"', text)]
    assert heads and max(heads) == n_heads


def test_the_python_quick_start_runs_as_shown(monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"## Python quick start.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(block.strip().splitlines()) == 5 and block.startswith("import vit_core\n")
    monkeypatch.chdir(ROOT)  # its paths are a clone's
    exec(compile(block, "README quick start", "exec"), {})
    printed = capsys.readouterr().out.strip()
    promised = re.search(r"# (.+)$", block.strip().splitlines()[-1]).group(1)
    assert printed == promised
