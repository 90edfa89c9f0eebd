"""Train the ViT on CIFAR-10 and export the best validation weights.

    python train.py --data ../shared/cifar10 --out checkpoints/vit-cifar10 --epochs 30
    python train.py --data ~/data --download --preset seed --epochs 200 --out runs/seed   # a GPU recipe
    torchrun --nproc_per_node 2 train.py --data ... --out ...                              # data parallel

A run writes `train_state.pt` after every epoch; `--resume` continues a killed run exactly.
"""

import argparse
import shlex
import sys

from vit_core.data import AUGMENTATIONS, DataError
from vit_core.model import PRESETS
from vit_core.training import ATTN_INITS, DISTILL_MODES, POS_INITS, SCHEDULES, TrainConfig, TrainError, train


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/, or a torchvision CIFAR-10 root")
    p.add_argument("--out", required=True, help="folder for the exported model, its card, history and train_state.pt")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model size (default %(default)s; 'seed' is the report's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="warmup + cosine to zero, or the report's MultiStepLR (default %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="cosine only (default %(default)s)")
    p.add_argument("--milestones", type=int, nargs="*", default=[], help="MultiStepLR epochs (default: 50%% and 75%% of --epochs)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="MultiStepLR factor (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="default %(default)s")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm, 0 = off (default %(default)s)")
    p.add_argument("--augment", default=d.augment, choices=AUGMENTATIONS, help="crop = pad-and-crop, rrc = the report's RandomResizedCrop; both with flips (default %(default)s)")
    p.add_argument("--random-erase", type=float, default=d.random_erase, metavar="P", help="erase one random rectangle of a training image with probability P (default %(default)s)")
    p.add_argument("--cutmix", type=float, default=d.cutmix, metavar="P", help="paste a random box from another training image with probability P; the loss splits the two labels by area (CutMix) (default %(default)s)")
    p.add_argument("--attn-init", default=d.attn_init, choices=ATTN_INITS, help="mimetic = start attention with W_q W_k^T near +I and W_v W_o near -I, as trained ViTs have (Trockman & Kolter 2023) (default %(default)s)")
    p.add_argument("--pos-init", default=d.pos_init, choices=POS_INITS, help="sincos = start the learnable position embedding as a 2D sine-cosine code, so neighbouring patches look alike (default %(default)s)")
    p.add_argument("--patch-drop", type=float, default=d.patch_drop, metavar="P", help="leave a random share P of each training image's patch tokens out (PatchDropout): faster steps, more epochs per hour (default %(default)s)")
    p.add_argument("--patch-drop-end", type=float, default=d.patch_drop_end, metavar="F", help="train on whole images after this fraction of the schedule (default %(default)s)")
    p.add_argument("--teacher", default=d.teacher, help="knowledge distillation: 'none', 'auto' (train a CNN teacher into OUT/teacher first, reused on --resume), or a teacher folder (default %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="epochs for --teacher auto (default %(default)s)")
    p.add_argument("--distill", default=d.distill, choices=DISTILL_MODES, help="hard = learn the teacher's top class (DeiT), soft = its probabilities (default %(default)s)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight, help="share of the loss that follows the teacher (default %(default)s)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--amp", default=d.amp, choices=("auto", "bf16", "off"), help="bf16 autocast; auto = on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX) (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps (default %(default)s)")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--adaptive-threads", action="store_true", help="on a shared CPU, keep re-picking the faster of 1 thread or --num-threads while training")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--val-size", type=int, default=d.val_size, help="images held out of train for validation (default %(default)s)")
    p.add_argument("--limit-train", type=int, default=None, help="use only this many training images (quick experiments)")
    p.add_argument("--patience", type=int, default=None, help="stop after this many epochs without a validation gain")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="run the cosine schedule on wall-clock minutes and stop when they are spent (--epochs is then an upper bound); may be changed on --resume to re-plan a run")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (--epochs and --time-budget may change; nothing else)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision into --data if it is not there")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the exported model to this Hub repo after training")
    a = p.parse_args(argv)
    command = "python train.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return TrainConfig(
        data=a.data, out=a.out, preset=a.preset, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        weight_decay=a.weight_decay, schedule=a.schedule, warmup_epochs=a.warmup_epochs,
        milestones=a.milestones, gamma=a.gamma, label_smoothing=a.label_smoothing, clip_grad=a.clip_grad,
        augment=a.augment, random_erase=a.random_erase, cutmix=a.cutmix, attn_init=a.attn_init, pos_init=a.pos_init, patch_drop=a.patch_drop, patch_drop_end=a.patch_drop_end, teacher=a.teacher, teacher_epochs=a.teacher_epochs, distill=a.distill, distill_weight=a.distill_weight, amp=a.amp, device=a.device, seed=a.seed, val_size=a.val_size,
        limit_train=a.limit_train, patience=a.patience, time_budget_min=a.time_budget, dropout=a.dropout, resume=a.resume,
        download=a.download, push_to_hub=a.push_to_hub, num_threads=a.num_threads, adaptive_threads=a.adaptive_threads, command=command)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (TrainError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
