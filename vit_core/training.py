"""The training loop behind `train.py`: in-memory data, batch augmentation (+ random erasing, CutMix),
optional mimetic / sine-cosine initialisation for small-data training, AdamW, warmup + cosine
or the report's MultiStepLR, label smoothing, gradient clipping, optional bf16 autocast, exact
resume from an atomic per-epoch checkpoint, early stopping on a held-out validation split, and
data-parallel training under `torchrun`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import AUGMENTATIONS, ImageTensors, augment, cutmix, load_split, random_erase, split_validation
from .devices import DeviceError, autocast, pick_device, uses_bf16
from .evaluate import predict_probs
from .model import PRESETS, ViTClassifier, mimetic_attention_init_, normalize, sincos_position_init_
from .teacher import ConvTeacher, teacher_accuracy, teacher_logits, train_teacher

STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"
INFO_NAME = "train_info.json"
SCHEDULES = ("cosine", "multistep")
DISTILL_MODES = ("hard", "soft")
ATTN_INITS = ("default", "mimetic")
POS_INITS = ("random", "sincos")

# Settings that may change when a run is resumed; every other one must match the checkpoint.
RESUMABLE_CHANGES = {"resume", "device", "num_threads", "push_to_hub", "patience", "data", "download",
                     "command", "epochs", "time_budget_min", "adaptive_threads"}


class TrainError(RuntimeError):
    """A setting or a file that prevents training; the message says what to do."""


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "cpu"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 2.0
    milestones: list[int] = field(default_factory=list)  # multistep; default: 50 % and 75 % of epochs
    gamma: float = 0.1
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    augment: str = "crop"
    random_erase: float = 0.0  # probability of erasing one random rectangle per training image
    cutmix: float = 0.0  # probability of pasting a box from another image (labels mixed by area)
    attn_init: str = "default"  # or "mimetic": attention weights start near trained ones (model.py)
    pos_init: str = "random"  # or "sincos": position embedding starts as a 2D sine-cosine code
    patch_drop: float = 0.0  # share of patch tokens left out of each training image (faster steps)
    patch_drop_end: float = 0.85  # ... until this fraction of the schedule; then whole images
    teacher: str = "none"  # "auto": train a CNN teacher into OUT/teacher first; or a teacher folder
    teacher_epochs: int = 10  # for "auto"
    distill: str = "hard"  # hard: the teacher's top class (DeiT); soft: its probabilities
    distill_weight: float = 0.5  # share of the loss that follows the teacher
    amp: str = "auto"  # auto: bf16 on CUDA and on CPUs with bf16 units (see uses_bf16)
    device: str = "auto"
    seed: int = 0
    val_size: int = 5000
    limit_train: int | None = None
    patience: int | None = None
    time_budget_min: float | None = None  # cosine schedule on wall-clock time; stop when it is spent
    dropout: float | None = None  # overrides the preset's
    resume: bool = False
    download: bool = False
    push_to_hub: str | None = None
    num_threads: int | None = None
    adaptive_threads: bool = False  # CPU: re-pick 1 or all threads as other load comes and goes
    command: str = ""

    def validate(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"--preset must be one of {sorted(PRESETS)}")
        if self.epochs < 1:
            problems.append("--epochs must be at least 1")
        if self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if not self.lr > 0:
            problems.append("--lr must be positive")
        if self.weight_decay < 0:
            problems.append("--weight-decay must not be negative")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {SCHEDULES}")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append("--warmup-epochs must be in [0, epochs)")
        if not 0 <= self.label_smoothing < 1:
            problems.append("--label-smoothing must be in [0, 1)")
        if self.clip_grad < 0:
            problems.append("--clip-grad must not be negative (0 turns clipping off)")
        if self.augment not in AUGMENTATIONS:
            problems.append(f"--augment must be one of {AUGMENTATIONS}")
        if not 0.0 <= self.random_erase <= 1.0:
            problems.append("--random-erase must be a probability in [0, 1]")
        if not 0.0 <= self.cutmix <= 1.0:
            problems.append("--cutmix must be a probability in [0, 1]")
        if self.attn_init not in ATTN_INITS:
            problems.append(f"--attn-init must be one of {ATTN_INITS}")
        if self.pos_init not in POS_INITS:
            problems.append(f"--pos-init must be one of {POS_INITS}")
        if not 0.0 <= self.patch_drop < 1.0:
            problems.append("--patch-drop must be in [0, 1)")
        if not 0.0 <= self.patch_drop_end <= 1.0:
            problems.append("--patch-drop-end must be a fraction of the schedule in [0, 1]")
        if self.distill not in DISTILL_MODES:
            problems.append(f"--distill must be one of {DISTILL_MODES}")
        if not 0.0 <= self.distill_weight <= 1.0:
            problems.append("--distill-weight must be in [0, 1]")
        if self.teacher_epochs < 1:
            problems.append("--teacher-epochs must be at least 1")
        if self.amp not in ("auto", "bf16", "off"):
            problems.append("--amp must be auto, bf16 or off")
        if self.val_size < 1:
            problems.append("--val-size must be at least 1")
        if self.limit_train is not None and self.limit_train <= self.val_size:
            problems.append("--limit-train must be larger than --val-size")
        if self.patience is not None and self.patience < 1:
            problems.append("--patience must be at least 1")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append("--dropout must be in [0, 1)")
        if self.time_budget_min is not None and (self.time_budget_min <= 0 or self.schedule != "cosine"):
            problems.append("--time-budget must be positive and needs --schedule cosine")
        if any(m < 1 or m >= self.epochs for m in self.milestones):
            problems.append("--milestones must lie in [1, epochs)")
        if problems:
            raise TrainError("bad settings: " + "; ".join(problems))


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


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def time_lr_factor(step: int, warmup_steps: int, elapsed: float, budget: float) -> float:
    """Warmup over steps, then cosine to 0 over the wall-clock budget (seconds)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns the scheduler and whether it steps per batch (cosine) or per epoch (multistep).
    With a time budget there is no scheduler object: the loop sets the rate from the clock."""
    if cfg.time_budget_min is not None:
        return None, True
    if cfg.schedule == "cosine":
        total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup)), True
    milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma), False


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
               generator: torch.Generator, erase: float = 0.0, mix: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index the uint8 images, normalise and augment the whole batch with tensor ops.

    Returns images, labels and the loss targets: the labels themselves, or with CutMix (`mix` > 0)
    class probabilities that split each image between its label and its neighbour's by area.
    """
    images = normalize(data.images[indices].to(device, non_blocking=True), mean, std)
    labels = data.labels[indices].to(device, non_blocking=True)
    images = random_erase(augment(images, policy, generator), erase, generator)
    if mix == 0.0:
        return images, labels, labels
    images, own_share = cutmix(images, mix, generator)
    n_classes = len(data.classes)
    own = F.one_hot(labels, n_classes).float() * own_share[:, None]
    pasted = F.one_hot(labels.roll(1, 0), n_classes).float() * (1 - own_share[:, None])
    return images, labels, own + pasted


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str,
                      label_smoothing: float) -> torch.Tensor:
    """Hard: cross-entropy with the teacher's top class (DeiT's hard distillation, which beat soft
    targets there). Soft: KL divergence to the teacher's probabilities at temperature 1."""
    if mode == "hard":
        return F.cross_entropy(logits, teacher_logits.argmax(-1), label_smoothing=label_smoothing)
    return F.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean")


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
        taught = distillation_loss(logits.float(), teacher_logits(teacher, images, uses_bf16(device, cfg.amp)), cfg.distill,
                                   cfg.label_smoothing)
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


