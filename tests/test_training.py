import json
from dataclasses import asdict as dataclasses_asdict
from dataclasses import replace as dataclasses_replace
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toys import ROOT, free_port, tiny_vit
from train import main as train_main, parse_args
from vit_core import ViTClassifier
from vit_core.training import STATE_NAME, TrainConfig, TrainError, build_model, train


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    # The plain recipe (the defaults add a teacher, CutMix and patch dropout): each test below
    # switches on what it is about.
    settings = dict(data=str(data), out=str(out), preset="tiny", epochs=3, batch_size=16, lr=3e-3,
                    warmup_epochs=0.5, val_size=16, num_threads=1, teacher="none", cutmix=0.0,
                    patch_drop=0.0, attn_init="default", pos_init="random")
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


def test_resume_takes_the_validation_share_that_holds_out_the_same_images_and_a_moved_folder(toy_data, tmp_path):
    train(tiny_config(toy_data, tmp_path / "run", epochs=1, val_size=16))  # a count: 16 of 96 images
    with pytest.raises(TrainError, match=r"--val-size 16 \(16 images\), now 0.25 \(24\)"):
        train(tiny_config(toy_data, tmp_path / "run", epochs=2, val_size=0.25, resume=True))
    (tmp_path / "run").rename(tmp_path / "moved")
    train(tiny_config(toy_data, tmp_path / "moved", epochs=2, val_size=1 / 6, resume=True))  # the same 16
    history = json.loads((tmp_path / "moved" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


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


def record_targets(monkeypatch) -> list[torch.Tensor]:
    """The loss targets of every training step of the next run, appended as it trains."""
    import vit_core.training as training_module

    seen, step = [], training_module.train_step

    def recording_step(net, optimizer, images, targets, *args, **kwargs):
        seen.append(targets)
        return step(net, optimizer, images, targets, *args, **kwargs)

    monkeypatch.setattr(training_module, "train_step", recording_step)
    return seen


def test_cutmix_trains_on_class_probabilities_split_by_area_and_is_named_in_the_card(
        toy_data, tmp_path, monkeypatch):
    targets_seen = record_targets(monkeypatch)
    train(tiny_config(toy_data, tmp_path / "run", epochs=1, cutmix=1.0))
    targets = torch.cat(targets_seen)
    assert targets.dtype == torch.float32 and targets.shape[1] == 2  # the toy data has two classes
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert ((targets > 0).sum(1) == 2).any()  # some images carry two labels
    assert "CutMix (p 1.0)" in (tmp_path / "run" / "README.md").read_text()


def test_mixup_trains_on_blended_class_probabilities_and_is_named_in_the_card(toy_data, tmp_path, monkeypatch):
    targets_seen = record_targets(monkeypatch)
    train(tiny_config(toy_data, tmp_path / "run", epochs=1, mixup=0.4))
    targets = torch.cat(targets_seen)
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    # Blend shares are continuous, unlike CutMix's whole-pixel areas of a 32 x 32 image.
    assert ((targets * 1024 - (targets * 1024).round()).abs() > 1e-3).any()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "mixup (Beta(0.4, 0.4) shares)" in card and "CutMix" not in card


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
    (dict(mixup=-1.0), "--mixup"),
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


@pytest.mark.slow
def test_two_process_torchrun_smoke_run(toy_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(ROOT / "train.py"), "--data", str(toy_data), "--out", str(out),
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


# ----------------------------------------------------------------------------------------------
# Settings named once, recipes, the schedule, the validation split, distillation


def test_every_setting_has_one_flag_with_its_help_and_defaults_are_the_shipped_recipe():
    import dataclasses

    from vit_core.config import RECIPES, build_parser

    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "command"}
    assert set(by_dest) == set(fields)
    for name, f in fields.items():
        assert f.metadata["help"] in by_dest[name].help, name
    cfg = parse_args(["--data", "d", "--out", "o"])
    defaults = TrainConfig(data="d", out="o")
    assert dataclasses.replace(cfg, command="") == defaults
    assert RECIPES["default"].settings == {} and list(RECIPES)[0] == "default"
    assert (cfg.teacher, cfg.cutmix, cfg.patch_drop, cfg.attn_init) == ("auto", 0.5, 0.5, "mimetic")


def test_help_names_what_each_recipe_is_and_a_warm_restart_needs_its_weights(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "shipped checkpoint's recipe" not in text and "default: these defaults" in text
    assert "wide-v14: the shipped weights' last run" in text
    assert train_main(["--data", "d", "--out", "o", "--recipe", "wide-v14"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad settings: --recipe wide-v14 is a warm restart: give --init-from") and \
        err.count("\n") == 1


def test_a_named_recipe_sets_its_settings_and_flags_override_it():
    cfg = parse_args(["--data", "d", "--out", "o", "--recipe", "report", "--epochs", "7"])
    assert (cfg.preset, cfg.schedule, cfg.augment, cfg.batch_size, cfg.teacher) == \
        ("seed", "multistep", "rrc", 64, "none")
    assert cfg.epochs == 7 and cfg.recipe == "report"
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--recipe", "fast"])


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(data="d", out="o", **overrides)


def test_lr_at_warms_up_then_anneals_to_zero_and_clamps_warmup_to_short_runs():
    from vit_core.training import lr_at

    cfg = _cfg(epochs=10, warmup_epochs=2, lr=1.0)
    assert lr_at(cfg, 0, 100) == pytest.approx(1 / 200)
    assert lr_at(cfg, 199, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 600, 100) == pytest.approx(0.5)  # halfway through the 800 cosine steps
    assert lr_at(cfg, 999, 100) < 1e-4
    short = _cfg(epochs=1, warmup_epochs=2, lr=1.0)  # a fifth of one epoch: 20 steps of warmup
    assert lr_at(short, 19, 100) == pytest.approx(1.0) and lr_at(short, 18, 100) < 1.0
    timed = _cfg(epochs=100, warmup_epochs=0, lr=1.0, time_budget_min=1.0)
    assert lr_at(timed, 5, 100, elapsed_s=30) == pytest.approx(0.5)
    steps = _cfg(epochs=4, schedule="multistep", milestones=[1, 3], gamma=0.5, lr=1.0)
    assert [lr_at(steps, e * 10, 10) for e in range(4)] == pytest.approx([1.0, 0.5, 0.5, 0.25])


def test_one_epoch_with_the_default_recipe_trains_a_teacher_and_distils(toy_data, tmp_path):
    out = tmp_path / "run"
    code = train_main(["--data", str(toy_data), "--out", str(out), "--epochs", "1", "--preset", "tiny",
                       "--teacher-epochs", "1", "--batch-size", "16", "--num-threads", "1"])
    assert code == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["val_images"] == 10 and info["train_images"] == 86  # 10 % of 96, both classes kept
    assert info["teacher"]["epochs"] == 1 and 0 <= info["teacher"]["val_acc"] <= 1
    card = (out / "README.md").read_text()
    assert "distillation from a CNN teacher (hard targets" in card and "Teacher: the `ConvTeacher`" in card
    assert (out / "teacher" / "model.safetensors").exists()


def test_resume_reuses_the_trained_teacher(toy_data, tmp_path, monkeypatch):
    import vit_core.training as training_module

    cfg = tiny_config(toy_data, tmp_path / "run", epochs=1, teacher="auto", teacher_epochs=1)
    train(cfg)
    weights = tmp_path / "run" / "teacher" / "model.safetensors"
    before = weights.read_bytes()
    monkeypatch.setattr(training_module, "_train_teacher_now", lambda *a, **k: pytest.fail("teacher retrained"))
    train(tiny_config(toy_data, tmp_path / "run", epochs=2, teacher="auto", teacher_epochs=1, resume=True))
    assert weights.read_bytes() == before


def test_auto_reuses_the_shipped_teacher_only_where_it_fits(toy_data, tmp_path, monkeypatch, capsys):
    import vit_core.training as training_module

    train(tiny_config(toy_data, tmp_path / "first", epochs=1, teacher="auto", teacher_epochs=1))
    assert "teacher: training a CNN teacher into" in capsys.readouterr().out
    shipped = tmp_path / "first" / "teacher"  # stands in for checkpoints/cnn-teacher
    recorded = json.loads((shipped / "teacher_info.json").read_text())["split"]
    assert recorded["classes"] == ["blue", "red"] and recorded["val_images"] == 16
    monkeypatch.setattr(training_module, "SHIPPED_TEACHER", shipped)
    trained = []
    real = training_module.TRAINERS["conv"]
    monkeypatch.setitem(training_module.TRAINERS, "conv", lambda *a, **k: trained.append(1) or real(*a, **k))
    # The same data, seed and split: the shipped teacher is copied in, none is trained.
    train(tiny_config(toy_data, tmp_path / "same", epochs=1, teacher="auto", teacher_epochs=1))
    assert not trained and "teacher: the shipped one" in capsys.readouterr().out
    copied = tmp_path / "same" / "teacher"
    assert (copied / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "same" / "train_info.json").read_text())["teacher"]["reused_from"]
    assert "reused from `checkpoints/cnn-teacher` by `--teacher auto`" in (tmp_path / "same" / "README.md").read_text()
    # Another seed holds out other images, which the shipped teacher has trained on: it trains its own.
    train(tiny_config(toy_data, tmp_path / "other", epochs=1, teacher="auto", teacher_epochs=1, seed=3))
    out = capsys.readouterr().out
    assert trained and "the shipped one does not fit: it was trained with other validation images held out" in out
    assert out.index("teacher: training") < out.index("parameters;")  # said before the student starts


def test_a_teacher_for_other_classes_does_not_fit(toy_data, tmp_path):
    from vit_core.data import load_split, split_validation
    from vit_core.training import held_out_digest, teacher_misfit

    train_set, val_set = split_validation(load_split(toy_data, "train"), 16, seed=0)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    split = {"classes": ["cat", "dog"], "held_out_sha256": held_out_digest(val_set)}
    (folder / "teacher_info.json").write_text(json.dumps({"split": split}))
    assert teacher_misfit(folder, train_set, val_set) == "it knows other classes"
    split["classes"] = ["blue", "red"]
    (folder / "teacher_info.json").write_text(json.dumps({"split": split}))
    assert teacher_misfit(folder, train_set, val_set) is None
    assert "holds no trained teacher" in teacher_misfit(tmp_path / "nowhere", train_set, val_set)


def test_a_teacher_from_another_run_counts_in_the_cards_compute(toy_data, tmp_path):
    train(tiny_config(toy_data, tmp_path / "first", epochs=1, teacher="auto", teacher_epochs=1,
                      command="python train.py --out first"))
    folder = tmp_path / "first" / "teacher"
    train(tiny_config(toy_data, tmp_path / "second", epochs=1, teacher=str(folder)))
    info = json.loads((tmp_path / "second" / "train_info.json").read_text())
    assert info["teacher"] == json.loads((folder / "teacher_info.json").read_text())
    card = (tmp_path / "second" / "README.md").read_text()
    # The folder by name only: tmp_path is not under the working folder (vit_core.records).
    assert "Total compute:" in card and "trained by an earlier run (given as `--teacher teacher`)" in card
    assert "It was trained by `python train.py --out first`." in card
    assert "trained first by the same command" in (tmp_path / "first" / "README.md").read_text()
    assert not (tmp_path / "second" / "teacher").exists()


def test_init_from_starts_from_a_trained_checkpoint_and_counts_its_run_in_the_compute(toy_data, tmp_path):
    train(tiny_config(toy_data, tmp_path / "first", epochs=2, command="python train.py --out first"))
    first = ViTClassifier.from_pretrained(tmp_path / "first").state_dict()
    # A learning rate too small to move the weights: the exported model is the starting one.
    train(tiny_config(toy_data, tmp_path / "warm", epochs=1, lr=1e-12, init_from=str(tmp_path / "first"),
                      command="python train.py --out warm"))
    warm = ViTClassifier.from_pretrained(tmp_path / "warm").state_dict()
    assert all(torch.allclose(first[k], warm[k], atol=1e-6) for k in first)
    train(tiny_config(toy_data, tmp_path / "cold", epochs=1, lr=1e-12))
    cold = ViTClassifier.from_pretrained(tmp_path / "cold").state_dict()
    assert not torch.allclose(first["head.weight"], cold["head.weight"], atol=1e-3)
    base = json.loads((tmp_path / "first" / "train_info.json").read_text())["summary"]["wall_seconds"] / 60
    info = json.loads((tmp_path / "warm" / "train_info.json").read_text())
    assert info["init"]["summary"]["wall_seconds"] / 60 == pytest.approx(base)
    card = (tmp_path / "warm" / "README.md").read_text()
    assert "(`--init-from`, a warm restart)" in card
    # The curves and minutes-to-accuracy go on from the starting run's epochs.
    from vit_core.card import lineage

    full = lineage(tmp_path / "warm")
    assert [r["epoch"] for r in full] == [1, 2, 3]
    assert full[:2] == json.loads((tmp_path / "first" / "history.json").read_text())
    assert "best epoch 1 of this run, 3 counting the runs its weights started from" in card
    assert f"and {base:.1f} min (teachers included) for the training behind the starting weights" in card
    # A warm start from a warm start counts both runs before it.
    train(tiny_config(toy_data, tmp_path / "again", epochs=1, lr=1e-12, init_from=str(tmp_path / "warm")))
    warm_minutes = json.loads((tmp_path / "warm" / "train_info.json").read_text())["summary"]["wall_seconds"] / 60
    card = (tmp_path / "again" / "README.md").read_text()
    assert f"and {base + warm_minutes:.1f} min (teachers included)" in card
    assert card.index("segment(s): `python train.py --out warm`") < card.index("segment(s): `python train.py --out first`")
    assert [r["epoch"] for r in lineage(tmp_path / "again")] == [1, 2, 3, 4]


def test_a_teacher_several_restarts_learned_from_counts_once_in_the_total_compute():
    from vit_core.card import _total_compute_lines

    shared = {"kind": "whitened", "epochs": 20, "minutes": 60.0, "val_acc": 0.9}
    own = {"kind": "conv", "epochs": 10, "minutes": 10.0, "val_acc": 0.89}

    def run(minutes, teacher, init=None, name="r"):
        return {"summary": {"wall_seconds": minutes * 60}, "teacher": teacher and dict(teacher), "init": init,
                "folder": f"runs/{name}", "segments": 1, "command": f"python train.py --out runs/{name}"}

    oldest = run(100.0, own, name="a")
    info = run(30.0, shared, run(20.0, shared, run(40.0, shared, oldest, "c"), "b"))
    text = "\n".join(_total_compute_lines(info))
    # 30 + 20 + 40 + 100 minutes of students, the shared teacher's 60 once (with c, the oldest run
    # that learned from it) and a's own 10: not 30 + 60 + 20 + 60 + 40 + 60 + 110.
    assert f"Total compute: {260 / 60:.2f} h" in text and "this run 30.0 min, and 230.0 min" in text
    for minutes, share, name in ((20.0, "its teacher counted with an older run", "b"),
                                 (100.0, "teacher included", "c"), (110.0, "teacher included", "a")):
        assert f"- {minutes:.1f} min, {share}, in 1 segment(s): `python train.py --out runs/{name}`" in text


def test_a_resumed_warm_start_keeps_the_record_of_its_starting_run(toy_data, tmp_path):
    train(tiny_config(toy_data, tmp_path / "first", epochs=1))
    base = json.loads((tmp_path / "first" / "train_info.json").read_text())["summary"]["wall_seconds"] / 60
    warm = tiny_config(toy_data, tmp_path / "warm", epochs=1, init_from=str(tmp_path / "first"))
    train(warm)
    (tmp_path / "first").rename(tmp_path / "moved")  # a resume may run where that path means nothing
    train(dataclasses_replace(warm, epochs=2, resume=True))
    info = json.loads((tmp_path / "warm" / "train_info.json").read_text())
    assert len(info["segments"]) == 2 and info["init"]["folder"] == "first"  # by name: tmp_path is not under cwd
    assert f"and {base:.1f} min (teachers included)" in (tmp_path / "warm" / "README.md").read_text()


def test_init_from_a_missing_or_unfitting_checkpoint_is_a_clear_error(toy_data, tmp_path, capsys):
    code = train_main(["--data", str(toy_data), "--out", str(tmp_path / "a"), "--teacher", "none",
                       "--init-from", str(tmp_path / "nowhere")])
    assert code == 2 and "--init-from" in capsys.readouterr().err and not (tmp_path / "a").exists()
    train(tiny_config(toy_data, tmp_path / "first", epochs=1))
    with pytest.raises(TrainError, match="--init-from .* held out 16 images .* would hold out 8"):
        train(tiny_config(toy_data, tmp_path / "d", val_size=8, init_from=str(tmp_path / "first")))
    with pytest.raises(TrainError, match="--seed 0, this one would hold out 16 with --seed 1"):
        train(tiny_config(toy_data, tmp_path / "e", seed=1, init_from=str(tmp_path / "first")))
    tiny_vit(n_classes=2, class_names=["blue", "red"]).save_pretrained(tmp_path / "tiny")
    with pytest.raises(TrainError, match="--init-from .* not --preset cpu"):
        train(tiny_config(toy_data, tmp_path / "b", preset="cpu", init_from=str(tmp_path / "tiny")))
    tiny_vit(n_classes=2, class_names=["cat", "dog"]).save_pretrained(tmp_path / "other")
    with pytest.raises(TrainError, match="knows classes"):
        train(tiny_config(toy_data, tmp_path / "c", init_from=str(tmp_path / "other")))
    assert "validation split cannot be checked" in capsys.readouterr().err


def test_the_shipped_teacher_is_the_trained_one_and_classifies_the_shipped_examples():
    """`--teacher checkpoints/cnn-teacher` stands in for the default recipe's teacher training."""
    import numpy as np
    from PIL import Image

    from vit_core.preprocessing import normalize
    from vit_core.teacher import ConvTeacher, teacher_logits

    folder = ROOT / "checkpoints" / "cnn-teacher"
    teacher = ConvTeacher.from_pretrained(folder).eval()  # safetensors, strict keys and shapes
    files = sorted((ROOT / "demo" / "examples").glob("*.jpg"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files])
    with torch.no_grad():
        predicted = teacher_logits(teacher, normalize(images, teacher.mean, teacher.std), bf16=False).argmax(-1)
    truth = [teacher.class_names.index(f.stem.rsplit("_", 1)[0]) for f in files]
    assert len(files) == 30 and sum(p == t for p, t in zip(predicted.tolist(), truth)) >= 25
    info = json.loads((folder / "teacher_info.json").read_text())
    assert info["epochs"] == TrainConfig(data="d", out="o").teacher_epochs and info["val_acc"] > 0.85


def test_distillation_targets_are_the_teachers_predictions_for_the_same_images():
    from vit_core.training import distillation_loss, train_step

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    hard = distillation_loss(logits, teacher, "hard", 0.0)
    assert hard == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).item())
    assert distillation_loss(logits, logits, "soft", 0.0).abs() < 1e-6
    assert distillation_loss(logits, teacher, "soft", 0.0) > 0.1

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    model = tiny_vit(n_classes=2, class_names=["a", "b"], image_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images = torch.randn(4, 3, 16, 16)
    cfg = _cfg(distill_weight=1.0, label_smoothing=0.0, amp="off")
    _, loss = train_step(model.train(), optimizer, images, torch.tensor([0, 1, 0, 1]), cfg, torch.device("cpu"),
                         teacher=Recorder())
    assert torch.equal(seen[0], images)
    with torch.no_grad():  # teacher says class 0 for all (argmax of equal zeros): the loss is CE to 0
        expected = torch.nn.functional.cross_entropy(model(images), torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_split_takes_a_share_keeps_every_class_and_matches_the_old_count_split():
    from vit_core.data import ImageTensors, split_validation

    labels = torch.tensor([0] * 390 + [1] * 5 + [2] * 5)
    data = ImageTensors(torch.zeros(400, 3, 2, 2, dtype=torch.uint8), labels, ["a", "b", "c"])
    train_part, val = split_validation(data, 0.1)
    assert len(val) == 40 and len(train_part) == 360
    assert set(val.labels.tolist()) == {0, 1, 2}
    assert len(split_validation(data, 0.01)[1]) == 4  # raised to cover each class
    with pytest.raises(ValueError, match="share below 1"):
        split_validation(data, 5000)
    cifar_like = ImageTensors(torch.zeros(1000, 1, 1, 1, dtype=torch.uint8), torch.arange(1000) % 10,
                              list("abcdefghij"))
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(split_validation(cifar_like, 100)[1].labels, (torch.arange(1000) % 10)[order[:100].sort().values])


def test_bad_validation_size_and_teacher_are_clear_errors(toy_data, tmp_path, capsys):
    code = train_main(["--data", str(toy_data), "--out", str(tmp_path / "a"), "--val-size", "5000", "--teacher", "none"])
    assert code == 2 and "--val-size" in capsys.readouterr().err
    code = train_main(["--data", str(toy_data), "--out", str(tmp_path / "b"), "--teacher", str(tmp_path / "nowhere")])
    assert code == 2 and "--teacher" in capsys.readouterr().err


def test_card_gives_minutes_to_each_validation_accuracy():
    from vit_core.card import minutes_to_accuracy

    history = [{"seconds": 60, "val_acc": 0.6}, {"seconds": 120, "val_acc": 0.72},
               {"seconds": 60, "val_acc": 0.81}, {"seconds": 60, "val_acc": 0.79}]
    assert minutes_to_accuracy(history) == {0.70: 3.0, 0.75: 4.0, 0.80: 4.0, 0.85: None, 0.88: None, 0.90: None}


# The run that made the shipped weights first, then each run it restarted from, back to the one
# that began from scratch; the model card gives each one's command.
SHIPPED_LINEAGE = ("wide-v14", "wide-v13", "wide-v12", "wide-v11", "wide-v10", "wide-v7")


def test_each_run_behind_the_shipped_weights_is_its_named_recipe():
    """train_info.json keeps the command of the run that made the shipped weights and, nested under
    "init", the command of each run it restarted from. Each must parse to its recipe's settings
    (paths, machine and run-control settings aside); only a warm restart names starting weights, and
    the teacher the last run learned from is shipped beside it."""
    import shlex

    from vit_core.config import RECIPES

    info = json.loads((ROOT / "checkpoints" / "vit-cifar10" / "train_info.json").read_text())
    ignore = {"data", "out", "command", "recipe", "device", "num_threads", "adaptive_threads", "resume",
              "download", "push_to_hub", "patience", "val_size", "teacher", "init_from"}
    node, command = info, info["config"]["command"]
    for recipe in SHIPPED_LINEAGE:
        ran = dataclasses_asdict(parse_args(shlex.split(command)[2:]))
        rebuilt = dataclasses_asdict(TrainConfig(data="d", out="o", **RECIPES[recipe].settings))
        assert {k: (ran[k], rebuilt[k]) for k in ran if k not in ignore and ran[k] != rebuilt[k]} == {}, recipe
        assert ran["val_size"] == round(rebuilt["val_size"] * 50_000), recipe  # the same 10 % of the train split
        assert RECIPES[recipe].warm_restart == (ran["init_from"] is not None), recipe
        node = node["init"]
        command = node and node["command"]
    assert node is None
    teachers = [json.loads(path.read_text()) for path in (ROOT / "checkpoints").glob("*/teacher_info.json")]
    assert any(info["teacher"].items() <= shipped.items() for shipped in teachers)
