"""Every training setting, named once: a `TrainConfig` field carries its default and its help text,
and `train.py`'s command line is built from those fields.

The defaults (recipe `default`) train the wide ViT from scratch with distillation, as the run behind
the shipped weights began (`wide-v7`, then the warm restarts `wide-v10` to `wide-v14`, the last of
which made them; the model card has the measured result). `RECIPES` holds the named recipes, applied
under whatever flags a command gives.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .data import AUGMENTATIONS
from .model import PRESETS

SCHEDULES = ("cosine", "multistep")
ATTN_INITS = ("default", "mimetic")
POS_INITS = ("random", "sincos")
DISTILL_MODES = ("hard", "soft")
TEACHER_KINDS = ("conv", "whitened")  # vit_core.teacher.TEACHERS
AMP_MODES = ("auto", "bf16", "off")
TTA_LEVELS = (0, 1, 2)  # vit_core.teacher.tta_logits

# Settings that may change when a run is resumed; every other one must match the checkpoint.
RESUMABLE_CHANGES = {"resume", "device", "num_threads", "push_to_hub", "patience", "data", "download",
                     "command", "epochs", "time_budget_min", "adaptive_threads", "recipe", "out"}
# Compared once the data is read: a share and a count that hold out the same images are the same.
SAME_SPLIT = "val_size"


@dataclass(frozen=True)
class Recipe:
    """A named set of settings that differ from the defaults, applied under whatever flags a
    command gives; a warm restart starts from trained weights, so it needs --init-from."""
    summary: str
    settings: dict
    warm_restart: bool = False


# What every warm restart so far kept: a cosine on the clock (the epoch count only a cap), bf16, one
# warmup epoch, patch dropout for the first 60 %; from wide-v11 on, the teacher's probabilities alone.
_RESTART = dict(epochs=200, amp="bf16", warmup_epochs=1.0, patch_drop_end=0.6)
_SOFT_RESTART = dict(_RESTART, distill="soft", distill_weight=1.0)

RECIPES: dict[str, Recipe] = {
    # The defaults themselves: the distillation recipe the shipped weights' training began with.
    "default": Recipe("these defaults: the wide ViT from scratch, distilled from a CNN teacher", {}),
    # The shipped checkpoint: a warm restart of wide-v13's weights (give them with --init-from and the
    # teacher with --teacher checkpoints/whitened-teacher), matching the teacher's probabilities on
    # mixed images (each batch mixup or CutMix, the teacher's logits averaged with the mirror
    # images'): a 130-minute cosine, patch dropout for its first 60 %.
    "wide-v14": Recipe("the shipped weights' last run: a 130-min warm restart from wide-v13's weights on "
                       "the whitened teacher's mirror-averaged soft targets, every batch mixup or CutMix "
                       "(needs --init-from)",
                       dict(_SOFT_RESTART, time_budget_min=130.0, lr=2e-4, cutmix=1.0, mixup=1.0, teacher_tta=1),
                       warm_restart=True),
    # The run wide-v14 restarted from (87.16 % test): wide-v12's weights and the same teacher and
    # targets, CutMix on every image, a 135-minute cosine.
    "wide-v13": Recipe("the CutMix-on-every-image warm restart from wide-v12's weights that wide-v14 started "
                       "from (needs --init-from)",
                       dict(_SOFT_RESTART, time_budget_min=135.0, lr=2e-4, cutmix=1.0), warm_restart=True),
    # The run wide-v13 restarted from (85.81 % test): wide-v11's weights and the same teacher and
    # targets, a 150-minute cosine.
    "wide-v12": Recipe("the soft-target warm restart from wide-v11's weights that wide-v13 started from "
                       "(needs --init-from)",
                       dict(_SOFT_RESTART, time_budget_min=150.0, lr=2e-4), warm_restart=True),
    # The run wide-v12 restarted from (85.65 % test): wide-v10's weights and the same teacher and
    # targets, a 115-minute cosine from a higher peak.
    "wide-v11": Recipe("the soft-target warm restart from wide-v10's weights that wide-v12 started from "
                       "(needs --init-from)",
                       dict(_SOFT_RESTART, time_budget_min=115.0, lr=3e-4), warm_restart=True),
    # The run wide-v11 restarted from (85.15 % test, shipped before wide-v13): a warm restart of
    # wide-v7's weights with the CNN teacher's top class (--teacher checkpoints/cnn-teacher): a
    # 115-minute cosine from a fifth of the peak learning rate, patch dropout for its first 60 %.
    "wide-v10": Recipe("the hard-target warm restart from wide-v7's weights that wide-v11 started from "
                       "(needs --init-from)",
                       dict(_RESTART, time_budget_min=115.0, lr=2e-4), warm_restart=True),
    # The from-scratch run wide-v10 started from (84.34 % test): these defaults with bf16 spelled
    # out, as its last segment ran them: one cosine on a 540-minute wall-clock budget (the epoch
    # count only a cap), re-planned once from 600 minutes while it ran; its card lists every segment.
    "wide-v7": Recipe("the defaults on a 540-min budget: the from-scratch run wide-v10 started from",
                      dict(epochs=400, time_budget_min=540.0, amp="bf16")),
    # The checkpoint shipped before wide-v7 (83.24 % test): the 128-wide network with these
    # settings, the cosine on a 530-minute wall-clock budget, as its last segment ran it (it got there
    # in seven segments and three cosine cycles; its card, kept in git history, lists them).
    "cpu-v6": Recipe("the 128-wide checkpoint before wide-v7", dict(preset="cpu", epochs=400, time_budget_min=530.0,
                                                                      amp="bf16")),
    # The checkpoint shipped before distillation (79.71 % test): the 128-wide network, no
    # teacher, fp32, the cosine on a 146-minute wall-clock budget.
    "cpu-v5": Recipe("the 128-wide checkpoint without a teacher",
                     dict(preset="cpu", epochs=200, time_budget_min=146.0, teacher="none", amp="off")),
    # The 2022 report's training as far as its text and code give it: its 256-wide network, batch 64,
    # RandomResizedCrop + flip, plain cross-entropy, MultiStepLR over 160 epochs, no teacher.
    "report": Recipe("the 2022 report's settings", dict(
        preset="seed", epochs=160, batch_size=64, schedule="multistep", augment="rrc", label_smoothing=0.0,
        cutmix=0.0, patch_drop=0.0, attn_init="default", pos_init="random", teacher="none", amp="off")),
}
RECIPE_HELP = "named recipe whose settings the other flags override: " + "; ".join(
    f"{name}: {recipe.summary}" for name, recipe in RECIPES.items())


class TrainError(RuntimeError):
    """A setting or a file that prevents training; the message says what to do."""


def setting(default, help: str, **cli):
    """A config field with its help text; `cli` holds extra argparse keywords (choices, metavar,
    flag for a flag name other than the field's, required)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    data: str = setting("", "ImageFolder root with train/ and test/, or a torchvision CIFAR-10 root", required=True)
    out: str = setting("", "folder for the exported model, its card, history and train_state.pt", required=True)
    recipe: str = setting("default", RECIPE_HELP, choices=tuple(RECIPES))
    preset: str = setting("wide", "model size ('seed': the 2022 report's network; 'wide': the shipped one, 192 "
                                   "wide with 6 heads; 'cpu': 128 wide with 4 heads, the checkpoints before it)",
                          choices=sorted(PRESETS))
    epochs: int = setting(160, "epochs (an upper bound under --time-budget)")
    batch_size: int = setting(128, "global batch size")
    lr: float = setting(1e-3, "peak AdamW learning rate")
    weight_decay: float = setting(0.05, "AdamW weight decay (weight matrices only)")
    schedule: str = setting("cosine", "warmup + cosine to zero, or the report's MultiStepLR", choices=SCHEDULES)
    warmup_epochs: float = setting(2.0, "cosine warmup; a short run warms up over at most a fifth of it")
    milestones: list[int] = setting([], "MultiStepLR epochs (default: 50 %% and 75 %% of --epochs)", nargs="*")
    gamma: float = setting(0.1, "MultiStepLR factor")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    clip_grad: float = setting(1.0, "max gradient norm, 0 = off")
    augment: str = setting("crop", "crop = pad-and-crop, rrc = the report's RandomResizedCrop; both with flips",
                           choices=AUGMENTATIONS)
    random_erase: float = setting(0.0, "erase one random rectangle of a training image with probability P",
                                  metavar="P")
    cutmix: float = setting(0.5, "paste a random box from another training image with probability P; the "
                            "loss splits the two labels by area (CutMix)", metavar="P")
    mixup: float = setting(0.0, "blend every training image with another, keeping a share drawn from "
                           "Beta(A, A); the loss splits the two labels by that share (mixup); with --cutmix "
                           "too, each batch takes one of the two at even odds; 0 = off", metavar="A")
    attn_init: str = setting("mimetic", "mimetic = attention starts with W_q W_k^T near +I and W_v W_o near -I, "
                             "as trained ViTs have (Trockman & Kolter 2023)", choices=ATTN_INITS)
    pos_init: str = setting("sincos", "sincos = the position embedding starts as a 2D sine-cosine code",
                            choices=POS_INITS)
    patch_drop: float = setting(0.5, "leave a random share P of each training image's patch tokens out "
                                "(PatchDropout): faster steps, more epochs per hour", metavar="P")
    patch_drop_end: float = setting(0.85, "train on whole images after this fraction of the schedule", metavar="F")
    teacher: str = setting("auto", "knowledge distillation: 'none', 'auto' (OUT/teacher: the shipped "
                           "checkpoints/cnn-teacher copied there when --teacher-kind is conv, it knows the data's classes "
                           "and it held out the same validation images, else a CNN teacher of --teacher-kind trained "
                           "there first; reused on --resume) "
                           "or a teacher folder")
    teacher_kind: str = setting("conv", "the network --teacher auto trains: conv = the 3x3-stem CNN of "
                                "checkpoints/cnn-teacher; whitened = airbench94's (whitened 2x2 first conv, "
                                "lookahead, test-time averaging)", choices=TEACHER_KINDS)
    teacher_epochs: int = setting(10, "epochs for --teacher auto")
    teacher_widths: list[int] = setting([64, 256, 256], "channels of the --teacher auto network's three conv groups "
                                        "(airbench95 widens the whitened one to 128 384 384)", nargs=3)
    teacher_time_budget_min: float | None = setting(None, "--teacher-kind whitened: run its schedule on this many "
                                                    "wall-clock minutes where they run out before "
                                                    "--teacher-epochs, and stop then", flag="teacher-time-budget",
                                                    metavar="MIN")
    teacher_only: bool = setting(False, "train the --teacher auto teacher into OUT/teacher, then stop before the ViT")
    distill: str = setting("hard", "targets for the teacher's share of the loss: hard = its top class (DeiT), "
                           "soft = its probabilities at --distill-temperature (KL divergence)", choices=DISTILL_MODES)
    distill_weight: float = setting(0.5, "share of the loss that follows the teacher; the rest is cross-entropy "
                                    "with the labels")
    distill_temperature: float = setting(1.0, "--distill soft: divide both networks' logits by T before the KL "
                                         "divergence, which is then scaled by T^2 (Hinton et al. 2015)", metavar="T")
    teacher_tta: int = setting(0, "the teacher's targets: its logits for the batch (0), averaged with the mirror "
                               "images' (1), or also with one-pixel shifts (2, as the whitened teacher is "
                               "evaluated); a better teacher for 2x / 6x its cost per step", choices=TTA_LEVELS)
    init_from: str | None = setting(None, "start from the weights of this trained checkpoint folder instead of a fresh "
                                    "initialisation (a warm restart; same preset and classes); its run's compute "
                                    "counts in the card", metavar="FOLDER")
    dropout: float | None = setting(None, "override the preset's dropout")
    amp: str = setting("auto", "bf16 autocast; auto = on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX)",
                       choices=AMP_MODES)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    num_threads: int | None = setting(None, "CPU threads for torch (default: torch's choice)")
    adaptive_threads: bool = setting(False, "on a shared CPU, keep re-picking the faster of 1 thread or all")
    seed: int = setting(0, "seed of the split, initialisation, shuffling and augmentation")
    val_size: float = setting(0.1, "held out of train for validation: a share if below 1, else a count "
                              "(at least one image per class)")
    limit_train: int | None = setting(None, "use only this many training images (quick experiments)")
    patience: int | None = setting(None, "stop after this many epochs without a validation gain")
    time_budget_min: float | None = setting(None, "run the cosine schedule on wall-clock minutes and stop when "
                                            "they are spent (--epochs is then an upper bound); may be changed "
                                            "on --resume to re-plan a run", flag="time-budget", metavar="MIN")
    resume: bool = setting(False, "continue the run saved in --out (--epochs and --time-budget may change; "
                           "nothing else)")
    download: bool = setting(False, "download CIFAR-10 with torchvision into --data if it is not there")
    push_to_hub: str | None = setting(None, "upload the exported model to this Hub repo after training",
                                      metavar="REPO")
    command: str = setting("", "the command line that made this config", cli=False)

    def validate(self) -> None:
        problems = [p for check in _CHECKS for p in [check(self)] if p]
        if problems:
            raise TrainError("bad settings: " + "; ".join(problems))


def _range(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A check that the field `name` lies in a range, naming its flag and the allowed values."""
    def check(cfg: TrainConfig) -> str | None:
        value = getattr(cfg, name)
        if value is None:
            return None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if ok:
            return None
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"--{name.replace('_', '-')} must be in {bounds}, got {value:g}"
    return check


def _choice(name: str, allowed) -> callable:
    def check(cfg: TrainConfig) -> str | None:
        value = getattr(cfg, name)
        return None if value in allowed else f"--{name.replace('_', '-')} must be one of {sorted(allowed)}, got {value!r}"
    return check


INF = float("inf")
_CHECKS = [
    _choice("recipe", RECIPES), _choice("preset", PRESETS), _choice("schedule", SCHEDULES),
    _choice("augment", AUGMENTATIONS),
    _choice("attn_init", ATTN_INITS), _choice("pos_init", POS_INITS), _choice("distill", DISTILL_MODES),
    _choice("amp", AMP_MODES), _choice("teacher_kind", TEACHER_KINDS), _choice("teacher_tta", TTA_LEVELS),
    _range("epochs", 1, INF), _range("batch_size", 1, INF), _range("lr", 0, INF, low_open=True),
    _range("weight_decay", 0, INF), _range("warmup_epochs", 0, INF), _range("label_smoothing", 0, 1, high_open=True),
    _range("clip_grad", 0, INF), _range("random_erase", 0, 1), _range("cutmix", 0, 1), _range("mixup", 0, INF),
    _range("patch_drop", 0, 1, high_open=True), _range("patch_drop_end", 0, 1), _range("distill_weight", 0, 1),
    _range("teacher_epochs", 1, INF), _range("teacher_time_budget_min", 0, INF, low_open=True),
    _range("distill_temperature", 0, INF, low_open=True), _range("dropout", 0, 1, high_open=True), _range("val_size", 0, INF, low_open=True),
    _range("patience", 1, INF), _range("time_budget_min", 0, INF, low_open=True), _range("gamma", 0, 1, low_open=True),
    lambda c: (None if c.recipe not in RECIPES or not RECIPES[c.recipe].warm_restart or c.init_from else
               f"--recipe {c.recipe} is a warm restart: give --init-from FOLDER with the weights it starts from "
               f"(the shipped ones started from wide-v7's), or train from scratch with --recipe wide-v7"),
    lambda c: (None if c.distill == "soft" or c.distill_temperature == 1.0
               else "--distill-temperature applies to --distill soft only"),
    lambda c: (None if not c.teacher_only or c.teacher == "auto" else "--teacher-only needs --teacher auto"),
    lambda c: (None if c.teacher_tta == 0 or c.teacher != "none" else "--teacher-tta needs a teacher"),
    lambda c: (None if len(c.teacher_widths) == 3 and min(c.teacher_widths) >= 1
               else f"--teacher-widths takes three positive channel counts, got {c.teacher_widths}"),
    lambda c: (None if c.teacher_time_budget_min is None or c.teacher_kind == "whitened"
               else "--teacher-time-budget applies to --teacher-kind whitened only"),
    lambda c: (None if c.time_budget_min is None or c.schedule == "cosine"
               else "--time-budget needs --schedule cosine"),
    lambda c: (None if all(1 <= m < c.epochs for m in c.milestones)
               else f"--milestones must lie in [1, {c.epochs}) (the epochs), got {c.milestones}"),
    lambda c: (None if c.limit_train is None or c.val_size < 1 or c.limit_train > c.val_size
               else f"--limit-train must be larger than --val-size ({c.val_size:g}), got {c.limit_train}"),
    lambda c: (None if c.val_size < 1 or float(c.val_size).is_integer()
               else f"--val-size must be a share below 1 or a whole count, got {c.val_size:g}"),
]

def _parse_type(annotation: str):
    base = annotation.split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "list[int]": int}[base]


def build_parser(description: str = "", parser_class: type = argparse.ArgumentParser,
                 prog: str = "python train.py") -> argparse.ArgumentParser:
    """One flag per `TrainConfig` field, help and choices from its metadata. Defaults are left out of
    the namespace (argparse.SUPPRESS), so `config_from_args` can tell a given flag from a recipe's.
    `parser_class`: the training command passes the command lines' one-error-line parser
    (`vit_core.cli`), which this library module may not import; `prog`: how it was called."""
    parser = parser_class(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        flag = "--" + meta.pop("flag", f.name.replace("_", "-"))
        help_text = meta.pop("help")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if not meta.get("required"):
            help_text += f" (default {default})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_parse_type(f.type), help=help_text, **meta)
    return parser


def config_from_args(args: argparse.Namespace, command: str = "") -> TrainConfig:
    """The recipe's settings, then every flag that was given."""
    given = vars(args)
    return TrainConfig(**{**RECIPES[given.get("recipe", "default")].settings, **given, "command": command})
