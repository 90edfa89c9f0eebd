"""The training loop behind `train.py`: in-memory data, batch augmentation (+ random erasing, CutMix),
optional mimetic / sine-cosine initialisation for small-data training, distillation from a CNN
teacher, AdamW with one schedule function (`lr_at`), label smoothing, gradient clipping, bf16
autocast, exact resume from an atomic per-epoch checkpoint, early stopping on a held-out
validation split, and data-parallel training under `torchrun`.

`train()` reads as four steps: `setup`, then per epoch `run_epoch` and `validate_and_checkpoint`,
then `finish`. The settings live in `config.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoints import CheckpointError, load_checkpoint
from .config import RESUMABLE_CHANGES, SAME_SPLIT, TrainConfig, TrainError
from .data import ImageTensors, augment, load_split, mix, random_erase, split_validation, validation_count
from .devices import DeviceError, autocast, pick_device, uses_bf16
from .evaluate import predict_probs
from .model import WEIGHTS_NAME, ViTClassifier, mimetic_attention_init_, sincos_position_init_
from .preprocessing import normalize
from .records import portable_path
from .teacher import TRAINERS, load_teacher, tta_logits

STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"
TEACHER_INFO_NAME = "teacher_info.json"  # beside a trained teacher's weights: its epochs, minutes, accuracy
INFO_NAME = "train_info.json"
# The teacher `--teacher auto` copies instead of training one where it fits the run (a clone has it;
# an installed package does not, and then trains its own). Recorded by its name in the project.
SHIPPED_TEACHER_NAME = "checkpoints/cnn-teacher"
SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / SHIPPED_TEACHER_NAME


# ----------------------------------------------------------------------------------------------
# Small pieces


def build_model(cfg: TrainConfig, classes: list[str]) -> ViTClassifier:
    overrides = {"n_classes": len(classes), "class_names": classes}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    model = ViTClassifier.from_preset(cfg.preset, **overrides)
    if cfg.attn_init == "mimetic":
        mimetic_attention_init_(model)
    if cfg.pos_init == "sincos":
        sincos_position_init_(model)
    return model


def warm_start_(model: ViTClassifier, cfg: TrainConfig) -> None:
    """--init-from: copy a trained checkpoint's weights into the fresh model (safetensors, strict keys
    and shapes; a local folder only, never the Hub)."""
    try:
        source = load_checkpoint(Path(cfg.init_from))
    except CheckpointError as error:
        raise TrainError(f"--init-from {cfg.init_from}: {error}") from error
    if source.class_names != model.class_names:
        raise TrainError(f"--init-from {cfg.init_from} knows classes {source.class_names}, "
                         f"the data has {model.class_names}")
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as error:
        raise TrainError(f"--init-from {cfg.init_from}: its network is not --preset {cfg.preset} "
                         f"({str(error).strip().splitlines()[-1].strip()})") from error


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, elapsed_s: float = 0.0) -> float:
    """The learning rate for a global step: the one place the schedule lives.

    Cosine: linear warmup (at most a fifth of the run, so short runs still anneal), then cosine to
    zero over the steps, or over the wall-clock budget when `time_budget_min` is set (`elapsed_s`
    is the training time so far). Multistep: the report's MultiStepLR, x `gamma` at each milestone.
    """
    if cfg.schedule == "multistep":
        milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
        return cfg.lr * cfg.gamma ** sum(step // steps_per_epoch >= m for m in milestones)
    total = cfg.epochs * steps_per_epoch
    warmup = int(min(cfg.warmup_epochs, cfg.epochs / 5) * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.time_budget_min is not None:
        progress = elapsed_s / (cfg.time_budget_min * 60)
    else:
        progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {usable_cpu_count()} of {os.cpu_count()} CPU cores usable, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def usable_cpu_count() -> int:
    """Cores this process may run on: a CPU-affinity mask (taskset, a container) can allow fewer than exist."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class AdaptiveThreads:
    """Picks the faster of one thread or all threads while training on a shared CPU.

    Intra-op work is split evenly over threads, so when another process takes part of one core,
    every step waits for the thread on that core: two threads can then be slower than one. Every
    `period` steps this times `trial` steps with each choice and keeps the faster until the next check.
    """

    def __init__(self, max_threads: int, period: int = 60, trial: int = 4):
        self.choices = sorted({1, max_threads})
        self.period, self.trial = period, trial
        self.timings: dict[int, list[float]] = {c: [] for c in self.choices}
        self.best = self.choices[-1]
        self.current = torch.get_num_threads()

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        exploring = phase < self.trial * len(self.choices)
        return self.choices[phase // self.trial] if exploring else self.best

    def begin(self, step: int) -> None:
        wanted = self.threads_for(step)
        if wanted != self.current:
            torch.set_num_threads(wanted)
            self.current = wanted

    def end(self, step: int, seconds: float) -> None:
        phase = step % self.period
        if phase < self.trial * len(self.choices) and phase % self.trial:  # first step of a trial warms up
            self.timings[self.current].append(seconds)
        if phase == self.trial * len(self.choices) - 1:
            medians = {c: sorted(t)[len(t) // 2] for c, t in self.timings.items() if t}
            self.best = min(medians, key=medians.get)
            self.timings = {c: [] for c in self.choices}


def make_batch(data: ImageTensors, indices: torch.Tensor, policy: str, mean, std, device: torch.device,
               generator: torch.Generator, erase: float = 0.0, cutmix: float = 0.0, mixup: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index the uint8 images, normalise and augment the whole batch with tensor ops.

    Returns images, labels and the loss targets: the labels themselves, or with CutMix (`cutmix`
    > 0) or mixup (`mixup` > 0) class probabilities that split each image between its label and
    its neighbour's by its own share (of area, or of blend).
    """
    images = normalize(data.images[indices].to(device, non_blocking=True), mean, std)
    labels = data.labels[indices].to(device, non_blocking=True)
    images = random_erase(augment(images, policy, generator), erase, generator)
    if cutmix == 0.0 and mixup == 0.0:
        return images, labels, labels
    images, own_share = mix(images, cutmix, mixup, generator)
    n_classes = len(data.classes)
    own = F.one_hot(labels, n_classes).float() * own_share[:, None]
    pasted = F.one_hot(labels.roll(1, 0), n_classes).float() * (1 - own_share[:, None])
    return images, labels, own + pasted


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str,
                      label_smoothing: float, temperature: float = 1.0) -> torch.Tensor:
    """Hard: cross-entropy with the teacher's top class (DeiT's hard distillation, which beat soft
    targets there). Soft: KL(teacher || student) between the probabilities of both logits divided
    by `temperature`, times temperature^2 so the gradients keep their size (Hinton et al. 2015)."""
    if mode == "hard":
        return F.cross_entropy(logits, teacher_logits.argmax(-1), label_smoothing=label_smoothing)
    student = (logits / temperature).log_softmax(-1)
    teacher = (teacher_logits / temperature).log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               targets: torch.Tensor, cfg: TrainConfig, device: torch.device,
               drop_patches: float = 0.0, teacher: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on class indices or class probabilities, plus, with a teacher, its
    predictions for the very same augmented images; returns the logits and the loss."""
    with autocast(device, cfg.amp):
        logits = net(images, drop_patches=drop_patches)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        # The teacher sees the very batch the student does (crop, flip, mixing): consistent views.
        targets_from = tta_logits(teacher, images, cfg.teacher_tta, uses_bf16(device, cfg.amp))
        taught = distillation_loss(logits.float(), targets_from, cfg.distill, cfg.label_smoothing,
                                   cfg.distill_temperature)
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * taught
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
    optimizer.step()
    return logits, loss


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, CLS or positions)."""
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name

    params = list(model.named_parameters())
    return torch.optim.AdamW([
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
    ], lr=cfg.lr)


def teacher_folder(cfg: TrainConfig, out: Path) -> Path:
    """Where the run's teacher lives: OUT/teacher for 'auto', else the folder given."""
    return out / "teacher" if cfg.teacher == "auto" else Path(cfg.teacher)


def require_teacher_weights(cfg: TrainConfig, folder: Path) -> None:
    """A teacher is always a local folder: never ask the Hub for one."""
    if not (folder / WEIGHTS_NAME).is_file():
        raise TrainError(f"--teacher {cfg.teacher}: {folder} holds no trained teacher ({WEIGHTS_NAME}); "
                         f"pass 'auto' to train one, 'none' to train without, or the folder of a trained one")


def held_out_digest(val_set: ImageTensors) -> str:
    """SHA-256 of the validation images and labels: equal digests, the same held-out images."""
    digest = hashlib.sha256(val_set.images.contiguous().numpy().tobytes())
    digest.update(val_set.labels.numpy().tobytes())
    return digest.hexdigest()


def split_record(train_set: ImageTensors, val_set: ImageTensors) -> dict:
    """What a teacher's info records of the split it was trained on, so a later run can tell whether
    the teacher has seen that run's validation images (`teacher_misfit`)."""
    return {"classes": list(train_set.classes), "train_images": len(train_set), "val_images": len(val_set),
            "held_out_sha256": held_out_digest(val_set)}


def teacher_misfit(folder: Path, train_set: ImageTensors, val_set: ImageTensors) -> str | None:
    """Why the trained teacher in `folder` cannot stand in for this run's (None: it can): it must
    know the same classes and have held out exactly this run's validation images."""
    info = folder / TEACHER_INFO_NAME
    if not (folder / WEIGHTS_NAME).is_file() or not info.is_file():
        return f"{folder} holds no trained teacher"
    split = json.loads(info.read_text()).get("split") or {}
    if split.get("classes") != list(train_set.classes):
        return "it knows other classes"
    if split.get("held_out_sha256") != held_out_digest(val_set):
        return "it was trained with other validation images held out (another --data, --seed or --val-size)"
    return None


def _teacher_estimate(cfg: TrainConfig, n_images: int) -> str:
    """Roughly how long `--teacher auto` will train, scaled from the shipped teacher's record."""
    info = SHIPPED_TEACHER / TEACHER_INFO_NAME
    if cfg.teacher_kind != "conv" or not info.is_file():  # its record times the conv network only
        return ""
    shipped = json.loads(info.read_text())
    images = shipped.get("split", {}).get("train_images")
    if not images:
        return ""
    minutes = shipped["minutes"] * cfg.teacher_epochs / shipped["epochs"] * n_images / images
    return (f"; roughly {minutes:.0f} min on a machine like the shipped teacher's ({shipped['machine']}), "
            f"much less on a GPU")


def _provide_teacher(cfg: TrainConfig, folder: Path, train_set: ImageTensors, val_set: ImageTensors,
                     device: torch.device) -> None:
    """Say which teacher the run uses and, for 'auto' without one in OUT/teacher, copy the shipped
    teacher there when it fits (`teacher_misfit`), else train one there."""
    if cfg.teacher != "auto":
        print(f"teacher: {folder} (given with --teacher)", flush=True)
        return
    if (folder / WEIGHTS_NAME).exists():
        print(f"teacher: {folder}, from this run's start", flush=True)
        return
    misfit = (teacher_misfit(SHIPPED_TEACHER, train_set, val_set) if cfg.teacher_kind == "conv"
              else f"it is a conv teacher and --teacher-kind asks for {cfg.teacher_kind}")
    if misfit is None:
        shutil.copytree(SHIPPED_TEACHER, folder, dirs_exist_ok=True)
        info = json.loads((folder / TEACHER_INFO_NAME).read_text())
        info["reused_from"] = SHIPPED_TEACHER_NAME
        atomic_write_text(folder / TEACHER_INFO_NAME, json.dumps(info, indent=2))
        print(f"teacher: the shipped one ({SHIPPED_TEACHER_NAME}, copied into {folder}): it knows these classes "
              f"and held out these same validation images, so no teacher is trained", flush=True)
        return
    print(f"teacher: training a CNN teacher into {folder} first ({cfg.teacher_kind}), {cfg.teacher_epochs} epochs on "
          f"{len(train_set)} images{_teacher_estimate(cfg, len(train_set))} (the shipped one does not fit: {misfit}; "
          f"--teacher none trains without)", flush=True)
    _train_teacher_now(cfg, train_set, val_set, folder, device)


def _train_teacher_now(cfg: TrainConfig, train_set: ImageTensors, val_set: ImageTensors, folder: Path,
                       device: torch.device) -> None:
    """--teacher auto: train the --teacher-kind network into `folder` and record its figures beside it
    (its accuracy is the last epoch's, measured with the kind's test-time averaging)."""
    start = time.perf_counter()
    options = {"time_budget_min": cfg.teacher_time_budget_min} if cfg.teacher_time_budget_min else {}
    TRAINERS[cfg.teacher_kind](train_set, val_set, folder, epochs=cfg.teacher_epochs, seed=cfg.seed,
                               widths=tuple(cfg.teacher_widths), device=device, bf16=uses_bf16(device, cfg.amp),
                               log=lambda line: print(line, flush=True), **options)
    history = json.loads((folder / HISTORY_NAME).read_text())
    info = {"kind": cfg.teacher_kind, "widths": cfg.teacher_widths, "epochs": cfg.teacher_epochs,
            "epochs_run": len(history), "minutes": (time.perf_counter() - start) / 60, "val_acc": history[-1]["val_acc"],
            "val_images": len(val_set), "seed": cfg.seed, "machine": machine_description(device),
            "command": cfg.command, "split": split_record(train_set, val_set)}
    atomic_write_text(folder / TEACHER_INFO_NAME, json.dumps(info, indent=2))


def prepare_teacher(cfg: TrainConfig, train_set: ImageTensors, val_set: ImageTensors, out: Path,
                    device: torch.device, rank: int = 0, world: int = 1) -> torch.nn.Module | None:
    """The distillation teacher: none, a trained folder (of the kind its config.json names), or
    ("auto") OUT/teacher: the shipped one copied there when it fits the run, else one of
    --teacher-kind trained now on the same training images (kept there, so a resumed run reuses
    it). Says which before anything starts. Under torchrun rank 0 provides it while the others wait."""
    if cfg.teacher == "none":
        if rank == 0:
            print("teacher: none (no distillation)", flush=True)
        return None
    folder = teacher_folder(cfg, out)
    if rank == 0:
        _provide_teacher(cfg, folder, train_set, val_set, device)
    if world > 1:
        dist.barrier()
    require_teacher_weights(cfg, folder)
    try:
        teacher = load_teacher(folder)
    except (OSError, ValueError) as error:
        raise TrainError(f"--teacher {cfg.teacher}: {error}") from error
    if teacher.class_names != train_set.classes:
        raise TrainError(f"--teacher {folder} knows classes {teacher.class_names}, the data has {train_set.classes}")
    return teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The run: setup, one epoch, validate-and-checkpoint, finish.


@dataclass
class Run:
    """What the epochs of one training process share."""
    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    out: Path
    train_set: ImageTensors
    val_set: ImageTensors
    model: ViTClassifier
    net: torch.nn.Module  # the model, wrapped for data parallelism under torchrun
    optimizer: torch.optim.Optimizer
    teacher: torch.nn.Module | None
    threads: AdaptiveThreads | None
    steps_per_epoch: int
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    elapsed_before: float = 0.0  # training seconds of earlier segments
    first_started: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def elapsed(self) -> float:
        """Training seconds over all segments, rank 0's clock on every rank (so all stop together)."""
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        if self.distributed:
            clock = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
            dist.broadcast(clock, 0)
            elapsed = clock.item()
        return elapsed


def _check_resume_compatible(saved: dict, cfg: TrainConfig) -> None:
    current = dataclasses.asdict(cfg)
    # A setting added after the checkpoint was written counts as its default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = [f"{k}: checkpoint {saved.get(k, defaults[k])!r} vs now {v!r}" for k, v in current.items()
             if k not in RESUMABLE_CHANGES | {SAME_SPLIT} and saved.get(k, defaults[k]) != v]
    if diffs:
        raise TrainError("cannot resume: the checkpoint was made with other settings (" + "; ".join(diffs)
                         + "). Resume with the same settings, or train into a new --out.")


def _held_out(saved: dict, cfg: TrainConfig, full_train: ImageTensors) -> tuple[float, int, int]:
    """--val-size may be given as a share or a count: the earlier run's value and the images it and
    this run hold out (with the same seed and data, equal counts are the same images)."""
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == SAME_SPLIT)
    before = saved.get(SAME_SPLIT, default)
    return before, validation_count(full_train, before), validation_count(full_train, cfg.val_size)