def prepare_teacher(cfg: TrainConfig, train_set: ImageTensors, val_set: ImageTensors, out: Path,
                    device: torch.device, is_main: bool) -> ConvTeacher | None:
    """The distillation teacher: none, a trained folder, or ("auto") one trained now into
    OUT/teacher on the same training images (kept there, so a resumed run reuses it)."""
    if cfg.teacher == "none":
        return None
    folder = out / "teacher" if cfg.teacher == "auto" else Path(cfg.teacher)
    if cfg.teacher == "auto" and not (folder / "model.safetensors").exists():
        if not is_main:
            raise TrainError("train the teacher once first (--teacher auto in one process), then pass its folder")
        print(f"training the CNN teacher into {folder} ({cfg.teacher_epochs} epochs)", flush=True)
        start = time.perf_counter()
        teacher = train_teacher(train_set, val_set, folder, epochs=cfg.teacher_epochs, seed=cfg.seed,
                                device=device)
        info = {"epochs": cfg.teacher_epochs, "minutes": (time.perf_counter() - start) / 60,
                "val_acc": teacher_accuracy(teacher, val_set, device), "machine": machine_description(device)}
        atomic_write_text(folder / "teacher_info.json", json.dumps(info, indent=2))
    try:
        teacher = ConvTeacher.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise TrainError(f"--teacher {cfg.teacher}: {error}") from error
    if teacher.class_names != train_set.classes:
        raise TrainError(f"--teacher {folder} knows classes {teacher.class_names}, the data has {train_set.classes}")
    return teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The run


