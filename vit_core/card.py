"""The model card (README.md) written beside exported weights, from the files the run left there."""

from __future__ import annotations

import json
from pathlib import Path

from .faithfulness import read_results, result_mean

TRAIN_INFO = "train_info.json"
HISTORY = "history.json"
INIT_HISTORY = "init_history.json"  # a warm start's (`--init-from`): the epochs behind its starting weights
EVAL_INFO = "eval.json"
NOTES = "notes.md"


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _schedule(cfg: dict) -> str:
    if cfg["schedule"] == "multistep":
        return f"{cfg['epochs']} epochs, MultiStepLR (×{cfg['gamma']} at epochs {cfg['milestones'] or '50 % and 75 %'})"
    if cfg.get("time_budget_min") is not None:  # the cosine follows the clock, so the epoch count is a cap
        return (f"warmup {cfg['warmup_epochs']} epochs then cosine to zero over a {cfg['time_budget_min']:g}-minute "
                f"wall-clock budget (`--time-budget`; at most {cfg['epochs']} epochs)")
    return f"{cfg['epochs']} epochs, warmup {cfg['warmup_epochs']} epochs then cosine to zero"


def _extras(cfg: dict) -> str:
    """Recipe settings added later; runs that predate them read as their defaults."""
    extras = ""
    if cfg.get("random_erase", 0.0) > 0:
        extras += f" + random erasing (p {cfg['random_erase']})"
    if cfg.get("cutmix", 0.0) > 0:
        extras += f" + CutMix (p {cfg['cutmix']})"
    if cfg.get("mixup", 0.0) > 0:
        extras += f" + mixup (Beta({cfg['mixup']:g}, {cfg['mixup']:g}) shares"
        extras += ", each batch mixed by one of the two at even odds)" if cfg.get("cutmix", 0.0) > 0 else ")"
    if cfg.get("patch_drop", 0.0) > 0:
        extras += (f" + patch dropout ({cfg['patch_drop']:.0%} of patch tokens left out for the first "
                   f"{cfg['patch_drop_end']:.0%} of the schedule)")
    if cfg.get("attn_init", "default") == "mimetic":
        extras += "; mimetic attention initialisation (Trockman & Kolter 2023)"
    if cfg.get("pos_init", "random") == "sincos":
        extras += "; position embedding initialised as a 2D sine-cosine code"
    if cfg.get("teacher", "none") != "none":
        temperature = cfg.get("distill_temperature", 1.0)
        targets = f"soft targets at temperature {temperature:g}" if cfg["distill"] == "soft" else "hard targets"
        views = {1: ", its logits averaged with the mirror images'", 2: ", its logits averaged over mirror "
                 "images and one-pixel shifts"}.get(cfg.get("teacher_tta", 0), "")
        extras += (f"; distillation from a CNN teacher ({targets} on the same augmented images{views}, "
                   f"weight {cfg['distill_weight']})")
    if cfg.get("init_from"):
        extras += f"; started from the weights of `{cfg['init_from']}` (`--init-from`, a warm restart)"
    return extras


ACCURACY_MARKS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90)


def lineage(folder: str | Path) -> list[dict]:
    """Every epoch behind a run's weights: those of the runs it warm-started from, then its own,
    numbered on, so curves and minutes-to-accuracy tell the whole training."""
    folder = Path(folder)
    before, own = _read(folder / INIT_HISTORY) or [], _read(folder / HISTORY) or []
    offset = before[-1]["epoch"] if before else 0
    return before + [{**record, "epoch": record["epoch"] + offset} for record in own]


def minutes_to_accuracy(history: list[dict], marks=ACCURACY_MARKS) -> dict[float, float | None]:
    """Training minutes (epochs' wall time summed, validation included) until validation accuracy
    first reached each mark; None where it never did."""
    reached, minutes = {}, 0.0
    for record in history:
        minutes += record["seconds"] / 60
        for mark in marks:
            if mark not in reached and record["val_acc"] >= mark:
                reached[mark] = minutes
    return {mark: reached.get(mark) for mark in marks}