def _check_same_split(saved: dict, cfg: TrainConfig, full_train: ImageTensors) -> None:
    """Resumed, a run must hold out as many images as it did."""
    before, held_before, held_now = _held_out(saved, cfg, full_train)
    if held_before != held_now:
        raise TrainError(f"cannot resume: the checkpoint held out --val-size {before:g} ({held_before} images), "
                         f"now {cfg.val_size:g} ({held_now}). Resume with --val-size {before:g}.")


def _base_info(cfg: TrainConfig) -> dict | None:
    """The train_info.json of the run whose weights --init-from starts from, if it left one."""
    path = Path(cfg.init_from) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _check_init_split(cfg: TrainConfig, full_train: ImageTensors) -> None:
    """A warm start must hold out the images its starting run held out: any other split would
    validate on images those weights were trained on."""
    base = _base_info(cfg)
    if base is None:
        print(f"warning: --init-from {cfg.init_from} has no {INFO_NAME}, so its validation split cannot be "
              f"checked; if its run trained on images this one validates on, validation reads too high",
              file=sys.stderr, flush=True)
        return
    before, held_before, held_now = _held_out(base["config"], cfg, full_train)
    seed = base["config"]["seed"]
    if (seed, held_before) != (cfg.seed, held_now):
        raise TrainError(f"--init-from {cfg.init_from}: its run held out {held_before} images with --seed "
                         f"{seed}, this one would hold out {held_now} with --seed {cfg.seed}, and validate on "
                         f"images the starting weights were trained on. Give --val-size {before:g} --seed {seed}.")


