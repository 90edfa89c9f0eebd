"""The Walkthrough's narration: one or two sentences per step, computed from one image's numbers.

Every function is pure (plain numbers and lists in, a string out), so a test can check each
sentence against the numbers it states. Blocks, heads, rows and columns are counted from 1 in
words (patches are numbered from 0, as on the app's numbered grid); the arrays are 0-based.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAME = 0.02  # cosine similarities closer than this are "about as alike"
# Who attends, for each thing a prediction can read (`walkthrough.reads_what`).
ATTENDS = {"the CLS token": "The CLS token attends",
           "the mean of the CLS and distillation tokens": "The CLS and distillation tokens, averaged, attend",
           "the mean of the patch tokens": "The patch tokens, averaged, attend"}


def percent(p: float) -> str:
    """A probability as a whole percentage: 0.412 -> "41 %"."""
    return f"{100 * float(p):.0f} %"


def _place(patch: int, grid: int) -> str:
    return f"patch {patch} (row {patch // grid + 1}, column {patch % grid + 1})"


def pixels_sentence(image_size: int, patch_size: int) -> str:
    grid = image_size // patch_size
    return (f"The model sees the picture at {image_size} × {image_size} pixels and cuts it into "
            f"{grid} × {grid} = {grid * grid} patches of {patch_size} × {patch_size} pixels, numbered row by row.")


def tokens_sentence(patch_size: int, embed_dim: int, share: Sequence[float]) -> str:
    """`share`: the variance share of the three colour components (token PCA)."""
    return (f"Each patch is flattened into {3 * patch_size * patch_size} numbers ({patch_size} × {patch_size} "
            f"pixels × 3 colours) and projected to a token of {embed_dim} numbers. The colours show the "
            f"tokens' three main directions of variation, which hold {percent(sum(share))} of how they differ.")


def neighbour_similarity(similarity, grid: int) -> tuple[float, float]:
    """Mean cosine similarity of side-by-side patches' position embeddings, and of patches three or
    more rows or columns apart (NaN when the grid has no such pair)."""
    sim = np.asarray(similarity, dtype=np.float64)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    distance = np.maximum(abs(rows[:, None] - rows[None]), abs(cols[:, None] - cols[None]))
    adjacent = (abs(rows[:, None] - rows[None]) + abs(cols[:, None] - cols[None])) == 1
    far = distance >= 3
    mean = lambda mask: float(sim[mask].mean()) if mask.any() else float("nan")  # noqa: E731
    return mean(adjacent), mean(far)


def position_sentence(similarity, grid: int) -> str:
    if similarity is None:
        return "This model has no position embedding of its own to show."
    near, far = neighbour_similarity(similarity, grid)
    if np.isnan(near):
        return "A position embedding is added to each token."
    if np.isnan(far):
        return (f"A position embedding is added to each token; side-by-side patches' embeddings have "
                f"mean cosine similarity {near:.2f}.")
    compare = ("more alike than" if near > far + SAME else "less alike than" if near < far - SAME
               else "about as alike as")
    return (f"A position embedding is added to each token: side-by-side patches' embeddings are {compare} "
            f"those of patches three or more apart (mean cosine similarity {near:.2f} vs {far:.2f}).")


def cls_sentence(prefix_names: Sequence[str], n_patches: int, reads: str) -> str:
    total = n_patches + len(prefix_names)
    if not prefix_names:
        return (f"No token is put in front: the {n_patches} patch tokens enter block 1, and the prediction "
                f"is read from {reads}.")
    counts = {name: list(prefix_names).count(name) for name in dict.fromkeys(prefix_names)}
    names = " and ".join(f"a {n} token" if c == 1 else f"{c} {n} tokens" for n, c in counts.items())
    return (f"{names[0].upper()}{names[1:]} {'is' if len(prefix_names) == 1 else 'are'} put in front of the "
            f"{n_patches} patch tokens: {total} tokens enter block 1. The prediction is read from {reads}.")


def block_sentence(block: int, reads: str, lens_probs, final: int, classes: Sequence[str],
                   attention, grid: int, heads: int, last: bool = False) -> str:
    """Block `block` (1-based; `last` if no block follows): what the lens on the read token(s) says
    there (`lens_probs` [C], or None without a lens) against the final class, and the patch the
    read row attends to most (`attention` [T], the mean over heads)."""
    attention = np.asarray(attention, dtype=np.float64)
    top_patch = int(attention.argmax())
    looks = (f"{ATTENDS.get(reads, reads[0].upper() + reads[1:] + ' attends')} most to {_place(top_patch, grid)}: "
             f"{percent(attention[top_patch])} of the attention, averaged over the {heads} heads.")
    if lens_probs is None:
        return looks
    lens = np.asarray(lens_probs, dtype=np.float64)
    top = int(lens.argmax())
    if last:
        says = f"After the last block, {reads} says {classes[top]} at {percent(lens[top])}: the model's answer."
    elif top == final:
        says = f"After block {block}, {reads} already says {classes[top]} at {percent(lens[top])}."
    else:
        says = (f"After block {block}, {reads} says {classes[top]} ({percent(lens[top])}); "
                f"{classes[final]}, the final answer, is at {percent(lens[final])}.")
    return f"{says} {looks}"


def heads_sentence(knockout, base: float, predicted: int, tops, classes: Sequence[str]) -> str:
    """`knockout` [L, H]: the predicted class's probability with each head out; `base` without;
    `tops` [L, H]: the class predicted then."""
    knockout, tops = np.asarray(knockout, dtype=np.float64), np.asarray(tops)
    change = knockout - base
    layer, head = np.unravel_index(int(np.abs(change).argmax()), change.shape)
    value, name = knockout[layer, head], classes[predicted]
    verb = "drops" if change[layer, head] < 0 else "raises"
    becomes = int(tops[layer, head])
    sentence = (f"Knocking out head {head + 1} of block {layer + 1} alone {verb} {name} from {percent(base)} "
                f"to {percent(value)}")
    if becomes != predicted:
        sentence += f", and the prediction becomes {classes[becomes]}"
    small = int((np.abs(change) < 0.01).sum())
    return f"{sentence}. {small} of {change.size} heads change it by less than 1 percentage point."


def decision_sentence(probs, classes: Sequence[str], map_label: str | None, values, grid: int,
                      trust: dict | None = None) -> str:
    """The prediction and runner-up, the map's most relevant patch, and (when given) the map's
    trust figures on this image ("deletion_percentile", "spearman_occlusion")."""
    probs = np.asarray(probs, dtype=np.float64)
    first, second = np.argsort(-probs, kind="stable")[:2] if len(probs) > 1 else (int(probs.argmax()), None)
    sentence = f"The model says {classes[first]} at {percent(probs[first])}"
    sentence += f"; next comes {classes[second]} at {percent(probs[second])}." if second is not None else "."
    if values is not None:
        top = int(np.argmax(values))
        sentence += f" The {map_label} map marks {_place(top, grid)} as the most relevant."
    if trust:
        parts = []
        if trust.get("deletion_percentile") is not None:
            parts.append(f"removes the class faster than {trust['deletion_percentile']:.0f} % of random maps")
        rho = trust.get("spearman_occlusion")
        if rho is not None and np.isfinite(rho):
            parts.append(f"ranks patches like occlusion with Spearman {rho:.2f}")
        if parts:
            sentence += f" On this image it {' and '.join(parts)}."
    return sentence


def whatif_sentence(payload: dict, k: int) -> str:
    """The what-if step for k removed patches, from a payload's "whatif" (its rows at the counts
    "ks", default 0, 1, 2, ...), "predicted" and "classes" (or any dict with those keys).
    ValueError for a k that is not one of the rows' counts."""
    whatif = payload.get("whatif")
    if not whatif:
        raise ValueError("this payload has no what-if curves")
    relevant, random = whatif["relevant"], whatif["random"]
    ks = list(whatif.get("ks", range(len(relevant))))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k not in ks:
        allowed = f"[0, {ks[-1]}]" if ks == list(range(len(ks))) else f"one of {ks}"
        raise ValueError(f"k must be an integer in {allowed}, got {k!r}")
    classes, predicted = payload["classes"], int(payload["predicted"])
    name, before = classes[predicted], relevant[ks.index(0)][predicted]
    if k == 0:
        return f"With no patch removed the model says {name} at {percent(before)}."
    row = ks.index(k)
    after, chance = relevant[row][predicted], random[row][predicted]
    verb = ("leaves" if percent(after) == percent(before) else "drops" if after < before else "raises")
    moved = f"{name} at {percent(before)}" if verb == "leaves" else f"{name} from {percent(before)} to {percent(after)}"
    these = "this patch" if k == 1 else f"these {k} patches"
    sentence = f"Removing {these} {verb} {moved}; {k} random patch{'es' if k > 1 else ''}: {percent(chance)}."
    now = int(np.argmax(relevant[row]))
    if now != predicted:
        sentence += f" The prediction becomes {classes[now]} ({percent(relevant[row][now])})."
    return sentence
