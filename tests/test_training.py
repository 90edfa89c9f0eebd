import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toys import ROOT
from train import main as train_main, parse_args
from vit_core import ViTClassifier
from vit_core.training import STATE_NAME, TrainConfig, TrainError, build_model, train


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), preset="tiny", epochs=3, batch_size=16, lr=3e-3,
                    warmup_epochs=0.5, val_size=16, num_threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_few_epochs_lower_the_loss_and_export_the_best(toy_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(toy_data, out, epochs=4))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
    assert summary["best_val_acc"] == max(h["val_acc"] for h in history)
    assert (out / "training.png").stat().st_size > 1000
    assert "Validation accuracy" in (out / "README.md").read_text()
    model = ViTClassifier.from_pretrained(out)
    assert model.class_names == ["blue", "red"]


def test_more_threads_than_allowed_cores_warns_and_the_card_says_so(toy_data, tmp_path, monkeypatch, capsys):
    import vit_core.training as training

    monkeypatch.setattr(training, "usable_cpu_count", lambda: 1)
    previous = torch.get_num_threads()
    try:
        train(tiny_config(toy_data, tmp_path / "run", epochs=1, num_threads=2))
    finally:
        torch.set_num_threads(previous)
    assert "may use only 1 core(s)" in capsys.readouterr().err
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert "1 of" in info["machine"] and "(2 threads)" in info["machine"]


def test_killed_run_resumed_ends_like_an_uninterrupted_one(toy_data, tmp_path):
    full = tiny_config(toy_data, tmp_path / "full", dropout=0.1)
    train(full)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch, record):
        if epoch == 0:
            raise Killed  # as if the process died right after the epoch-1 checkpoint

    interrupted = tiny_config(toy_data, tmp_path / "resumed", dropout=0.1)
    with pytest.raises(Killed):
        train(interrupted, on_epoch_end=kill_after_first_epoch)
    train(tiny_config(toy_data, tmp_path / "resumed", dropout=0.1, resume=True))

    a = torch.load(tmp_path / "full" / STATE_NAME, weights_only=True)
    b = torch.load(tmp_path / "resumed" / STATE_NAME, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads(a["history"])[-1]["val_loss"] == json.loads(b["history"])[-1]["val_loss"]
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_existing_run_is_not_overwritten_without_resume(toy_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(toy_data, out, epochs=1))
    before = (out / STATE_NAME).read_bytes()
    with pytest.raises(TrainError, match="--resume"):
        train(tiny_config(toy_data, out, epochs=1))
    with pytest.raises(TrainError, match="other settings"):
        train(tiny_config(toy_data, out, epochs=1, lr=0.1, resume=True))
    assert (out / STATE_NAME).read_bytes() == before


def test_resume_without_a_checkpoint_is_a_clear_error(toy_data, tmp_path):
    with pytest.raises(TrainError, match="no train_state.pt"):
        train(tiny_config(toy_data, tmp_path / "empty", resume=True))


def test_attn_init_flag_reaches_the_model(tmp_path):
    def value_output_diagonal(cfg: TrainConfig) -> float:
        torch.manual_seed(0)
        attn = build_model(cfg, ["a", "b"]).blocks[0].attn
        w_v = attn.in_proj_weight.detach().split(attn.embed_dim)[2]
        return (w_v.T @ attn.out_proj.weight.detach().T).diagonal().mean().item()

    cfg = parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--attn-init", "mimetic"])
    assert cfg.attn_init == "mimetic"
    assert value_output_diagonal(cfg) < -0.2  # W_v W_o starts near -0.4 I
    assert abs(value_output_diagonal(tiny_config(tmp_path, tmp_path / "run", preset="cpu"))) < 0.05


def test_random_erase_and_init_options_train_and_are_named_in_the_card(toy_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(toy_data, out, epochs=1, random_erase=0.5, attn_init="mimetic", pos_init="sincos"))
    card = (out / "README.md").read_text()
    assert "random erasing (p 0.5)" in card and "mimetic attention initialisation" in card
    assert "sine-cosine" in card
    plain = tmp_path / "plain"
    train(tiny_config(toy_data, plain, epochs=1))
    assert "random erasing" not in (plain / "README.md").read_text()


def test_cutmix_trains_on_class_probabilities_split_by_area_and_is_named_in_the_card(
        toy_data, tmp_path, monkeypatch):
    import vit_core.training as training_module

    targets_seen = []
    step = training_module.train_step

    def recording_step(net, optimizer, images, targets, *args, **kwargs):
        targets_seen.append(targets)
        return step(net, optimizer, images, targets, *args, **kwargs)

    monkeypatch.setattr(training_module, "train_step", recording_step)
    train(tiny_config(toy_data, tmp_path / "run", epochs=1, cutmix=1.0))
    targets = torch.cat(targets_seen)
    assert targets.dtype == torch.float32 and targets.shape[1] == 2  # the toy data has two classes
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert ((targets > 0).sum(1) == 2).any()  # some images carry two labels
    assert "CutMix (p 1.0)" in (tmp_path / "run" / "README.md").read_text()


def test_patch_dropout_shortens_training_sequences_until_its_end_then_trains_on_whole_images(
        toy_data, tmp_path, monkeypatch):
    import vit_core.model as model_module

    lengths = []  # the token count each block sees in each training forward, in order
    forward = model_module.Block.forward

    def recording_forward(self, x, return_attention=False):
        if self.training:
            lengths.append(x.shape[1])
        return forward(self, x, return_attention)

    monkeypatch.setattr(model_module.Block, "forward", recording_forward)
    train(tiny_config(toy_data, tmp_path / "run", epochs=2, patch_drop=0.5, patch_drop_end=0.5))
    half = len(lengths) // 2
    assert half > 0 and set(lengths[:half]) == {1 + 32} and set(lengths[half:]) == {1 + 64}
    assert "patch dropout (50% of patch tokens left out for the first 50% of the schedule)" in \
        (tmp_path / "run" / "README.md").read_text()


@pytest.mark.parametrize("overrides, message", [
    (dict(epochs=0), "--epochs"),
    (dict(patch_drop=1.0), "--patch-drop"),
    (dict(patch_drop_end=1.5), "--patch-drop-end"),
    (dict(lr=-1.0), "--lr"),
    (dict(schedule="linear"), "--schedule"),
    (dict(augment="cutmix"), "--augment"),
    (dict(attn_init="identity"), "--attn-init"),
    (dict(random_erase=1.5), "--random-erase"),
    (dict(cutmix=2.0), "--cutmix"),
    (dict(pos_init="learned"), "--pos-init"),
    (dict(label_smoothing=1.5), "--label-smoothing"),
    (dict(preset="huge"), "--preset"),
    (dict(milestones=[5]), "--milestones"),
    (dict(limit_train=10), "--limit-train"),
    (dict(time_budget_min=5, schedule="multistep"), "--time-budget"),
])
def test_bad_settings_are_rejected_before_anything_is_written(toy_data, tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=message):
        train(tiny_config(toy_data, out, **overrides))
    assert not out.exists()


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    code = train_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--epochs", "3"])
    assert code == 2
    assert "error: no CIFAR-10 found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--data", "x", "--out", "y", "--epochs", "three"])