def _describe_base(cfg: TrainConfig) -> dict | None:
    """What the card needs of the training behind a warm start's weights: its compute (and, for a
    base that was itself a warm start, the runs behind it), segments and command."""
    base = _base_info(cfg)
    if base is None:
        return None
    return {"folder": portable_path(cfg.init_from), "summary": base.get("summary", {}), "teacher": base.get("teacher"),
            "segments": len(base.get("segments", [])), "command": base.get("config", {}).get("command"),
            "init": base.get("init")}


def _start_processes(cfg: TrainConfig) -> tuple[torch.device, int, int, AdaptiveThreads | None]:
    """Device, rank and world size (torchrun sets WORLD_SIZE), and CPU thread settings."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        device = pick_device(cfg.device)
    except DeviceError as error:
        raise TrainError(str(error)) from error
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    usable = usable_cpu_count()
    if device.type == "cpu" and torch.get_num_threads() > usable:
        # More threads than allowed cores time-share one core and run slower than one thread.
        print(f"warning: {torch.get_num_threads()} torch threads but this process may use only "
              f"{usable} core(s) (CPU affinity); widen it, e.g. `taskset -c 0-{os.cpu_count() - 1} "
              f"python train.py ...`, or pass --num-threads {usable}", file=sys.stderr, flush=True)
    threads = AdaptiveThreads(torch.get_num_threads()) if cfg.adaptive_threads and device.type == "cpu" else None
    return device, rank, world, threads


def _saved_state(cfg: TrainConfig, out: Path) -> dict | None:
    state_path = out / STATE_NAME
    if state_path.exists() and not cfg.resume:
        raise TrainError(f"{state_path} exists: pass --resume to continue that run, or another --out")
    if not cfg.resume:
        return None
    if not state_path.exists():
        raise TrainError(f"--resume: no {STATE_NAME} in {out} to resume from")
    saved = torch.load(state_path, map_location="cpu", weights_only=True)
    _check_resume_compatible(saved["config"], cfg)
    return saved


def _load_data(cfg: TrainConfig) -> tuple[ImageTensors, ImageTensors, ImageTensors]:
    """Decoded once, held as uint8; validation held out of train with a fixed seed."""
    full_train = load_split(cfg.data, "train", download=cfg.download, limit=cfg.limit_train, seed=cfg.seed)
    try:
        train_set, val_set = split_validation(full_train, cfg.val_size, seed=cfg.seed)
    except ValueError as error:
        raise TrainError(f"--val-size: {error}") from error
    return full_train, train_set, val_set


def setup(cfg: TrainConfig) -> Run:
    """Check the settings, load data and teacher, build model and optimiser, restore a saved run."""
    cfg.validate()
    device, rank, world, threads = _start_processes(cfg)
    out = Path(cfg.out)
    saved = _saved_state(cfg, out)
    if cfg.teacher not in ("auto", "none"):  # before the data is read: a wrong path fails at once
        require_teacher_weights(cfg, Path(cfg.teacher))
    if cfg.init_from and saved is None and not Path(cfg.init_from).is_dir():  # a resume never reads it
        raise TrainError(f"--init-from {cfg.init_from}: no such folder (give the folder of a trained checkpoint)")
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    full_train, train_set, val_set = _load_data(cfg)
    if saved is not None:
        _check_same_split(saved["config"], cfg, full_train)
    elif cfg.init_from:
        _check_init_split(cfg, full_train)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    teacher = prepare_teacher(cfg, train_set, val_set, out, device, rank, world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, train_set.classes)
    if cfg.init_from and saved is None:
        warm_start_(model, cfg)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = Run(cfg, device, rank, world, out, train_set, val_set, model, net, optimizer, teacher, threads,
              steps_per_epoch)
    if saved is not None:
        _restore(run, saved)
    if run.is_main:
        _record_segment(run, resumed=saved is not None)
    return run


def _restore(run: Run, saved: dict) -> None:
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    run.start_epoch = saved["epoch"] + 1
    run.best_acc, run.best_epoch = saved["best_acc"], saved["best_epoch"]
    run.elapsed_before = saved["elapsed"]
    run.first_started = saved.get("first_started", run.first_started)
    run.history = json.loads(saved["history"])


def _recorded_settings(cfg: TrainConfig) -> dict:
    """The settings as train_info.json keeps them: its folders as `portable_path` writes them."""
    settings = dataclasses.asdict(cfg)
    for name in ("data", "out", "init_from", "teacher"):
        if settings[name] and settings[name] not in ("auto", "none"):
            settings[name] = portable_path(settings[name])
    return settings


def _record_segment(run: Run, resumed: bool) -> None:
    """Each start or resume is a segment, so the card can tell the whole story of the run."""
    cfg, out = run.cfg, run.out
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / INFO_NAME).read_text()) if resumed and (out / INFO_NAME).exists() else {}
    segments = previous.get("segments", [])
    segments.append({"command": cfg.command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "from_epoch": run.start_epoch, "epochs": cfg.epochs, "time_budget_min": cfg.time_budget_min})
    info = {"config": _recorded_settings(cfg), "model_config": run.model._hub_mixin_config, "segments": segments,
            "n_params": run.model.n_params, "train_images": len(run.train_set), "val_images": len(run.val_set),
            "world_size": run.world, "machine": machine_description(run.device), "device": str(run.device)}
    # A teacher given as a folder (one trained by an earlier run) counts in this run's compute too.
    teacher_info = teacher_folder(cfg, out) / TEACHER_INFO_NAME
    if cfg.teacher != "none" and teacher_info.exists():
        info["teacher"] = json.loads(teacher_info.read_text())
    # A warm start's compute and curves include the training behind its starting weights, read once
    # when it starts (a resume may run from elsewhere, where that folder's path means nothing).
    if cfg.init_from and not resumed:
        from .card import INIT_HISTORY, lineage

        atomic_write_text(out / INIT_HISTORY, json.dumps(lineage(cfg.init_from), indent=2))
    base = previous.get("init") if resumed else _describe_base(cfg) if cfg.init_from else None
    if base is not None:
        info["init"] = base
    atomic_write_text(out / INFO_NAME, json.dumps(info, indent=2))
    print(f"{run.model.n_params / 1e6:.2f} M parameters; {len(run.train_set)} train / {len(run.val_set)} val "
          f"images; {run.steps_per_epoch} steps per epoch on {run.device} x{run.world}", flush=True)


def run_epoch(run: Run, epoch: int) -> tuple[dict, bool]:
    """Train one epoch. Returns its statistics and whether the time budget ran out during it."""
    cfg, device = run.cfg, run.device
    epoch_start = time.perf_counter()
    # One generator per epoch, seeded by (seed, epoch): every rank draws the same shuffle and a
    # resumed run replays exactly the batches and augmentations an uninterrupted run would.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(run.train_set), generator=generator)
    local_batch = cfg.batch_size // run.world
    run.net.train()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.is_main,
               mininterval=5.0 if not sys.stderr.isatty() else 0.1, leave=False)
    out_of_time = False
    for step in bar:
        step_start = time.perf_counter()
        if run.threads is not None:
            run.threads.begin(step)
        elapsed = run.elapsed() if cfg.time_budget_min is not None else 0.0
        if cfg.time_budget_min is not None and elapsed >= cfg.time_budget_min * 60:
            out_of_time = True  # time is spent: validate and save what this partial epoch gave
            break
        global_step = epoch * run.steps_per_epoch + step
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(cfg, global_step, run.steps_per_epoch, elapsed)
        # Patch dropout buys more steps per hour; the schedule's end on whole images lets the
        # model settle to the full sequence it is evaluated and explained on.
        progress = (elapsed / (cfg.time_budget_min * 60) if cfg.time_budget_min is not None
                    else global_step / (cfg.epochs * run.steps_per_epoch))
        drop = cfg.patch_drop if progress < cfg.patch_drop_end else 0.0
        batch_idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        batch_idx = batch_idx[run.rank * local_batch:(run.rank + 1) * local_batch]
        images, labels, targets = make_batch(run.train_set, batch_idx, cfg.augment, run.model.mean, run.model.std,
                                             device, torch.Generator().manual_seed(aug_seed + run.rank),
                                             cfg.random_erase, cfg.cutmix, cfg.mixup)
        # With CutMix or mixup the training accuracy counts each image's own label.
        logits, loss = train_step(run.net, run.optimizer, images, targets, cfg, device, drop, run.teacher)
        if run.threads is not None:
            run.threads.end(step, time.perf_counter() - step_start)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(-1) == labels).sum()
        seen += len(labels)
        if run.is_main and (step % 20 == 0 or step == run.steps_per_epoch - 1):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen * run.world / (time.perf_counter() - epoch_start):.0f}")
    stats = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "lr": run.optimizer.param_groups[0]["lr"],
             "started": epoch_start, "train_seconds": time.perf_counter() - epoch_start}
    if run.distributed:
        totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
        dist.all_reduce(totals)
        stats.update(loss_sum=totals[0], correct=totals[1], seen=int(totals[2].item()))
    return stats, out_of_time


def validate_and_checkpoint(run: Run, epoch: int, stats: dict) -> tuple[dict, bool]:
    """Rank 0: validate, export the best weights, save the resumable state. Returns the epoch's
    record and whether early stopping says to stop."""
    cfg = run.cfg
    probs = predict_probs(run.model, run.val_set.images, run.device, amp=cfg.amp)
    val_loss = F.nll_loss(probs.clamp_min(1e-12).log(), run.val_set.labels).item()
    val_acc = (probs.argmax(-1) == run.val_set.labels).float().mean().item()
    seen = stats["seen"]
    record = {"epoch": epoch + 1, "train_loss": stats["loss_sum"].item() / seen,
              "train_acc": stats["correct"].item() / seen, "val_loss": val_loss, "val_acc": val_acc,
              "lr": stats["lr"], "seconds": time.perf_counter() - stats["started"],
              "train_images_per_s": seen / stats["train_seconds"]}
    run.history.append(record)
    improved = val_acc > run.best_acc
    if improved:
        run.best_acc, run.best_epoch = val_acc, epoch + 1
        run.model.save_pretrained(run.out)
    elapsed = run.elapsed_before + time.perf_counter() - run.started
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "first_started": run.first_started,
                 "epoch": epoch, "best_acc": run.best_acc, "best_epoch": run.best_epoch,
                 "elapsed": elapsed, "history": json.dumps(run.history),
                 "config": dataclasses.asdict(cfg)}, run.out / STATE_NAME)
    atomic_write_text(run.out / HISTORY_NAME, json.dumps(run.history, indent=2))
    print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc "
          f"{record['train_acc']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
          f"{' (best)' if improved else ''} | lr {record['lr']:.2e} | {record['seconds']:.0f}s, "
          f"{record['train_images_per_s']:.0f} img/s | total {elapsed / 60:.1f} min", flush=True)
    stop = cfg.patience is not None and epoch + 1 - run.best_epoch >= cfg.patience
    if stop:
        print(f"early stop: no validation gain in {cfg.patience} epochs", flush=True)
    return record, stop


def _agree(run: Run, stop: bool) -> bool:
    """Rank 0 decides; every rank follows."""
    if not run.distributed:
        return stop
    flag = torch.tensor(float(stop), device=run.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def finish(run: Run) -> dict:
    """Rank 0: training figure, summary, model card, optional upload."""
    summary = {}
    if run.is_main:
        from .card import lineage, write_model_card
        from .viz import plot_training_history

        out = run.out
        full = lineage(out)
        plot_training_history(full, warm_start=len(full) - len(run.history)).save(out / "training.png")
        summary = {"best_epoch": run.best_epoch, "best_val_acc": run.best_acc, "epochs_run": len(run.history),
                   "wall_seconds": run.elapsed_before + time.perf_counter() - run.started,
                   "seconds_since_first_start": time.time() - run.first_started}
        info = json.loads((out / INFO_NAME).read_text())
        info["summary"] = summary
        atomic_write_text(out / INFO_NAME, json.dumps(info, indent=2))
        write_model_card(out)
        print(f"best validation accuracy {run.best_acc:.4f} at epoch {run.best_epoch}; weights in {out}", flush=True)
        if run.cfg.push_to_hub:
            push_to_hub(out, run.cfg.push_to_hub)
    if run.distributed:
        dist.barrier()
    return summary


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train, checkpoint every epoch, export the best validation weights into `cfg.out`.

    Returns a summary (best epoch, validation accuracy, wall time). `on_epoch_end(epoch, record)`
    is called after each epoch's checkpoint is safely on disk.
    """
    if cfg.teacher_only:
        return train_teacher_only(cfg)
    run = setup(cfg)
    for epoch in range(run.start_epoch, cfg.epochs):
        stats, out_of_time = run_epoch(run, epoch)
        if stats["seen"] == 0:
            break
        record, stop = validate_and_checkpoint(run, epoch, stats) if run.is_main else (None, False)
        stop = _agree(run, stop or out_of_time)
        if on_epoch_end is not None and record is not None:
            on_epoch_end(epoch, record)
        if stop:
            break
    return finish(run)