def _teacher_lines(info: dict) -> list[str]:
    teacher = info["teacher"]
    given = info["config"].get("teacher", "auto")
    by = "first by the same command" if given == "auto" else f"by an earlier run (given as `--teacher {given}`)"
    network = "WhitenedTeacher" if teacher.get("kind") == "whitened" else "ConvTeacher"
    run = teacher.get("epochs_run", teacher["epochs"])
    epochs = f"{teacher['epochs']} epochs" if run == teacher["epochs"] else \
        f"{run} of {teacher['epochs']} epochs (its time budget ran out)"
    if teacher.get("reused_from"):
        by = (f"by an earlier run and reused from `{teacher['reused_from']}` by `--teacher auto`, as it held out "
              f"the same validation images,")
    return [f"Teacher: the `{network}` CNN (`vit_core/teacher.py`), trained {by} for "
            f"{epochs} in {teacher['minutes']:.1f} min on the same training images; "
            f"validation accuracy {teacher['val_acc'] * 100:.2f} %. It only supplies training targets."
            + (f" It was trained by `{teacher['command']}`." if given != "auto" and teacher.get("command") else "")]


def _time_to_accuracy_lines(history: list[dict]) -> list[str]:
    if not history:
        return []
    cells = [f"{m:.1f} min" if m is not None else "not reached"
             for m in minutes_to_accuracy(history).values()]
    return ["", "Time to validation accuracy (training minutes on the machine above, teacher excluded; a warm "
            "start's minutes count the runs its weights started from):", "",
            "| " + " | ".join(f"{mark:.0%}" for mark in ACCURACY_MARKS) + " |",
            "| " + " | ".join("---" for _ in ACCURACY_MARKS) + " |",
            "| " + " | ".join(cells) + " |"]


def _header(info: dict) -> list[str]:
    cfg, mc = info["config"], info["model_config"]
    return [
        "---", "library_name: vit-attention-explorer", "license: mit",
        "tags: [image-classification, vision-transformer, cifar10]", "datasets: [cifar10]", "---", "",
        "# ViT for CIFAR-10 (patch 4), trained from scratch", "",
        "The weights behind the ViT attention explorer. Load with",
        "`vit_core.ViTClassifier.from_pretrained(path_or_repo_id)`.", "",
        "## Architecture", "",
        f"Patch {mc['patch_size']} on {mc['image_size']}×{mc['image_size']} images "
        f"({(mc['image_size'] // mc['patch_size']) ** 2} patches + CLS), width {mc['emb_size']}, "
        f"{mc['depth']} pre-norm blocks, {mc['n_heads']} heads, MLP ratio {mc['mlp_ratio']}, "
        f"dropout {mc['dropout']}; {info['n_params']:,} parameters (preset `{cfg['preset']}`).", "",
        "## Data", "",
        f"CIFAR-10 from `{cfg['data']}`: {info['train_images']} training images, {info['val_images']} "
        f"held out for validation (seed {cfg['seed']}); the best epoch is chosen on validation, never on test.",
    ]


def _recipe(info: dict) -> list[str]:
    cfg = info["config"]
    return [
        "", "## Recipe", "",
        f"AdamW (lr {cfg['lr']}, weight decay {cfg['weight_decay']}), batch {cfg['batch_size']}, "
        f"{_schedule(cfg)}, label smoothing {cfg['label_smoothing']}, gradient clipping {cfg['clip_grad']}, augmentation "
        f"`{cfg['augment']}` + horizontal flip{_extras(cfg)}, amp `{cfg['amp']}`. Validation and test "
        "predictions average each image with its mirror image.", "",
        "Command:", "", "```", cfg.get("command") or "(not recorded)", "```", "",
    ] + _warm_start_note(cfg) + [
        f"Machine: {info['machine']} (×{info['world_size']} process(es)).",
    ]