def _check_resume_compatible(saved: dict, cfg: TrainConfig) -> None:
    current = dataclasses.asdict(cfg)
    # A setting added after the checkpoint was written counts as its default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = [f"{k}: checkpoint {saved.get(k, defaults[k])!r} vs now {v!r}" for k, v in current.items()
             if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
    if diffs:
        raise TrainError("cannot resume: the checkpoint was made with other settings (" + "; ".join(diffs)
                         + "). Resume with the same settings, or train into a new --out.")


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train, checkpoint every epoch, export the best validation weights into `cfg.out`.

    Returns a summary (best epoch, validation accuracy, wall time). `on_epoch_end(epoch, record)`
    is called after each epoch's checkpoint is safely on disk.
    """
    cfg.validate()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        device = pick_device(cfg.device)
    except DeviceError as error:
        raise TrainError(str(error)) from error
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    is_main = rank == 0
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

    out = Path(cfg.out)
    state_path = out / STATE_NAME
    saved_state = None
    if state_path.exists() and not cfg.resume:
        raise TrainError(f"{state_path} exists: pass --resume to continue that run, or another --out")
    if cfg.resume:
        if not state_path.exists():
            raise TrainError(f"--resume: no {STATE_NAME} in {out} to resume from")
        saved_state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume_compatible(saved_state["config"], cfg)
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")

    # Data: decoded once, held as uint8; validation held out of train with a fixed seed.
    full_train = load_split(cfg.data, "train", download=cfg.download, limit=cfg.limit_train, seed=cfg.seed)
    train_set, val_set = split_validation(full_train, cfg.val_size, seed=cfg.seed)
    del full_train

    teacher = prepare_teacher(cfg, train_set, val_set, out, device, is_main)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, train_set.classes).to(device)
    optimizer = build_optimizer(model, cfg)
    local_batch = cfg.batch_size // world
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    scheduler, per_step = build_scheduler(cfg, optimizer, steps_per_epoch)

    history: list[dict] = []
    start_epoch, best_acc, best_epoch, elapsed_before = 0, -1.0, -1, 0.0
    first_started = time.time()
    if saved_state is not None:
        model.load_state_dict(saved_state["model"])
        optimizer.load_state_dict(saved_state["optimizer"])
        if scheduler is not None and saved_state["scheduler"] is not None and \
                saved_state["config"].get("time_budget_min") is None:
            scheduler.load_state_dict(saved_state["scheduler"])
        torch.set_rng_state(saved_state["torch_rng"])
        start_epoch = saved_state["epoch"] + 1
        best_acc, best_epoch = saved_state["best_acc"], saved_state["best_epoch"]
        elapsed_before = saved_state["elapsed"]
        first_started = saved_state.get("first_started", first_started)
        history = json.loads(saved_state["history"])
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Each start or resume is a segment, so the card can tell the whole story of the run.
        segments = []
        if saved_state is not None and (out / INFO_NAME).exists():
            segments = json.loads((out / INFO_NAME).read_text()).get("segments", [])
        segments.append({"command": cfg.command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                         "from_epoch": start_epoch, "epochs": cfg.epochs, "time_budget_min": cfg.time_budget_min})
        info = {"config": dataclasses.asdict(cfg), "model_config": model._hub_mixin_config, "segments": segments,
                "n_params": model.n_params, "train_images": len(train_set), "val_images": len(val_set),
                "world_size": world, "machine": machine_description(device), "device": str(device)}
        atomic_write_text(out / INFO_NAME, json.dumps(info, indent=2))
        print(f"{model.n_params / 1e6:.2f} M parameters; {len(train_set)} train / {len(val_set)} val "
              f"images; {steps_per_epoch} steps per epoch on {device} x{world}", flush=True)

    mean, std = model.mean, model.std
    run_start = time.perf_counter()
    stop = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        # One generator per epoch, seeded by (seed, epoch): every rank draws the same shuffle and a
        # resumed run replays exactly the batches and augmentations an uninterrupted run would.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_set), generator=generator)
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main,
                   mininterval=5.0 if not sys.stderr.isatty() else 0.1, leave=False)
        budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None
        warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
        for step in bar:
            step_start = time.perf_counter()
            if threads is not None:
                threads.begin(step)
            if budget_s is not None:
                elapsed = elapsed_before + time.perf_counter() - run_start
                if distributed:  # every rank follows rank 0's clock, so all stop at the same step
                    clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
                    dist.broadcast(clock, 0)
                    elapsed = clock.item()
                if elapsed >= budget_s:
                    stop = True  # time is spent: validate and save what this partial epoch gave
                    break
                factor = time_lr_factor(epoch * steps_per_epoch + step, warmup_steps, elapsed, budget_s)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                progress = elapsed / budget_s
            else:
                progress = (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch)
            # Patch dropout buys more steps per hour; the schedule's end on whole images lets the
            # model settle to the full sequence it is evaluated and explained on.
            drop = cfg.patch_drop if progress < cfg.patch_drop_end else 0.0
            batch_idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            batch_idx = batch_idx[rank * local_batch:(rank + 1) * local_batch]
            images, labels, targets = make_batch(train_set, batch_idx, cfg.augment, mean, std, device,
                                                 torch.Generator().manual_seed(aug_seed + rank),
                                                 cfg.random_erase, cfg.cutmix)
            # With CutMix the training accuracy counts each image's own label.
            logits, loss = train_step(net, optimizer, images, targets, cfg, device, drop, teacher)
            if per_step and scheduler is not None:
                scheduler.step()
            if threads is not None:
                threads.end(step, time.perf_counter() - step_start)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(-1) == labels).sum()
            seen += len(labels)
            if is_main and (step % 20 == 0 or step == steps_per_epoch - 1):
                rate = seen * world / (time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{rate:.0f}")
        lr_used = optimizer.param_groups[0]["lr"]
        if not per_step:
            scheduler.step()
        if seen == 0:
            break
        if distributed:
            totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        train_seconds = time.perf_counter() - epoch_start

        record = None
        if is_main:
            probs = predict_probs(model, val_set.images, device, amp=cfg.amp)
            val_loss = F.nll_loss(probs.clamp_min(1e-12).log(), val_set.labels).item()
            val_acc = (probs.argmax(-1) == val_set.labels).float().mean().item()
            record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen,
                      "train_acc": correct.item() / seen, "val_loss": val_loss, "val_acc": val_acc,
                      "lr": lr_used, "seconds": time.perf_counter() - epoch_start,
                      "train_images_per_s": seen / train_seconds}
            history.append(record)
            improved = val_acc > best_acc
            if improved:
                best_acc, best_epoch = val_acc, epoch + 1
                model.save_pretrained(out)
            elapsed = elapsed_before + time.perf_counter() - run_start
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "torch_rng": torch.get_rng_state(), "first_started": first_started,
                         "epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
                         "elapsed": elapsed, "history": json.dumps(history),
                         "config": dataclasses.asdict(cfg)}, state_path)
            atomic_write_text(out / HISTORY_NAME, json.dumps(history, indent=2))
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc "
                  f"{record['train_acc']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
                  f"{' (best)' if improved else ''} | lr {lr_used:.2e} | {record['seconds']:.0f}s, "
                  f"{record['train_images_per_s']:.0f} img/s | total {elapsed / 60:.1f} min", flush=True)
            if cfg.patience is not None and epoch + 1 - best_epoch >= cfg.patience:
                stop = True
                print(f"early stop: no validation gain in {cfg.patience} epochs", flush=True)
        if distributed:
            flag = torch.tensor(float(stop), device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if on_epoch_end is not None and record is not None:
            on_epoch_end(epoch, record)
        if stop:
            break

    summary = {}
    if is_main:
        from .viz import plot_training_history

        elapsed = elapsed_before + time.perf_counter() - run_start
        plot_training_history(history).save(out / "training.png")
        summary = {"best_epoch": best_epoch, "best_val_acc": best_acc, "epochs_run": len(history),
                   "wall_seconds": elapsed, "seconds_since_first_start": time.time() - first_started}
        info = json.loads((out / INFO_NAME).read_text())
        info["summary"] = summary
        atomic_write_text(out / INFO_NAME, json.dumps(info, indent=2))
        from .card import write_model_card

        write_model_card(out)
        print(f"best validation accuracy {best_acc:.4f} at epoch {best_epoch}; weights in {out}", flush=True)
        if cfg.push_to_hub:
            push_to_hub(out, cfg.push_to_hub)
    if distributed:
        dist.barrier()
    return summary


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