def train_teacher_only(cfg: TrainConfig) -> dict:
    """--teacher-only: train the teacher into OUT/teacher on the split the ViT would use, then stop
    (a later run takes it with --teacher OUT/teacher, or resumes into OUT with --teacher auto).
    Returns its teacher_info.json."""
    cfg.validate()
    device, _, world, _ = _start_processes(cfg)
    if world > 1:
        raise TrainError("--teacher-only trains in one process: run it without torchrun")
    _, train_set, val_set = _load_data(cfg)
    prepare_teacher(cfg, train_set, val_set, Path(cfg.out), device)
    info_file = teacher_folder(cfg, Path(cfg.out)) / TEACHER_INFO_NAME
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    print(f"teacher in {info_file.parent}: validation accuracy {info.get('val_acc', float('nan')):.4f}", flush=True)
    return info


def push_to_hub(out: Path, repo_id: str) -> None:
    """Upload the exported folder (weights, config, card, figures). Offline: a clear error; the
    local files are already saved and stay as they are."""
    from huggingface_hub import HfApi

    try:
        HfApi().create_repo(repo_id, exist_ok=True)
        HfApi().upload_folder(repo_id=repo_id, folder_path=str(out),
                              ignore_patterns=[STATE_NAME, "*.tmp"])
    except Exception as error:  # network, auth, permissions: all end the same way for the user
        raise TrainError(f"could not push to the Hub repo {repo_id!r} ({type(error).__name__}: {error}). "
                         f"Nothing is lost: the trained model is saved in {out}; push it later with "
                         f"`huggingface-cli upload {repo_id} {out}`.") from error
