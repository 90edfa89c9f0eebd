"""Deploying to a Space (vit_core.cli.space): the allow-list on a fake working copy and on this
repository, the dry run, and an upload that fails fast offline or commits exactly the list."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vit_core import checkpoints
from vit_core.cli import space

ROOT = Path(__file__).resolve().parents[1]
FRONT_MATTER = "---\ntitle: x\nsdk: gradio\napp_file: demo/app.py\n---\n\n# x\n\n![shot](docs/screenshot.png)\n"

NEEDED = [
    "README.md", "requirements.txt", "LICENSE",
    "demo/app.py", "demo/panels.py", "demo/examples/cat_0000.jpg",
    "vit_core/__init__.py", "vit_core/model.py", "vit_core/cli/__init__.py",
    "checkpoints/vit-cifar10/model.safetensors", "checkpoints/vit-cifar10/config.json",
    "checkpoints/vit-cifar10/README.md", "checkpoints/vit-cifar10/training.png",
    "checkpoints/vit-cifar10/anatomy.npz",
    "docs/screenshot.png",  # README.md shows it
    "docs/app.md", "docs/model_tab.png",  # a page README.md links to, and an image that page shows
]
LEFT_OUT = [
    ".venv/lib/python3.11/site-packages/torch/lib.so", ".venv/pyvenv.cfg", ".git/HEAD", ".gradio/cert.pem",
    "runs/cpu/model.safetensors", "runs/cpu/train_state.pt", "tests/artifacts/browser.png", "tests/test_model.py",
    "benchmarks/explain_latency.py", "docs/notes.png", "train.py", "Makefile",
    "demo/__pycache__/app.cpython-311.pyc", "vit_core/__pycache__/model.cpython-311.pyc",
    "vit_core/cli/__pycache__/space.cpython-311.pyc", "demo/.DS_Store", "vit_core/notes.txt",
    "checkpoints/vit-cifar10/train_state.pt", "checkpoints/vit-cifar10/anatomy.npz12345.tmp",
    "checkpoints/cnn-teacher/model.safetensors", "checkpoints/cnn-teacher/config.json",
    "checkpoints/whitened-teacher/model.safetensors", "checkpoints/whitened-teacher/teacher_info.json",
]


@pytest.fixture
def working_copy(tmp_path) -> Path:
    """A fake repository with everything a Space needs and everything a working copy piles up."""
    for relative in NEEDED + LEFT_OUT:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    (tmp_path / "README.md").write_text(FRONT_MATTER)
    (tmp_path / "docs" / "app.md").write_text("# app\n\n![tab](model_tab.png) ![up](../x.png)\n")
    return tmp_path


def test_the_allow_list_takes_what_the_space_needs_and_nothing_else(working_copy):
    assert space.space_files(working_copy) == sorted(NEEDED)


def test_the_dry_run_lists_every_file_and_the_total_offline(working_copy, capsys, monkeypatch):
    monkeypatch.setattr(space, "upload", lambda *a, **k: pytest.fail("a dry run must not upload"))
    assert space.main(["user/demo", "--dry-run", "--root", str(working_copy)]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == sorted(NEEDED)
    total = sum((working_copy / f).stat().st_size for f in NEEDED)
    assert f"{len(NEEDED)} files, {total / 1024:.1f} KiB in all" in out and "nothing sent to user/demo" in out


def test_this_repository_deploys_app_library_weights_examples_and_readme(capsys):
    assert space.main(["--dry-run"]) == 0
    files = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert files == space.space_files(ROOT)
    for needed in ("README.md", "requirements.txt", "demo/app.py", "vit_core/model.py", "vit_core/rollout.py",
                   "checkpoints/vit-cifar10/model.safetensors", "checkpoints/vit-cifar10/config.json",
                   "checkpoints/vit-cifar10/anatomy.npz", "docs/screenshot.png", "docs/app.md",
                   "docs/model_tab.png", "LICENSE"):
        assert needed in files
    examples = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "demo" / "examples").glob("*.jpg"))
    assert len(examples) == 30 and set(examples) <= set(files)
    for path in files:
        assert not path.startswith((".", "runs/", "tests/", "benchmarks/")) and "__pycache__" not in path
        assert not path.endswith((".pyc", ".pt", ".tmp"))
    sizes = [(ROOT / f).stat().st_size for f in files]
    assert max(sizes) < 10 * 2**20  # every file fits a Space without LFS
    assert sum(sizes) < 12 * 2**20  # weights, examples, figures and code; not a virtual environment or a teacher


def test_readme_must_configure_a_gradio_space_whose_app_is_uploaded(working_copy, capsys):
    (working_copy / "README.md").write_text("# no front matter\n")
    assert space.main(["--dry-run", "--root", str(working_copy)]) == 2
    assert "front matter" in capsys.readouterr().err
    (working_copy / "README.md").write_text(FRONT_MATTER.replace("demo/app.py", "app.py"))
    assert space.main(["--dry-run", "--root", str(working_copy)]) == 2
    assert "'app.py'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [([], "Space's id"), (["not a space"], "not a Space id"),
                                           (["--dry-run", "--root", "/nope"], "--root /nope: no such folder")])
def test_bad_arguments_are_one_line_and_status_2(argv, message, capsys):
    assert space.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no route"])
def test_upload_fails_fast_and_clearly_offline(offline, working_copy, capsys, monkeypatch):
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(checkpoints.hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(checkpoints, "host_reachable", lambda host, **kw: False)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: pytest.fail("nothing may be sent offline"))
    start = time.perf_counter()
    assert space.main(["user/demo", "--root", str(working_copy)]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot upload to user/demo") and "--dry-run" in err and "\n" not in err


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, holds a Space with two stale files."""

    calls: list = []

    def __init__(self, token=None):
        FakeHub.calls.append(("token", token))

    def create_repo(self, repo_id, repo_type=None, space_sdk=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, repo_type, space_sdk, exist_ok))

    def list_repo_files(self, repo_id, repo_type=None):
        return [".gitattributes", "README.md", ".venv/pyvenv.cfg", "old.py"]

    def create_commit(self, repo_id, operations, repo_type=None, commit_message=""):
        FakeHub.calls.append(("commit", repo_id, repo_type, operations))

        class Info:
            commit_url = "https://example.invalid/commit/1"
        return Info()


@pytest.mark.parametrize("keep_others", [False, True])
def test_upload_commits_exactly_the_list_and_mirrors_the_space(keep_others, working_copy, capsys, monkeypatch):
    monkeypatch.setattr(space, "hub_offline_reason", lambda: None)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    FakeHub.calls = []
    argv = ["user/demo", "--root", str(working_copy)] + (["--keep-others"] if keep_others else [])
    assert space.main(argv) == 0
    assert FakeHub.calls[:2] == [("token", "hf_test"), ("create_repo", "user/demo", "space", "gradio", True)]
    _, repo, repo_type, operations = FakeHub.calls[2]
    added = [op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationAdd"]
    deleted = [op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationDelete"]
    assert (repo, repo_type, added) == ("user/demo", "space", sorted(NEEDED))
    assert deleted == ([] if keep_others else [".venv/pyvenv.cfg", "old.py"])  # .gitattributes stays
    assert "https://huggingface.co/spaces/user/demo" in capsys.readouterr().out


def test_upload_without_a_token_says_how_to_log_in(working_copy, capsys, monkeypatch):
    monkeypatch.setattr(space, "hub_offline_reason", lambda: None)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert space.main(["user/demo", "--root", str(working_copy)]) == 2
    assert "hf auth login" in capsys.readouterr().err