def _warm_start_note(cfg: dict) -> list[str]:
    """A warm start's folder may hold other weights by the time someone runs the command again."""
    if not cfg.get("init_from"):
        return []
    return [f"`--init-from {cfg['init_from']}` read the starting weights that folder held when this run "
            "started (their run is below); to run the command again, point it at a folder holding those "
            "weights.", ""]


def _runs_behind(base: dict | None) -> list[dict]:
    """A warm start's base run and the runs behind it, newest first."""
    return [] if not base else [base] + _runs_behind(base.get("init"))


def _run_minutes(runs: list[dict]) -> list[tuple[float, bool]]:
    """Each run's minutes (newest first) and whether its teacher's are in them: a teacher several
    runs learned from was trained once, so it counts once, with the oldest run that used it."""
    counted, minutes = set(), []
    for run in reversed(runs):
        teacher = run.get("teacher")
        key = teacher and (teacher.get("kind"), teacher.get("epochs"), teacher["minutes"], teacher.get("val_acc"))
        first = teacher is not None and key not in counted
        counted.add(key)
        minutes.append((run["summary"].get("wall_seconds", 0.0) / 60 + (teacher["minutes"] if first else 0.0), first))
    return minutes[::-1]


def _teacher_share(run: dict, first: bool) -> str:
    return "teacher included" if first else "its teacher counted with an older run" if run.get("teacher") else "no teacher"


def _total_compute_lines(info: dict) -> list[str]:
    """This run, its teacher and, for a warm start, each run that trained the starting weights."""
    runs = [info] + _runs_behind(info.get("init"))
    (minutes, _), *behind = _run_minutes(runs)
    if len(runs) > 1:
        total_behind = sum(m for m, _ in behind)
        lines = ["", f"Total compute: {(minutes + total_behind) / 60:.2f} h of this machine: this run "
                 f"{minutes:.1f} min, and {total_behind:.1f} min (teachers included) for the training behind the "
                 f"starting weights in `{runs[1]['folder']}`. The runs behind them, newest first (each one's last "
                 "segment's command; a teacher that several runs learned from counts once, with the oldest):", ""]
        return lines + [f"- {run_minutes:.1f} min, {_teacher_share(run, first)}, in {run['segments']} segment(s): "
                        f"`{run.get('command') or 'not recorded'}`" for run, (run_minutes, first) in zip(runs[1:], behind)]
    if info.get("teacher"):
        return ["", f"Total compute: {minutes / 60:.2f} h of this machine, teacher included."]
    return []


def _compute(info: dict) -> list[str]:
    """Wall time, total compute with the teacher, and every segment of a resumed run."""
    summary, segments, lines = info.get("summary", {}), info.get("segments", []), []
    if summary:
        wall = f"Wall time: {summary['wall_seconds'] / 60:.1f} min of training for {summary['epochs_run']} epochs"
        if len(segments) > 1:
            wall += (f"; {summary['seconds_since_first_start'] / 60:.1f} min from the first start to the end, "
                     "restarts and lost partial epochs included.")
        else:
            wall += ", in one uninterrupted run."
        lines += [wall]
        lines += _total_compute_lines(info)
    if info.get("teacher"):
        lines += [""] + _teacher_lines(info)
    if len(segments) > 1:
        lines += ["", "The run was started and resumed (`--resume`) in these segments; each resume continues "
                  "from the last completed epoch's checkpoint, and a partial epoch cut by a restart is lost:", ""]
        lines += [f"{i + 1}. {s['started']}, from epoch {s['from_epoch']}: `{s['command']}`"
                  for i, s in enumerate(segments)]
    return lines


