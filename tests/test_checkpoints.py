"""vit_core.checkpoints.load_checkpoint: the one loader, its one error type, and a fast offline failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toys import tiny_vit
from vit_core import CheckpointError, ViTClassifier, load_checkpoint
from vit_core import checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path) -> tuple[ViTClassifier, Path]:
    model = tiny_vit(sharpen=True)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_loads_a_folder_exactly_in_eval_mode(saved):
    model, folder = saved
    loaded = load_checkpoint(folder)
    assert isinstance(loaded, ViTClassifier) and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_relative_folders_are_also_looked_for_in_search_dirs(saved, tmp_path, monkeypatch):
    _, folder = saved
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_checkpoint("ckpt", search_dirs=[tmp_path]).depth == 2
    with pytest.raises(CheckpointError, match=r"No checkpoint directory 'ckpt' \(looked in "):
        load_checkpoint("ckpt")


def test_shipped_checkpoint_loads():
    model = load_checkpoint(ROOT / "checkpoints" / "vit-cifar10")
    assert model.class_names[3] == "cat" and not model.training


def test_every_failure_is_a_checkpoint_error_that_says_what_is_wrong(saved, tmp_path):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())

    def variant(name: str, files: dict) -> Path:
        target = tmp_path / name
        target.mkdir()
        for file_name, content in files.items():
            (target / file_name).write_bytes(content)
        return target

    weights = (folder / "model.safetensors").read_bytes()
    cases = {
        tmp_path / "missing": "No checkpoint directory",
        variant("empty", {}): "holds no config.json",
        variant("pickled", {"config.json": json.dumps(config).encode(), "pytorch_model.bin": b"x"}):
            "holds no model.safetensors; pytorch_model.bin would need unpickling",
        variant("garbage", {"config.json": json.dumps(config).encode(), "model.safetensors": b"garbage"}):
            "not a readable safetensors file",
        variant("deeper", {"config.json": json.dumps({**config, "depth": 3}).encode(), "model.safetensors": weights}):
            "does not fit this model config",
        variant("odd", {"config.json": json.dumps({**config, "n_heads": 5}).encode(), "model.safetensors": weights}):
            "config.json does not describe a ViTClassifier",
        folder / "model.safetensors": "is a file; pass the checkpoint folder",
    }
    for source, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(source)
    assert issubclass(CheckpointError, ValueError)


def test_repo_ids_are_told_from_paths():
    assert checkpoints.looks_like_repo_id("user/vit-cifar10")
    for text in ("./x/y", "/abs/path", "a/b/c", "../x", "plain", "user/"):
        assert not checkpoints.looks_like_repo_id(text), text


def fake_hub(monkeypatch, folder: Path | None) -> list[dict]:
    """Route the Hub client's downloads to `folder` (None: nothing cached); returns the calls."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        if folder is None:
            raise LocalEntryNotFoundError("not in the cache") if kwargs.get("local_files_only") else \
                AssertionError("the network must not be used")
        return str(folder / filename)

    monkeypatch.setattr(checkpoints, "hf_hub_download", download)
    return calls


def test_a_cached_hub_repo_loads_without_the_network(saved, monkeypatch):
    _, folder = saved
    calls = fake_hub(monkeypatch, folder)
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: pytest.fail("probed the network"))
    assert load_checkpoint("someone/tiny-vit").depth == 2
    assert {c["filename"] for c in calls} == {"config.json", "model.safetensors"}
    assert all(c["local_files_only"] for c in calls)


@pytest.mark.parametrize("offline_env, reason", [("1", "HF_HUB_OFFLINE is set"), (None, "cannot be reached")])
def test_an_uncached_hub_repo_offline_fails_without_retrying(monkeypatch, offline_env, reason):
    calls = fake_hub(monkeypatch, None)
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(checkpoints.hub_constants, "HF_HUB_OFFLINE", False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: False)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint("someone/vit")
    assert "Offline? Pass a local checkpoint directory" in str(info.value)
    assert calls and all(c["local_files_only"] for c in calls)


def test_host_reachable_gives_up_within_its_timeout():
    import time

    started = time.perf_counter()
    assert not checkpoints.host_reachable("127.0.0.1", port=9, timeout=1.0)  # discard port: refused
    assert time.perf_counter() - started < 2.0


@pytest.mark.slow
def test_hub_id_with_hf_hub_offline_fails_fast_in_a_fresh_process():
    code = ("import time\nfrom vit_core import load_checkpoint, CheckpointError\nt = time.perf_counter()\n"
            "try:\n    load_checkpoint('someone/vit')\nexcept CheckpointError as e:\n    print(e)\n"
            "print(f'seconds={time.perf_counter() - t:.2f}')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert "Offline? Pass a local checkpoint directory" in out
    assert float(out.rsplit("seconds=", 1)[1]) < 5.0
