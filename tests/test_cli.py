"""The commands in vit_core.cli: what they write and print, and that bad input exits 2 with one
line and writes nothing."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toys import make_image_folder, tiny_vit
from vit_core import explain as explain_fn
from vit_core import faithfulness as fa
from vit_core import preprocess
from vit_core.cli import evaluate as evaluate_cli
from vit_core.cli import faithfulness as faithfulness_cli
from vit_core.cli.explain import main
from vit_core.explanation import HELD_METHODS
from vit_core.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[1]
# The drawings per image: these four, then an overlay of every map an explanation holds.
OUTPUTS = ("patches", "attention", "attention_last", "layers") + HELD_METHODS


# ---------------------------------------------------------------------------------------------- explain

@pytest.fixture
def setup(tmp_path):
    model = tiny_vit(image_size=16, sharpen=True)
    model.save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    images = []
    for name, size in (("plane.png", (40, 30)), ("boat.jpg", (16, 16))):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(path)
    (tmp_path / "broken.png").write_text("this is not an image")
    return model, tmp_path, images


def test_writes_drawings_and_npz(setup, capsys):
    model, tmp, images = setup
    out = tmp / "out"
    code = main([*map(str, images), "--checkpoint", str(tmp / "ckpt"), "--out", str(out),
                 "--head-fusion", "max", "--discard-ratio", "0.25"])
    assert code == 0
    for stem in ("plane", "boat"):
        for kind in OUTPUTS:
            with Image.open(out / f"{stem}_{kind}.png") as drawing:
                assert drawing.mode == "RGB" and drawing.width > 16
    with Image.open(out / "plane_patches.png") as grid:
        assert grid.size == (4 * 32 + 5 * 2,) * 2     # 4x4 patches of 4 px at scale 8, 2 px gaps
    saved = np.load(out / "plane.npz")
    assert saved["attentions"].shape == (2, 4, 17, 17)
    assert saved["rollout"].shape == saved["grad_rollout"].shape == saved["last_layer"].shape == (4, 4)
    assert str(saved["head_fusion"]) == "max" and float(saved["discard_ratio"]) == 0.25
    assert str(saved["image"]) == str(images[0])
    # The saved arrays are the library's explanation of the same image.
    with Image.open(images[0]) as img:
        expected = explain_fn(model, preprocess(img.convert("RGB"), model), head_fusion="max", discard_ratio=0.25)
    np.testing.assert_allclose(saved["attentions"], expected.attentions[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["rollout"], expected.rollout[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["grad_rollout"], expected.grad_rollout[0].numpy(), atol=1e-6)
    assert "plane.png: predicted" in capsys.readouterr().out


def test_target_by_name_and_index(setup):
    model, tmp, images = setup
    for target, index in (("cat", 3), ("7", 7)):
        out = tmp / f"out_{target}"
        assert main([str(images[0]), "--checkpoint", str(tmp / "ckpt"), "--out", str(out), "--target", target]) == 0
        assert int(np.load(out / "plane.npz")["target"]) == index


@pytest.mark.parametrize("bad", ["broken.png", "missing.png"])
def test_bad_image_writes_nothing(setup, capsys, bad):
    _, tmp, images = setup
    out = tmp / "out"
    code = main([str(images[0]), str(tmp / bad), "--checkpoint", str(tmp / "ckpt"), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and bad in err
    assert not out.exists()


def test_bad_checkpoint_and_target(setup, capsys):
    _, tmp, images = setup
    out = tmp / "out"
    assert main([str(images[0]), "--checkpoint", str(tmp / "nowhere"), "--out", str(out)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    (tmp / "empty").mkdir()
    assert main([str(images[0]), "--checkpoint", str(tmp / "empty"), "--out", str(out)]) == 2
    assert main([str(images[0]), "--checkpoint", str(tmp / "ckpt"), "--out", str(out), "--target", "unicorn"]) == 2
    assert "unicorn" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--discard-ratio", "1.0"], ["--discard-ratio", "-0.1"], ["--head-fusion", "sum"]])
def test_bad_settings_exit_2(setup, args):
    _, tmp, images = setup
    with pytest.raises(SystemExit) as exit_info:
        main([str(images[0]), "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp / "out"), *args])
    assert exit_info.value.code == 2
    assert not (tmp / "out").exists()


def test_same_stem_in_two_folders(setup):
    _, tmp, images = setup
    (tmp / "other").mkdir()
    twin = tmp / "other" / "plane.png"
    Image.open(images[1]).save(twin)
    out = tmp / "out"
    assert main([str(images[0]), str(twin), "--checkpoint", str(tmp / "ckpt"), "--out", str(out)]) == 0
    assert len(list(out.glob("*.npz"))) == 2


@pytest.mark.slow
def test_module_entry_point(setup):
    _, tmp, images = setup
    command = [sys.executable, "-m", "vit_core.cli.explain", str(images[0]), str(tmp / "broken.png"),
               "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "broken.png" in result.stderr and not (tmp / "out").exists()
    result = subprocess.run(command[:4] + command[5:], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp / "out" / "plane.npz").exists()


def test_importing_the_cli_module_keeps_vit_core_explain_callable():
    import importlib

    import vit_core
    from vit_core.explanation import explain as explain_function

    importlib.import_module("vit_core.cli.explain")  # the command has its own name: nothing is rebound
    assert vit_core.explain is explain_function
    model = tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    via_package = vit_core.explain(model, images)
    direct = explain_function(model, images)
    assert torch.equal(via_package.rollout, direct.rollout)


# ---------------------------------------------------------------------------------------------- faithfulness

def write_folder(root, n_per_class: int = 3):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / "test" / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "test" / name / f"{i}.png")


def test_faithfulness_prints_aucs(tmp_path, capsys):
    model = tiny_vit(sharpen=True, patch_size=8, n_classes=2, class_names=["cat", "dog"])
    model.save_pretrained(tmp_path / "ckpt")
    write_folder(tmp_path / "data")
    code = faithfulness_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
                                  "-n", "5", "--sanity", "2", "--methods", "rollout,grad_rollout,last_layer"])
    out = capsys.readouterr().out
    assert code == 0
    assert "5 test images" in out
    for method in ("rollout", "grad_rollout", "last_layer", "random"):
        line = next(line for line in out.splitlines() if line.startswith(method + " "))
        assert line.count("±") == 2
    assert "embedding:" in out


def test_faithfulness_bad_paths(tmp_path, capsys):
    assert faithfulness_cli.main(["--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    model = tiny_vit(image_size=16, sharpen=True)  # 16x16 model, 32x32 data
    model.save_pretrained(tmp_path / "ckpt")
    write_folder(tmp_path / "data", n_per_class=1)
    assert faithfulness_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nodata")]) == 2
    assert faithfulness_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data")]) == 2
    assert "image size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        faithfulness_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
                               "--discard-ratio", "1"])
    assert exit_info.value.code == 2


def test_faithfulness_writes_every_method_and_figure_and_the_card(colour_checkpoint, capsys):
    import json
    import shutil

    _, ckpt, data = colour_checkpoint
    shutil.copy(ROOT / "checkpoints" / "vit-cifar10" / "train_info.json", ckpt)  # as train.py leaves it
    code = faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "-n", "3", "--sanity", "1",
                                  "--write-card"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((ckpt / "faithfulness.json").read_text())
    assert result["n"] == 3 and result["seed"] == 1 and result["sanity_images"] == 1
    assert result["command"].startswith("python -m vit_core.cli.faithfulness --checkpoint ")
    assert result["date"][:2] == "20" and result["removals"] == ["mean", "drop"]
    expected = [m for m in METHOD_NAMES if m != "occlusion"]  # occlusion is the mean-fill reference
    assert list(result["methods"]) == expected
    for name, entry in result["methods"].items():
        for removal in ("mean", "drop"):
            figures = entry[removal]
            assert set(figures) == set(faithfulness_cli.FIGURES), name
            for figure in ("deletion_win_rate", "insertion_win_rate"):
                assert 0.0 <= figures[figure]["mean"] <= 1.0 and figures[figure]["n"] == 3, (name, figure)
            assert 0.0 <= figures["deletion_auc"]["mean"] <= 1.0 and figures["deletion_auc"]["sem"] >= 0.0
        assert [s["stage"] for s in entry["randomisation"]] == ["head", "block 2", "block 1", "embedding"]
        assert -1.0 <= entry["class_sensitivity"]["mean"] <= 1.0
    # The token-drop reference agrees with itself, so it gets no Spearman figure there.
    assert result["methods"]["occlusion_drop"]["drop"]["spearman_occlusion"]["n"] == 0
    assert result["methods"]["occlusion_drop"]["mean"]["spearman_occlusion"]["n"] == 3
    # Rollout and last-layer attention never look at the class: the same map for the top-2 class.
    for name in ("rollout", "last_layer"):
        assert result["methods"][name]["class_sensitivity"]["mean"] == pytest.approx(1.0)
    card = (ckpt / "README.md").read_text()
    assert "## Which map to trust" in card and "seed 1" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and " / " in line]
    assert [row.split(" | ")[0][2:] for row in rows] == expected
    assert "| occlusion_drop | " in card and "/ ref. |" in card
    # The folders were given as this machine's absolute paths; the file and the card keep none (vit_core.records).
    assert not any(os.path.isabs(arg) for arg in shlex.split(result["command"])) and result["command"] in card
    assert not os.path.isabs(result["data"]) and not os.path.isabs(result["checkpoint"])


def test_faithfulness_methods_and_removal_can_be_restricted(colour_checkpoint, tmp_path, capsys):
    import json

    _, ckpt, data = colour_checkpoint
    out = tmp_path / "report"
    assert faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "-n", "2", "--sanity", "0",
                                  "--methods", "attnlrp, rollout", "--removal", "drop", "--seed", "5",
                                  "--out", str(out)]) == 0
    result = json.loads((out / "faithfulness.json").read_text())
    assert list(result["methods"]) == ["attnlrp", "rollout"] and result["removals"] == ["drop"]
    assert result["seed"] == 5 and result["sanity_images"] == 0
    assert set(result["methods"]["rollout"]) == {"drop", "class_sensitivity"}
    assert not (ckpt / "faithfulness.json").exists()
    assert "removal 'drop'" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--methods", "rollout,saliency", "unknown method saliency; choose from rollout, grad_rollout, last_layer, "
                                      "occlusion_drop, integrated_gradients"),
    ("--methods", "occlusion", "unknown method occlusion; choose from"),
    ("--removal", "blur", "unknown removal mode blur; choose from mean, drop"),
])
def test_faithfulness_bad_method_or_removal_is_one_line_and_status_2(colour_checkpoint, capsys, flag, value, message):
    _, ckpt, data = colour_checkpoint
    assert faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (ckpt / "faithfulness.json").exists()


def test_faithfulness_write_card_needs_a_training_folder(colour_checkpoint, capsys):
    _, ckpt, data = colour_checkpoint
    assert faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "--write-card"]) == 2
    assert "train_info.json" in capsys.readouterr().err and not (ckpt / "faithfulness.json").exists()


# ---------------------------------------------------------------------------------------------- evaluate

@pytest.fixture
def colour_checkpoint(tmp_path):
    """A tiny model for the two-class toy data, saved; and that data."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    model = tiny_vit(sharpen=True, n_classes=2, class_names=["blue", "red"])
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt", data


