"""`python -m vit_core.explain`: what it writes, and that bad input writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_core import explain as explain_fn
from vit_core import preprocess
from vit_core.explain import main

from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("patches", "attention", "attention_last", "layers", "rollout", "grad_rollout", "last_layer")


@pytest.fixture
def setup(tmp_path):
    model = make_tiny()
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
    command = [sys.executable, "-m", "vit_core.explain", str(images[0]), str(tmp / "broken.png"),
               "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "broken.png" in result.stderr and not (tmp / "out").exists()
    result = subprocess.run(command[:4] + command[5:], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp / "out" / "plane.npz").exists()


def test_importing_the_cli_module_keeps_vit_core_explain_callable():
    import importlib

    import torch

    import vit_core
    from vit_core.rollout import explain as explain_function

    importlib.import_module("vit_core.explain")  # rebinds the package attribute to the module
    from toys import tiny_vit

    model = tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    via_package = vit_core.explain(model, images)
    direct = explain_function(model, images)
    assert torch.equal(via_package.rollout, direct.rollout)