def test_cli_records_the_exact_command(toy_data):
    cfg = parse_args(["--data", str(toy_data), "--out", "o", "--preset", "tiny", "--schedule", "multistep"])
    assert cfg.command.startswith("python train.py --data ") and "--schedule multistep" in cfg.command
    assert cfg.schedule == "multistep" and cfg.preset == "tiny"


def test_multistep_schedule_decays_at_milestones(toy_data, tmp_path):
    train(tiny_config(toy_data, tmp_path / "ms", schedule="multistep", milestones=[1, 2], gamma=0.1, lr=1e-3))
    lrs = [h["lr"] for h in json.loads((tmp_path / "ms" / "history.json").read_text())]
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-5])


def test_push_to_hub_offline_fails_clearly_after_saving(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="Nothing is lost"):
        train(tiny_config(toy_data, out, epochs=1, push_to_hub="someone/vit"))
    assert ViTClassifier.from_pretrained(out).class_names == ["blue", "red"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_smoke_run(toy_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(ROOT / "train.py"), "--data", str(toy_data), "--out", str(out),
         "--preset", "tiny", "--epochs", "2", "--warmup-epochs", "0.5", "--batch-size", "16", "--val-size", "16",
         "--num-threads", "1",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "train_info.json").read_text())
    assert info["world_size"] == 2
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    # 80 training images, batch 16 split over 2 ranks: every rank's images are counted once.
    assert history[0]["train_images_per_s"] > 0
    assert ViTClassifier.from_pretrained(out).depth == 2


def test_time_budget_stops_the_run_and_anneals_to_zero(toy_data, tmp_path):
    out = tmp_path / "timed"
    # 0.05 min = 3 s: far fewer than the 100 epochs allowed fit, so the clock ends the run.
    summary = train(tiny_config(toy_data, out, epochs=100, time_budget_min=0.05, warmup_epochs=0))
    history = json.loads((out / "history.json").read_text())
    assert 1 <= len(history) < 100 and summary["epochs_run"] == len(history)
    assert summary["wall_seconds"] < 60
    assert history[-1]["lr"] < history[0]["lr"]


def test_resume_may_replan_epochs_into_a_time_budget(toy_data, tmp_path):
    out = tmp_path / "replanned"
    train(tiny_config(toy_data, out, epochs=2))
    train(tiny_config(toy_data, out, epochs=50, time_budget_min=0.05, resume=True))
    info = json.loads((out / "train_info.json").read_text())
    assert [s["from_epoch"] for s in info["segments"]] == [0, 2]
    assert info["segments"][1]["time_budget_min"] == 0.05
    assert len(json.loads((out / "history.json").read_text())) > 2


def test_adaptive_threads_keeps_the_faster_choice():
    from vit_core.training import AdaptiveThreads

    tuner = AdaptiveThreads(max_threads=2, period=20, trial=3)
    step_time = {1: 0.5, 2: 0.9}  # as on a CPU whose second core is busy
    picked = []
    for step in range(40):
        threads = tuner.threads_for(step)
        picked.append(threads)
        tuner.current = threads
        tuner.end(step, step_time[threads])
    # Exploration: 3 steps of each choice at the start of every period, then the faster one.
    assert picked[:6] == [1, 1, 1, 2, 2, 2]
    assert set(picked[6:20]) == {1} and set(picked[26:40]) == {1}
    step_time = {1: 0.5, 2: 0.3}  # the other load went away
    for step in range(40, 60):
        threads = tuner.threads_for(step)
        tuner.current = threads
        tuner.end(step, step_time[threads])
    assert tuner.best == 2