def test_evaluate_prints_the_accuracy_of_the_library_evaluate(colour_checkpoint, capsys):
    from vit_core.data import load_split
    from vit_core.evaluate import evaluate

    model, ckpt, data = colour_checkpoint
    assert evaluate_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    test = load_split(data, "test")
    expected = evaluate(model, test.images, test.labels, torch.device("cpu"))
    assert f"test accuracy: {expected['accuracy'] * 100:.2f} % on {len(test)} images (mirror averaging on)" in out
    for name, accuracy in expected["per_class"].items():
        assert f"{name:>12s}: {accuracy * 100:5.1f} %" in out
    assert not (ckpt / "eval.json").exists()


def test_evaluate_writes_the_card(colour_checkpoint, capsys):
    import json
    import shutil

    _, ckpt, data = colour_checkpoint
    assert evaluate_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "--write-card"]) == 2
    assert "train_info.json" in capsys.readouterr().err and not (ckpt / "eval.json").exists()
    shutil.copy(ROOT / "checkpoints" / "vit-cifar10" / "train_info.json", ckpt)  # as train.py leaves it
    assert evaluate_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "--no-mirror", "--write-card"]) == 0
    result = json.loads((ckpt / "eval.json").read_text())
    assert result["mirror"] is False and result["n_images"] == 8
    assert sum(map(sum, result["confusion"])) == 8
    assert result["command"].startswith("python -m vit_core.cli.evaluate --checkpoint ")
    assert not any(os.path.isabs(arg) for arg in shlex.split(result["command"]))
    assert not os.path.isabs(result["data"])
    assert (ckpt / "confusion.png").exists() and (ckpt / "README.md").exists()