def _results(out: Path, evaluation: dict | None) -> list[str]:
    lines, history, full = ["", "## Results", ""], _read(out / HISTORY) or [], lineage(out)
    if history:
        best = max(history, key=lambda h: h["val_acc"])
        offset = len(full) - len(history)  # epochs of the runs a warm start started from
        where = f"best epoch {best['epoch']}" + (f" of this run, {best['epoch'] + offset} counting the runs its "
                                                 f"weights started from" if offset else "")
        lines += [f"- Validation accuracy ({where}): {best['val_acc'] * 100:.2f} %"]
        lines += _time_to_accuracy_lines(full) + [""]
    if evaluation:
        lines += [
            f"- **Test accuracy: {evaluation['accuracy'] * 100:.2f} %** on {evaluation['n_images']} images of "
            f"`{evaluation['data']}` (mirror averaging: {evaluation['mirror']}), measured once by "
            f"`{evaluation['command']}`.", "", "| class | accuracy |", "| --- | --- |",
        ]
        lines += [f"| {name} | {acc * 100:.1f} % |" for name, acc in evaluation["per_class"].items()]
        lines += ["", "![confusion matrix](confusion.png)"]
    else:
        lines += ["- Test accuracy: not measured yet (`python -m vit_core.cli.evaluate --checkpoint DIR --data DIR`)."]
    return lines + ["", "![training statistics](training.png)", ""]


def _faithfulness_lines(out: Path) -> list[str]:
    """The table `python -m vit_core.cli.faithfulness` leaves in RESULTS_FILE, if it ran."""
    result = read_results(out)
    if result is None:
        return []
    removals, references = result["removals"], result["references"]

    def cell(name: str, removal: str | None, figure: str) -> str:
        if removal is not None and figure == "spearman_occlusion" and name == references[removal]:
            return "ref."
        mean = result_mean(result, name, removal, figure)
        return "—" if mean is None else f"{mean:.2f}"

    def both(name: str, figure: str) -> str:
        return " / ".join(cell(name, removal, figure) for removal in removals)

    modes = " / ".join({"mean": "mean fill", "drop": "token drop"}[r] for r in removals)
    lines = ["## Which map to trust", "",
             f"{result['n']} test images (seed {result['seed']}), each map explaining the predicted class, "
             f"{result['steps']} curve steps, {result['n_random']} random maps per image; measured on "
             f"{result['date'][:10]} by `{result['command']}`. Means over images (standard errors in "
             "faithfulness.json). Spearman: rank agreement with leave-one-patch-out occlusion; win: the share "
             "of random maps of the same image whose deletion (insertion) AUC the map beats, 0.5 being chance; "
             "class: Spearman between the maps for the top-1 and top-2 classes (1 = blind to the class); "
             "randomised: Spearman with the trained map once the head, then also the top block, then every "
             f"layer is re-initialised (near 0 = the map depends on those weights). Pairs are {modes}.", "",
             "| method | Spearman | deletion win | insertion win | class | randomised |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, entry in result["methods"].items():
        stages = entry.get("randomisation")
        randomised = " / ".join(f"{s['spearman']:.2f}" for s in (stages[0], stages[1], stages[-1])) if stages else "—"
        lines.append(f"| {name} | {both(name, 'spearman_occlusion')} | {both(name, 'deletion_win_rate')} | "
                     f"{both(name, 'insertion_win_rate')} | {cell(name, None, 'class_sensitivity')} | {randomised} |")
    return lines + [""]


def write_model_card(out: str | Path) -> Path:
    out = Path(out)
    info, evaluation = _read(out / TRAIN_INFO), _read(out / EVAL_INFO)
    if info is None:
        raise FileNotFoundError(f"{out / TRAIN_INFO} is missing; the card is built from a training run")
    lines = _header(info) + _recipe(info) + _compute(info) + _results(out, evaluation) + _faithfulness_lines(out)
    if (out / NOTES).exists():  # what the numbers alone do not tell, written by whoever ran it
        lines += ["## Notes", "", (out / NOTES).read_text().strip(), ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
