"""Records carry no path of the machine that made them: train_info.json, eval.json,
faithfulness.json and the model card keep folders as given relative, relative to the working
folder when under it, or by name (vit_core.records); and no file in git holds an absolute path of
the build machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from toys import make_image_folder, tiny_vit
from vit_core.cli import evaluate as evaluate_cli
from vit_core.cli import faithfulness as faithfulness_cli
from vit_core.records import portable_command, portable_path
from vit_core.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def test_portable_path_keeps_relative_paths_and_shortens_absolute_ones(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere" / "cifar10"
    assert portable_path("../shared/cifar10", project) == "../shared/cifar10"  # as given
    assert portable_path(project / "runs" / "v10", project) == "runs/v10"
    assert portable_path(project, project) == "."
    assert portable_path(elsewhere, project) == "cifar10"
    assert portable_path(str(elsewhere) + "/", project) == "cifar10"


def test_portable_command_shortens_every_absolute_argument(tmp_path):
    project = tmp_path / "project"
    argv = ["--data", str(tmp_path / "cifar10"), f"--out={project / 'runs' / 'a'}", "--lr", "2e-4",
            "--teacher", "checkpoints/cnn-teacher", "--note", "two words"]
    assert portable_command("python train.py", argv, project) == (
        "python train.py --data cifar10 --out=runs/a --lr 2e-4 --teacher checkpoints/cnn-teacher "
        "--note 'two words'")


def tiny_run(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), preset="tiny", epochs=1, batch_size=16, val_size=16,
                    num_threads=1, teacher="none", cutmix=0.0, patch_drop=0.0, attn_init="default",
                    pos_init="random", command=portable_command("python train.py", ["--data", str(data)]))
    return TrainConfig(**{**settings, **overrides})


def test_a_run_given_absolute_folders_records_none_of_them(toy_data, tmp_path, monkeypatch):
    # Outside the working folder: kept by name. Under it: relative to it.
    train(tiny_run(toy_data, tmp_path / "first"))
    monkeypatch.chdir(tmp_path)
    train(tiny_run(toy_data, tmp_path / "runs" / "warm", init_from=str(tmp_path / "first")))
    first = (tmp_path / "first" / "train_info.json").read_text()
    assert json.loads(first)["config"]["data"] == "data" and json.loads(first)["config"]["out"] == "first"
    warm = json.loads((tmp_path / "runs" / "warm" / "train_info.json").read_text())
    settings = warm["config"]
    assert (settings["data"], settings["out"], settings["init_from"]) == ("data", "runs/warm", "first")
    assert warm["init"]["folder"] == "first" and warm["segments"][0]["command"] == "python train.py --data data"
    for record in ("first/train_info.json", "first/README.md", "runs/warm/train_info.json", "runs/warm/README.md"):
        assert str(tmp_path) not in (tmp_path / record).read_text(), record


def test_measuring_commands_record_their_folders_portably(tmp_path, capsys):
    data = make_image_folder(tmp_path / "cifar", per_class=4)
    ckpt = tmp_path / "ckpt"
    tiny_vit(sharpen=True, n_classes=2, class_names=["blue", "red"]).save_pretrained(ckpt)
    shutil.copy(ROOT / "checkpoints" / "vit-cifar10" / "train_info.json", ckpt)  # as train.py leaves it
    given = ["--checkpoint", str(ckpt), "--data", str(data)]
    assert evaluate_cli.main(given + ["--write-card"]) == 0, capsys.readouterr().err
    assert faithfulness_cli.main(given + ["-n", "2", "--sanity", "0", "--methods", "rollout", "--write-card"]) == 0
    evaluation = json.loads((ckpt / "eval.json").read_text())
    assert evaluation["data"] == "cifar/test"
    assert evaluation["command"] == "python -m vit_core.cli.evaluate --checkpoint ckpt --data cifar --write-card"
    faithfulness = json.loads((ckpt / "faithfulness.json").read_text())
    assert (faithfulness["checkpoint"], faithfulness["data"]) == ("ckpt", "cifar/test")
    for record in ("eval.json", "faithfulness.json", "README.md"):
        assert str(tmp_path) not in (ckpt / record).read_text(), record


# An absolute path on this machine or a typical other: a build folder, a home, a temporary folder.
# Not preceded by a word, ':' '/' '.' or '~' (URLs, relative paths and ~/ stay allowed).
MACHINE_PATH = re.compile(r"(?<![\w:/.~-])/(?:work|root|tmp|mnt|srv|opt/\w+|home/\w+|Users/\w+|private/var)/"
                          r"|\b[A-Za-z]:\\(?:Users|home|work)\\", re.IGNORECASE)


S, B = "/", "\\"


def test_the_machine_path_pattern_tells_paths_from_urls():
    # Spelled with S for "/" and B for "\\", so that this file does not hold what it looks for.
    for found in (f"--data {S}tmp{S}x", f"`{S}home{S}alice{S}data`", f"weights in {S}root{S}runs",
                  f"C:{B}Users{B}bob{B}x"):
        assert MACHINE_PATH.search(found), found
    for fine in ("https://huggingface.co/root/x", "../shared/cifar10", "runs/tmp/x", "~/datasets",
                 "/usr/bin/chromium", "http://127.0.0.1:7860/", "a/work/b"):
        assert not MACHINE_PATH.search(fine), fine


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    texts = {}
    for name in filter(None, names.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # weights, images, npz: binary
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def test_no_tracked_file_holds_an_absolute_path_of_the_build_machine():
    texts = tracked_text_files()
    assert "README.md" in texts and "checkpoints/vit-cifar10/train_info.json" in texts
    found = [f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
             for name, text in texts.items() for match in MACHINE_PATH.finditer(text)]
    assert not found, found