def test_evaluate_bad_input_is_one_line_and_status_2(colour_checkpoint, tmp_path, capsys):
    _, ckpt, data = colour_checkpoint
    cases = {
        ("--device", "gpu"): "unknown --device 'gpu'",
        ("--device", "cuda:99"): "cuda:99 asked for",
        ("--checkpoint", str(tmp_path / "nowhere")): "No checkpoint directory",
        ("--data", str(tmp_path / "nodata")): "no CIFAR-10 found",
    }
    for (flag, value), message in cases.items():
        args = {"--checkpoint": str(ckpt), "--data": str(data), flag: value}
        assert evaluate_cli.main([x for pair in args.items() for x in pair]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    tiny_vit(n_classes=3, class_names=["a", "b", "c"]).save_pretrained(tmp_path / "other")
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "other"), "--data", str(data)]) == 2
    assert "differ" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "faithfulness"])
def test_module_entry_points_report_bad_input_without_a_traceback(tmp_path, command):
    args = ["--checkpoint", str(tmp_path / "nowhere"), "--data", str(tmp_path)]
    if command == "evaluate":
        args += ["--device", "gpu"]
    result = subprocess.run([sys.executable, "-m", f"vit_core.cli.{command}", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- every tool

def _tool_mains():
    import train
    from vit_core.cli import anatomy, space
    from vit_core.cli import explain as explain_cli

    return {"explain": explain_cli.main, "evaluate": evaluate_cli.main, "faithfulness": faithfulness_cli.main,
            "anatomy": anatomy.main, "space": space.main, "train": train.main}


@pytest.mark.parametrize("tool", ["explain", "evaluate", "faithfulness", "anatomy", "space", "train"])
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--checkpoint"]])
def test_every_tool_answers_a_bad_flag_with_one_error_line(tool, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool_mains()[tool](argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "usage:" not in err and "--help" in err, err


@pytest.mark.parametrize("tool", ["explain", "evaluate", "faithfulness", "anatomy", "space", "train"])
def test_every_tool_shows_its_usage_with_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool_mains()[tool](["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_a_bad_value_is_one_error_line_too(colour_checkpoint, capsys):
    _, ckpt, data = colour_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "-n", "many"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'many'" in err, err


# ---------------------------------------------------------------------------------------------- other models

def save_timm(folder: Path, image_size: int = 32, classes=("blue", "red")) -> Path:
    """A tiny random timm ViT saved as timm's save_for_hf writes it (offline)."""
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2, num_classes=len(classes))
    save_for_hf(vit.eval(), folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "label_names": list(classes)}))
    return folder


def save_hf(folder: Path, image_size: int = 32, classes=("blue", "red")) -> Path:
    """A tiny random transformers ViT saved with save_pretrained (offline)."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=len(classes),
                                    id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(params=["timm", "transformers"])
def other_model(request, tmp_path):
    """A timm or transformers ViT folder for the two-class toy data; and that data."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    save = save_timm if request.param == "timm" else save_hf
    return save(tmp_path / request.param), data


def test_explain_evaluate_and_faithfulness_take_a_timm_or_transformers_folder(other_model, tmp_path, capsys):
    import json

    from vit_core.adapters import load_model
    from vit_core.data import load_split
    from vit_core.evaluate import evaluate

    folder, data = other_model
    image = next((data / "test" / "red").iterdir())
    assert main([str(image), "--checkpoint", str(folder), "--out", str(tmp_path / "drawn")]) == 0
    assert (tmp_path / "drawn" / f"{image.stem}.npz").exists()

    assert evaluate_cli.main(["--checkpoint", str(folder), "--data", str(data), "--device", "cpu"]) == 0
    test = load_split(data, "test")
    expected = evaluate(load_model(folder), test.images, test.labels, torch.device("cpu"))
    assert f"test accuracy: {expected['accuracy'] * 100:.2f} %" in capsys.readouterr().out

    out = tmp_path / "faith"
    assert faithfulness_cli.main(["--checkpoint", str(folder), "--data", str(data), "-n", "3", "--sanity", "1",
                                  "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "faithfulness.json").read_text())
    assert result["removals"] == ["mean"] and "rollout" in result["methods"]
    assert "occlusion_drop" not in result["methods"]  # needs our own ViT
    capsys.readouterr()
    assert faithfulness_cli.main(["--checkpoint", str(folder), "--data", str(data), "--methods", "occlusion_drop",
                                  "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "occlusion_drop need this project's own ViT" in err


def test_anatomy_refuses_another_model_in_one_line(other_model, capsys):
    from vit_core.cli.anatomy import main as anatomy_main

    folder, _ = other_model
    assert anatomy_main(["--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "only this project's checkpoints" in err
    assert not (folder / "anatomy.npz").exists()


def test_a_model_of_another_size_is_refused_in_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    folder = save_timm(tmp_path / "m16", image_size=16)
    assert evaluate_cli.main(["--checkpoint", str(folder), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model takes 16x16" in err


# ---------------------------------------------------------------------------------------------- long runs

def test_faithfulness_says_how_many_images_and_shows_a_bar(colour_checkpoint, tmp_path, capsys):
    import json

    _, ckpt, data = colour_checkpoint  # 4 test images per class
    assert faithfulness_cli.main(["--checkpoint", str(ckpt), "--data", str(data), "-n", "50", "--sanity", "0",
                                  "--methods", "rollout", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "scoring 1 map on 8 test images" in err and "-n 50 asked for more, so all of them" in err
    assert "faithfulness: 100%" in err and "8/8" in err  # the tqdm bar, finished
    assert json.loads((tmp_path / "o" / "faithfulness.json").read_text())["n"] == 8


def test_evaluate_shows_a_bar_and_says_how_many_images(colour_checkpoint, capsys):
    _, ckpt, data = colour_checkpoint
    assert evaluate_cli.main(["--checkpoint", str(ckpt), "--data", str(data)]) == 0
    err = capsys.readouterr().err
    assert "evaluating on 8 test images" in err and "evaluate: 100%" in err and "8/8" in err


# ---------------------------------------------------------------------------------------------- sharding

def test_shards_take_contiguous_runs_that_cover_every_piece_once():
    from vit_core.sharding import Shard

    for world in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 12):
            runs = [list(Shard(rank, world).pieces(n)) for rank in range(world)]
            assert [i for run in runs for i in run] == list(range(n))
            assert max(map(len, runs)) - min(map(len, runs)) <= 1


@pytest.mark.slow
def test_faithfulness_under_torchrun_writes_what_one_process_writes(colour_checkpoint, tmp_path):
    _, ckpt, data = colour_checkpoint  # 8 test images: chunks of 3 split 1 + 2 over two ranks
    args = ["--checkpoint", str(ckpt), "--data", str(data), "-n", "8", "--chunk", "3", "--sanity", "2",
            "--methods", "rollout,attnlrp,occlusion_drop", "--steps", "4", "--n-random", "5", "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "vit_core.cli.faithfulness", *args, "--out", str(tmp_path / "one")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "vit_core.cli.faithfulness", *args, "--out", str(tmp_path / "two")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert sharded.returncode == 0, sharded.stderr
    assert "split over 2 processes" in sharded.stderr
    one, two = (json.loads((tmp_path / name / "faithfulness.json").read_text()) for name in ("one", "two"))
    for results in (one, two):
        del results["date"], results["seconds"]  # when and how long: the only fields that may differ
    two["command"] = two["command"].replace("--out two", "--out one")  # recorded by name (vit_core.records)
    assert one["n"] == 8 and one["methods"]["rollout"]["mean"]["deletion_auc"]["n"] == 8
    assert one == two
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "vit_core.cli.faithfulness", *args, "--methods", "blur"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(errors) == 1 and "unknown method blur" in errors[0], refused.stderr


def test_every_tool_that_reads_data_offers_the_download_its_missing_data_error_names(colour_checkpoint,
                                                                                     monkeypatch, capsys):
    from vit_core.cli import anatomy
    from vit_core.data import DataError, load_split

    _, ckpt, data = colour_checkpoint
    asked = []

    def spy(*args, download=False, **kwargs):
        asked.append(download)
        raise DataError("no CIFAR-10 found (spied)")

    for module in (evaluate_cli, faithfulness_cli, anatomy):
        monkeypatch.setattr(module, "load_split", spy)
    for tool in (evaluate_cli.main, faithfulness_cli.main, anatomy.main):
        assert tool(["--checkpoint", str(ckpt), "--data", str(data), "--download"]) == 2
    assert asked == [True, True, True] and capsys.readouterr().err.count("error: no CIFAR-10 found") == 3
    message = ""
    try:
        load_split(ckpt / "nowhere", "test")
    except DataError as error:
        message = str(error)
    assert "add --download" in message  # true now for every tool above, train.py included
