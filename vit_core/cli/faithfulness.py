"""How far can each explanation map be trusted? Every method, scored over test images.

    python -m vit_core.cli.faithfulness --checkpoint DIR --data DIR [-n 1000] [--seed 1]
                                        [--methods a,b,...] [--removal mean,drop] [--write-card]
    torchrun --nproc-per-node 4 -m vit_core.cli.faithfulness --checkpoint DIR --data DIR [--device cuda]

Per method (attention rollout, gradient rollout, last-layer attention and every
`vit_core.attribution` method but the occlusion reference itself), each map explaining the model's
predicted class, and per way of removing a patch (filled with the dataset mean, or its token
dropped), the `vit_core.trust` figures averaged over images: deletion and insertion AUC, their
win rates against random maps of the same image (the chance of beating one), and the Spearman
correlation with leave-one-patch-out occlusion that removes patches the same way. Then the class
sensitivity (Spearman between the maps for the top-1 and the top-2 class: low means the map
depends on the class) and the cascading model-randomisation check on the first `--sanity` images.
The results go to faithfulness.json (mean, standard error and count of every figure, with the
command, seed and date) beside the checkpoint, or in `--out`; `--write-card` also rebuilds the
model card, which then shows the table.

The default seed is 1, not 0: `lrp_composite`'s rules were picked on seed 0's draw of test images.
When the test split holds fewer than -n images, all of them are used and the first line says so
(the file records the count used).

The checkpoint may be any model the app explains (ours, a timm or transformers ViT, a Hub id) whose
classes and input size are the data's; for another model than ours, the method and the removal
that need our own ViT (token dropping) are left out.

Under torchrun (several processes on one machine or several), each process scores one contiguous
run of the chunks of images (`vit_core.sharding`) and rank 0 gathers them, runs the randomisation
check and writes the same faithfulness.json one process would (its date, seconds and command aside).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..attribution import predicted_class
from ..card import TRAIN_INFO, write_model_card
from ..adapters import load_model
from ..checkpoints import CheckpointError
from ..data import DataError, load_split
from ..devices import DeviceError, pick_device
from ..faithfulness import (REFERENCES, REMOVALS, RESULTS_FILE, cascading_randomization, method_maps,
                            spearman_rows)
from ..methods import METHOD_NAMES, supported_methods
from ..model import ViTClassifier
from ..preprocessing import normalize
from ..records import portable_command, portable_path
from ..rollout import HEAD_FUSIONS, check_rollout_settings
from ..sharding import Shard, join, leave, local_device
from ..trust import TrustContext
from . import BAD_INPUT, CHECKPOINT_HELP, ArgumentParser, fail, progress_bar

PROG = "python -m vit_core.cli.faithfulness"
RESULTS = RESULTS_FILE  # read back by faithfulness.read_results
# "occlusion" is only ever a reference (faithfulness.REFERENCES), never scored itself.
METHODS = tuple(m for m in METHOD_NAMES if m != "occlusion")
FIGURES = ("deletion_auc", "insertion_auc", "deletion_win_rate", "insertion_win_rate", "spearman_occlusion")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP + " (a Hub id: then pass --out)")
    parser.add_argument("--data", required=True, help="CIFAR-10 root (ImageFolder train/ test/ or torchvision)")
    parser.add_argument("-n", type=int, default=1000, help="number of test images (a fixed random subset; all "
                                                           "of them, with a note, when the split holds fewer)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the image subset and the random maps "
                                                            "(default 1: lrp_composite was tuned on seed 0's draw)")
    parser.add_argument("--methods", default=None, help="comma-separated maps (default: all the model supports; "
                                                        f"ours: {','.join(METHODS)})")
    parser.add_argument("--removal", default=None, help="comma-separated removal modes (default: all the model "
                                                        f"supports; ours: {','.join(REMOVALS)})")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion curve steps")
    parser.add_argument("--n-random", type=int, default=20, help="random maps per image")
    parser.add_argument("--sanity", type=int, default=20, metavar="K",
                        help="model-randomisation check on the first K images (0: skip)")
    parser.add_argument("--chunk", type=int, default=25, help="images explained and scored together")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward pass")
    parser.add_argument("--bf16", action="store_true", help="perturbed inputs under bfloat16 (faster, not exact)")
    parser.add_argument("--head-fusion", default="mean", help=f"{'|'.join(HEAD_FUSIONS)} (default mean)")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--out", default=None, help=f"folder for {RESULTS} (default: the checkpoint folder)")
    parser.add_argument("--write-card", action="store_true", help="also rebuild the model card in that folder")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision if missing")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto; under "
                                                         "torchrun, cuda is each process's own GPU)")
    args = parser.parse_args(argv)
    if min(args.n, args.steps, args.n_random, args.chunk, args.batch_size) < 1 or args.sanity < 0:
        parser.error("-n, --steps, --n-random, --chunk and --batch-size must be at least 1, --sanity at least 0")
    try:
        check_rollout_settings(args.head_fusion, args.discard_ratio)
    except ValueError as error:
        parser.error(str(error))
    return args


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of names, each in `allowed`; ValueError naming the allowed ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _summary(values: list[float]) -> dict:
    """Mean, standard error and count of the finite values (NaN marks a constant map)."""
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if len(finite) == 0:
        return {"mean": None, "sem": None, "n": 0}
    sem = finite.std().item() / math.sqrt(len(finite)) if len(finite) > 1 else 0.0
    return {"mean": finite.mean().item(), "sem": sem, "n": len(finite)}


def _append(entry: dict, values: dict[str, torch.Tensor]) -> None:
    for name, tensor in values.items():
        entry.setdefault(name, []).extend(tensor.tolist())


def _score_chunk(model, images: torch.Tensor, args: argparse.Namespace, methods: list[str],
                 removals: list[str], per_image: dict) -> torch.Tensor:
    """Every figure of every method for one chunk of images, appended to per_image[method][part]
    (part: a removal mode or "class_sensitivity"; per_image["random"] holds the random maps' AUCs).
    Returns the predicted classes, the maps' target."""
    target = predicted_class(model, images)
    settings = dict(head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    references = [REFERENCES[r] for r in removals if REFERENCES[r] not in methods]
    maps = method_maps(model, images, methods + references, target, **settings)
    for removal in removals:
        context = TrustContext(model, images, target, removal=removal, steps=args.steps, n_random=args.n_random,
                               seed=args.seed, batch_size=args.batch_size, bf16=args.bf16,
                               occlusion_map=maps[REFERENCES[removal]])
        for name, figures in context.figures({m: maps[m] for m in methods}).items():
            entry = per_image.setdefault(name, {}).setdefault(removal, {})
            _append(entry, {"deletion_auc": figures.deletion_auc, "insertion_auc": figures.insertion_auc,
                            "deletion_win_rate": figures.deletion_percentile / 100,
                            "insertion_win_rate": figures.insertion_percentile / 100})
            entry.setdefault("spearman_occlusion", [])
            if name != REFERENCES[removal]:  # the reference agrees with itself
                _append(entry, {"spearman_occlusion": figures.spearman_occlusion})
        random = context.random_areas()
        _append(per_image.setdefault("random", {}).setdefault(removal, {}),
                {f"{mode}_auc": areas.mean(dim=1) for mode, areas in random.items()})
    with torch.no_grad():
        runner_up = model(images).topk(2, dim=-1).indices[:, 1]
    second = method_maps(model, images, methods, runner_up, **settings)
    for name in methods:
        per_image[name].setdefault("class_sensitivity", []).extend(spearman_rows(maps[name], second[name]).tolist())
    return target.cpu()


def _results(args, argv, per_image: dict, sanity: dict, removals: list[str], accuracy: float, n: int,
             seconds: float) -> dict:
    methods = {}
    for name, parts in per_image.items():
        if name == "random":
            continue
        methods[name] = {removal: {figure: _summary(parts[removal][figure]) for figure in FIGURES}
                         for removal in removals}
        methods[name]["class_sensitivity"] = _summary(parts["class_sensitivity"])
        if name in sanity:
            methods[name]["randomisation"] = sanity[name]
    given = sys.argv[1:] if argv is None else argv
    return {  # paths as a record keeps them (vit_core.records)
        "checkpoint": portable_path(args.checkpoint), "data": str(Path(portable_path(args.data)) / "test"),
        "n": n, "seed": args.seed,
        "accuracy": accuracy, "target": "predicted class", "steps": args.steps, "n_random": args.n_random,
        "bf16": args.bf16, "head_fusion": args.head_fusion, "discard_ratio": args.discard_ratio,
        "removals": removals, "references": {r: REFERENCES[r] for r in removals},
        "sanity_images": min(args.sanity, n),
        "command": portable_command(PROG, given),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "methods": methods,
        "random": {r: {f: _summary(per_image["random"][r][f]) for f in ("deletion_auc", "insertion_auc")}
                   for r in removals},
    }


def _cell(summary: dict, digits: int = 3) -> str:
    if summary["mean"] is None:
        return "—"
    return f"{summary['mean']:.{digits}f} ± {summary['sem']:.{digits}f}"


def _print_results(results: dict) -> None:
    print(f"checkpoint {results['checkpoint']}: {results['n']} test images (seed {results['seed']}), accuracy "
          f"{results['accuracy']:.3f}; target = predicted class; {results['steps']} curve steps, "
          f"{results['n_random']} random maps per image; mean ± standard error over images")
    methods = results["methods"]
    for removal in results["removals"]:
        how = "filled with the dataset mean" if removal == "mean" else "left out of the token sequence"
        print(f"\nremoval {removal!r} (a removed patch is {how})")
        print(f"{'method':<22} {'deletion AUC ↓':<17} {'insertion AUC ↑':<17}")
        for name, entry in [*methods.items(), ("random", results["random"])]:
            print(f"{name:<22} {_cell(entry[removal]['deletion_auc']):<17} {_cell(entry[removal]['insertion_auc'])}")
        reference = results["references"][removal]
        print(f"{'method':<22} {'deletion win':<17} {'insertion win':<17} Spearman with {reference}")
        for name, entry in methods.items():
            figures = entry[removal]
            agreement = "(reference)" if name == reference else _cell(figures["spearman_occlusion"])
            print(f"{name:<22} {_cell(figures['deletion_win_rate']):<17} {_cell(figures['insertion_win_rate']):<17} "
                  f"{agreement}")
    print("\nclass sensitivity (Spearman between the top-1 and top-2 class maps; low = class-sensitive):")
    for name, entry in methods.items():
        print(f"{name:<22} {_cell(entry['class_sensitivity'])}")
    if results["sanity_images"]:
        print(f"\nmodel randomisation (Spearman with the trained map, {results['sanity_images']} images):")
        for name, entry in methods.items():
            print(f"  {name:<21} " + "  ".join(f"{s['stage']}: {s['spearman']:+.2f}" for s in entry["randomisation"]))


def _inputs(args: argparse.Namespace):
    """(methods, removals, model, test data, device), each checked; ValueError, CheckpointError,
    DataError or DeviceError with the message for the user."""
    device = pick_device(args.device)
    model = load_model(args.checkpoint)
    supported = supported_methods(model)
    methods = _names(args.methods or ",".join(m for m in METHODS if m in supported), METHODS, "method")
    removals = _names(args.removal or ",".join(r for r in REMOVALS if r in _removals_for(model)), REMOVALS,
                      "removal mode")
    own_only = [m for m in methods if m not in supported] + [r for r in removals if r not in _removals_for(model)]
    if own_only:
        raise ValueError(f"{', '.join(own_only)} need this project's own ViT; for {getattr(model, 'name', 'this model')} "
                         f"choose methods from {', '.join(m for m in METHODS if m in supported)} and removal 'mean'")
    data = load_split(args.data, "test", download=args.download, limit=args.n, seed=args.seed)
    return methods, removals, model, data, device


def _removals_for(model) -> tuple[str, ...]:
    """Dropping a token needs our own ViT (faithfulness.check_removal); filling works for any model."""
    return REMOVALS if isinstance(model, ViTClassifier) else ("mean",)


def _checked_out(args: argparse.Namespace, model, data) -> Path:
    """The output folder; ValueError when it, --write-card, --steps or the data do not fit."""
    out = Path(args.out or args.checkpoint)
    if args.out is None and not out.is_dir():
        raise ValueError(f"{args.checkpoint!r} is not a local folder to write {RESULTS} beside; pass --out DIR")
    if args.write_card and not (out / TRAIN_INFO).is_file():  # the card is built from it
        raise ValueError(f"--write-card needs a checkpoint folder written by train.py (with {TRAIN_INFO}); "
                         f"{out} has none")
    if tuple(data.images.shape[-2:]) != (model.image_size, model.image_size):
        raise ValueError(f"the data's image size {tuple(data.images.shape[-2:])} is not the model's "
                         f"{model.image_size}x{model.image_size}")
    if data.classes != model.class_names:
        raise ValueError(f"the data's classes {data.classes} differ from the model's {model.class_names}")
    if args.steps > model.grid_size ** 2:
        raise ValueError(f"--steps must be at most the {model.grid_size ** 2} patches, got {args.steps}")
    return out


def _merge(into: dict, part: dict) -> None:
    """Append `part`'s per-image lists to `into`'s, key by key (one rank's results after another's)."""
    for key, value in part.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into.setdefault(key, []).extend(value)


def _score_my_chunks(model, images: torch.Tensor, args, methods, removals, shard: Shard) -> tuple[dict, list]:
    """Score this rank's chunks (sharding.Shard.pieces); (per-image figures, predicted classes)."""
    starts = list(range(0, len(images), args.chunk))
    mine = [starts[i] for i in shard.pieces(len(starts))]
    per_image: dict = {}
    predicted: list[int] = []
    n_mine = sum(len(images[start:start + args.chunk]) for start in mine)
    where = f" (rank 0 of {shard.world}: its {n_mine} images)" if shard.world > 1 else ""
    with progress_bar(n_mine, "faithfulness" + where) if shard.is_main else contextlib.nullcontext() as bar:
        for start in mine:
            chunk = images[start:start + args.chunk]
            predicted += _score_chunk(model, chunk, args, methods, removals, per_image).tolist()
            if bar is not None:
                bar.update(len(chunk))
    return per_image, predicted


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        methods, removals, model, data, device = _inputs(args)
        out = _checked_out(args, model, data)
    except (ValueError, CheckpointError, DataError, DeviceError) as error:
        # Under torchrun every rank meets the same problem; one line says it.
        return fail(error) if os.environ.get("RANK", "0") == "0" else BAD_INPUT
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shard = join(device)
    try:
        return _run(args, argv, model.to(device), data, device, methods, removals, out, shard)
    finally:
        leave(shard)


def _run(args, argv, model, data, device, methods, removals, out: Path, shard: Shard) -> int:
    if shard.is_main:
        short = f"; -n {args.n} asked for more, so all of them" if len(data) < args.n else ""
        split = f", split over {shard.world} processes" if shard.world > 1 else ""
        maps = f"{len(methods)} map{'s' * (len(methods) != 1)}"
        print(f"scoring {maps} on {len(data)} test images from {args.data}{short}{split}", file=sys.stderr,
              flush=True)
    images = normalize(data.images, model.mean, model.std).to(device)
    started = time.perf_counter()
    per_image, predicted = _score_my_chunks(model, images, args, methods, removals, shard)
    sanity = {} if args.sanity == 0 or not shard.is_main else cascading_randomization(
        model, images[:args.sanity], methods, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
        seed=args.seed)
    parts = shard.gather((per_image, predicted))
    if not shard.is_main:
        return 0
    per_image, predicted = {}, []
    for part_maps, part_predicted in parts:
        _merge(per_image, part_maps)
        predicted += part_predicted
    accuracy = (torch.tensor(predicted) == data.labels).double().mean().item()
    results = _results(args, argv, per_image, sanity, removals, accuracy, len(images), time.perf_counter() - started)
    _print_results(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / RESULTS}" + (f", {write_model_card(out)}" if args.write_card else ""))
    print(f"({results['seconds']:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
