"""The project as a package (pyproject.toml): its dependencies are requirements.txt's pins, every
console entry point is a working command, the package list misses no folder of code, `make`
installs it in editable mode, and the clone's own entry files (train.py, demo/app.py) still run."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file, comments and `-r` includes left out."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def test_runtime_dependencies_are_the_pins_of_requirements_txt():
    # The Space installs requirements.txt, an install reads pyproject.toml: they must not drift.
    pinned = requirement_lines(ROOT / "requirements.txt")
    assert pinned and all(re.fullmatch(r"[\w.-]+==[\w.+-]+", line) for line in pinned), pinned
    assert sorted(PYPROJECT["project"]["dependencies"]) == sorted(pinned)


def test_the_tools_are_all_installed_as_commands():
    tools = {path.stem for path in (ROOT / "vit_core" / "cli").glob("*.py") if path.stem != "__init__"}
    assert {f"vit-{tool}" for tool in tools} | {"vit-explorer"} == set(SCRIPTS)
    assert SCRIPTS["vit-explorer"] == "demo.app:main" and SCRIPTS["vit-train"] == "vit_core.cli.train:main"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_entry_point_is_a_main_that_answers_help(name, capsys):
    module, _, function = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), function)
    assert callable(main)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def python_folders(top: str) -> set[str]:
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / top).rglob("*.py")
            if "__pycache__" not in p.parts}


def test_the_package_list_takes_every_folder_of_code_and_every_file_the_app_reads():
    from setuptools import find_namespace_packages

    found = set(find_namespace_packages(where=str(ROOT), **PYPROJECT["tool"]["setuptools"]["packages"]["find"]))
    assert python_folders("vit_core") | python_folders("demo") <= found
    assert not {p for p in found if p.split(".")[0] in ("tests", "benchmarks", "checkpoints", "docs")}
    # Every file of the app that is not Python (example images, the Walkthrough's script) goes too.
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["demo"]
    shipped = {p for pattern in data for p in (ROOT / "demo").glob(pattern)}
    files = {p for p in (ROOT / "demo").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert shipped == files and len([p for p in shipped if p.suffix == ".jpg"]) == 30


def test_make_installs_the_requirements_then_the_project_in_editable_mode():
    recipe = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    requirements = next(i for i, line in enumerate(recipe) if "pip install" in line and "-r requirements.txt" in line)
    editable = next(i for i, line in enumerate(recipe) if "pip install" in line and line.rstrip().endswith("-e ."))
    assert requirements < editable
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_no_sys_path_insertion_in_tests_or_benchmarks(folder):
    # They import vit_core as installed (make: pip install -e .); pytest.ini adds tests/ for toys.py.
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} touches sys.path")


def without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.mark.parametrize("script", ["train.py", "demo/app.py"])
def test_the_clones_entry_files_run_from_any_folder_without_an_install(script, tmp_path):
    # The Space runs demo/app.py from requirements.txt alone; both files find vit_core beside them.
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=without_pythonpath())
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout if script == "demo/app.py" else "--data" in result.stdout


def test_train_py_records_itself_and_vit_train_records_its_own_name():
    import train
    from vit_core.cli import train as command

    argv = ["--data", "d", "--out", "o"]
    assert train.parse_args(argv).command == "python train.py --data d --out o"
    assert command.parse_args(argv).command == "vit-train --data d --out o"


def test_an_install_without_the_shipped_checkpoint_says_to_pass_one(tmp_path, monkeypatch, capsys):
    import demo.app as app

    monkeypatch.setattr(app, "DEFAULT_CHECKPOINT", tmp_path / "checkpoints" / "vit-cifar10")
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("must not serve without a model"))
    monkeypatch.setattr(app, "port_free", lambda host, port: True)  # whatever else runs on this machine
    assert app.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--checkpoint DIR" in err and "Hub" in err
    assert str(tmp_path) not in err
    # A checkpoint the user names gets the loader's own message, not this one.
    assert app.main(["--checkpoint", str(tmp_path / "mine")]) == 2
    assert "mine" in capsys.readouterr().err


def test_vit_space_deploys_the_repository_or_installed_the_current_folder(tmp_path, monkeypatch):
    from vit_core.cli import space

    assert space.ROOT == ROOT
    monkeypatch.chdir(tmp_path)
    assert space.repository_or_cwd(tmp_path / "site-packages") == tmp_path  # no pyproject.toml there
    assert space.repository_or_cwd(ROOT) == ROOT
