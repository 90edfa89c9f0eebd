"""Drawing helpers: numpy/PIL images and matplotlib figures drawn without pyplot's global state.

The hot-path helpers (everything the app redraws per click) use only numpy, PIL and matplotlib's
colormap lookup tables, never a matplotlib Figure, so a whole explanation draws in a few ms.
Maps come in raw from `vit_core.methods` (and `vit_core.explain`); normalising for display happens here.

Patch order everywhere is row-major (patch i sits at row i // g, column i % g), the order of
`vit_core.patchify` and of every map of `vit_core.methods`.
"""

from __future__ import annotations

import io
from functools import lru_cache

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

HIGHLIGHT_COLOR = (255, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Small building blocks

def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def normalize_map(patch_map) -> np.ndarray:
    """Min-max scale a map (torch or numpy, any shape) to [0, 1] as float32; a constant map gives
    zeros. Non-finite entries are treated as the minimum."""
    values = _to_numpy(patch_map)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.float32)
    low, high = values[finite].min(), values[finite].max()
    values = np.where(finite, values, low)
    if high - low <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


@lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """A colormap as a [256, 3] uint8 lookup table."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}") from None
    return np.round(colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _colorize(unit: np.ndarray, cmap: str) -> np.ndarray:
    """Values in [0, 1] of shape [...] -> uint8 colours [..., 3]."""
    return _lut(cmap)[np.clip(np.round(unit * 255), 0, 255).astype(np.intp)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _square_grid(patch_map) -> np.ndarray:
    """A map as a 2-D [g, g] array; a flat map of g*g values is reshaped row-major."""
    values = _to_numpy(patch_map)
    if values.ndim == 1:
        grid = int(round(np.sqrt(values.size)))
        if grid * grid != values.size:
            raise ValueError(f"{values.size} values do not form a square grid")
        values = values.reshape(grid, grid)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"expected a square map [g, g], got shape {values.shape}")
    return values


@lru_cache(maxsize=256)
def _title_band(title: str, min_width: int, font_size: int) -> Image.Image:
    """A white band with `title` centred, at least `min_width` wide (cached: titles repeat)."""
    font = _font(font_size)
    width, _ = _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, font)
    band = Image.new("RGB", (max(min_width, width + 4), font_size + 6), BACKGROUND)
    ImageDraw.Draw(band).text((band.width // 2, band.height // 2), title, fill=TEXT_COLOR, font=font,
                              anchor="mm")
    return band


def _with_title(tile: Image.Image, title: str, font_size: int = 11) -> Image.Image:
    """`tile` with `title` centred in a white band above it (the tile itself when title is empty)."""
    if not title:
        return tile
    band = _title_band(title, tile.width, font_size)
    out = Image.new("RGB", (band.width, tile.height + band.height), BACKGROUND)
    out.paste(band, (0, 0))
    out.paste(tile, ((out.width - tile.width) // 2, band.height))
    return out


def _hstack(tiles: list[Image.Image], spacing: int = 6) -> Image.Image:
    """Tiles side by side, top-aligned, on white."""
    if not tiles:
        raise ValueError("nothing to draw")
    width = sum(t.width for t in tiles) + spacing * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles)), BACKGROUND)
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width + spacing
    return out


# ----------------------------------------------------------------------------------------------
# The image and its patches

def upscale_nearest(image: Image.Image, scale: int) -> Image.Image:
    """Enlarge by an integer factor with nearest-neighbour sampling (crisp pixels)."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    image = _rgb(image)
    if scale == 1:
        return image.copy()
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _patch_origin(index: int, grid_size: int, cell: int, gap: int) -> tuple[int, int]:
    row, col = divmod(index, grid_size)
    return gap + col * (cell + gap), gap + row * (cell + gap)


def patch_grid(image: Image.Image, patch_size: int, scale: int = 8, gap: int = 2, numbered: bool = True,
               highlight: int | None = None) -> Image.Image:
    """The image cut into its patches: each patch upscaled by `scale`, separated (and framed) by
    white gaps of `gap` pixels, numbered in row-major order, optionally one patch outlined.

    A patch of `patch_size * scale` pixels starts at gap + k * (patch_size * scale + gap) along
    each axis; `patch_grid_index` inverts this."""
    image = _rgb(image)
    if image.width != image.height or image.width % patch_size:
        raise ValueError(f"image {image.width}x{image.height} is not square with sides divisible "
                         f"by patch size {patch_size}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    grid = image.width // patch_size
    cell = patch_size * scale
    side = grid * (cell + gap) + gap
    pixels = np.asarray(upscale_nearest(image, scale)).reshape(grid, cell, grid, cell, 3)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    # Below and right of the first gap, the canvas is grid x grid blocks of (cell + gap) pixels,
    # each a patch followed by its gap.
    blocks = canvas[gap:, gap:].reshape(grid, cell + gap, grid, cell + gap, 3)
    blocks[:, :cell, :, :cell] = pixels
    if numbered:
        mask, colors = _number_layer(grid, cell, gap)
        canvas[mask] = colors[mask]
    out = Image.fromarray(canvas)
    if highlight is not None:
        _check_patch(highlight, grid)
        x0, y0 = _patch_origin(highlight, grid, cell, gap)
        width = max(2, gap)
        ImageDraw.Draw(out).rectangle((x0 - gap, y0 - gap, x0 + cell + gap - 1, y0 + cell + gap - 1),
                       outline=HIGHLIGHT_COLOR, width=width)
    return out


@lru_cache(maxsize=8)
def _number_layer(grid: int, cell: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """The patch numbers of a `patch_grid` (white on small black boxes), drawn once per layout:
    a mask [side, side] of the pixels they cover and their colours [side, side, 3]."""
    side = grid * (cell + gap) + gap
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(max(7, min(12, cell // 3)))
    for index in range(grid * grid):
        x0, y0 = _patch_origin(index, grid, cell, gap)
        label = str(index)
        width, height = _text_size(draw, label, font)
        box = (x0, y0, min(x0 + width + 2, x0 + cell - 1), min(y0 + height + 3, y0 + cell - 1))
        draw.rectangle(box, fill=(0, 0, 0, 255))
        draw.text((x0 + 1, y0 + 1), label, fill=(255, 255, 255, 255), font=font, anchor="lt")
    rgba = np.asarray(layer)
    mask, colors = rgba[..., 3] > 0, np.ascontiguousarray(rgba[..., :3])
    mask.flags.writeable = colors.flags.writeable = False
    return mask, colors


def _check_patch(index: int, grid: int) -> None:
    if not 0 <= index < grid * grid:
        raise ValueError(f"patch index must be in [0, {grid * grid}), got {index}")


def patch_grid_index(x: float, y: float, grid_size: int, patch_size: int, scale: int = 8,
                     gap: int = 2) -> int | None:
    """Pixel (x, y) of a `patch_grid` image -> row-major patch index; None in a gap or outside."""
    cell = patch_size * scale

    def axis(v: float) -> int | None:
        v = v - gap
        if v < 0:
            return None
        k, within = divmod(v, cell + gap)
        return int(k) if within < cell and k < grid_size else None

    col, row = axis(x), axis(y)
    if col is None or row is None:
        return None
    return row * grid_size + col


def patch_index_at(x: float, y: float, width: int, height: int, grid_size: int) -> int:
    """Pixel (x, y) of a plain square rendering of the image (no gaps) of size width x height
    -> row-major patch index, clamped to the grid."""
    col = min(max(int(x * grid_size // width), 0), grid_size - 1)
    row = min(max(int(y * grid_size // height), 0), grid_size - 1)
    return row * grid_size + col


# ----------------------------------------------------------------------------------------------
# Maps over the image

def _map_colors(patch_map, size: tuple[int, int], cmap: str) -> np.ndarray:
    """Normalised map coloured and blown up to `size` (w, h) with crisp nearest-neighbour cells."""
    colors = _colorize(normalize_map(_square_grid(patch_map)), cmap)
    grid = colors.shape[0]
    width, height = size
    if width % grid == 0 and height % grid == 0:
        return colors.repeat(height // grid, axis=0).repeat(width // grid, axis=1)
    return np.asarray(Image.fromarray(colors).resize(size, Image.Resampling.NEAREST))


def _outline_cell(image: Image.Image, index: int, grid: int) -> None:
    _check_patch(index, grid)
    row, col = divmod(index, grid)
    cw, ch = image.width / grid, image.height / grid
    ImageDraw.Draw(image).rectangle(
        (round(col * cw), round(row * ch), round((col + 1) * cw) - 1, round((row + 1) * ch) - 1),
        outline=HIGHLIGHT_COLOR, width=2)


def overlay_map(image: Image.Image, patch_map, alpha: float = 0.5, cmap: str = "jet", scale: int = 8,
                highlight: int | None = None) -> Image.Image:
    """A [g, g] map, min-max normalised and coloured, with one crisp block per patch, blended over
    the image upscaled by `scale`: (1 - alpha) * image + alpha * colour. Optionally outlines one
    patch (row-major index)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = upscale_nearest(image, scale)
    colors = Image.fromarray(_map_colors(patch_map, base.size, cmap))
    out = Image.blend(base, colors, alpha)  # (1 - alpha) * base + alpha * colors, in C
    if highlight is not None:
        _outline_cell(out, highlight, _square_grid(patch_map).shape[0])
    return out


def _per_layer(stack, titles: list[str] | None, shape_message: str) -> tuple[np.ndarray, list[str]]:
    """A per-layer stack [L, n, n] as numpy, with its titles ("layer 1" ... by default)."""
    stack = _to_numpy(stack)
    if stack.ndim != 3:
        raise ValueError(f"{shape_message}, got shape {stack.shape}")
    if titles is None:
        titles = [f"layer {i + 1}" for i in range(len(stack))]
    if len(titles) != len(stack):
        raise ValueError(f"{len(titles)} titles for {len(stack)} layers")
    return stack, titles


def map_strip(maps, image: Image.Image | None = None, titles: list[str] | None = None, alpha: float = 0.6,
              cmap: str = "jet", scale: int = 4) -> Image.Image:
    """Per-layer maps [L, g, g] in a row, each normalised on its own, overlaid on `image` (upscaled
    by `scale`) when given; without an image each map cell is drawn 4 * scale pixels wide.
    Titles default to "layer 1" ... "layer L"."""
    maps, titles = _per_layer(maps, titles, "maps must be [L, g, g]")
    tiles = []
    for patch_map, title in zip(maps, titles):
        if image is not None:
            tile = overlay_map(image, patch_map, alpha=alpha, cmap=cmap, scale=scale)
        else:
            side = maps.shape[-1] * 4 * scale
            tile = Image.fromarray(_map_colors(patch_map, (side, side), cmap))
        tiles.append(_with_title(tile, title, font_size=10))
    return _hstack(tiles, spacing=4)


# ----------------------------------------------------------------------------------------------
# Attention matrices

def _ticks(tokens: int, step: int) -> list[tuple[int, str]]:
    """Token positions to label: CLS, then patch indices every `step` patches."""
    return [(0, "CLS")] + [(1 + i, str(i)) for i in range(0, tokens - 1, step)]


def pool_blocks(values: np.ndarray, k: int) -> np.ndarray:
    """The mean of each k x k block of a square matrix (the last row and column of blocks may be
    narrower): ceil(T / k) a side."""
    if k == 1:
        return values
    tokens, n = values.shape[0], -(-values.shape[0] // k)
    padded = np.full((n * k, n * k), np.nan, dtype=np.float64)
    padded[:tokens, :tokens] = values
    return np.nanmean(padded.reshape(n, k, n, k), axis=(1, 3))


def attention_matrix_image(matrix, title: str = "", highlight_token: int | None = None,
                           cmap: str = "viridis", cell: int = 4, labels: bool = True, shrink: int = 1) -> Image.Image:
    """A [T, T] attention matrix as a heatmap, `cell` pixels per entry, colours min-max normalised
    per matrix. Row = query token, column = key token; token 0 is CLS, token i + 1 is patch i.
    With `labels`, both axes carry "CLS" and patch indices (every 8th when cells are small) and
    a footnote says which axis is which. `highlight_token` outlines that token's row and column.
    `shrink` k > 1 draws the mean of each k x k block of entries instead (thumbnails of long
    sequences; no labels then)."""
    values = _to_numpy(matrix)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"expected a square matrix [T, T], got shape {values.shape}")
    if int(cell) != cell or cell < 1:
        raise ValueError(f"cell must be a positive integer, got {cell}")
    if int(shrink) != shrink or shrink < 1 or (shrink > 1 and labels):
        raise ValueError(f"shrink must be a positive integer, and 1 with labels; got {shrink}")
    if highlight_token is not None and not 0 <= highlight_token < values.shape[0]:
        raise ValueError(f"highlight_token must be in [0, {values.shape[0]}), got {highlight_token}")
    values = pool_blocks(values, shrink)
    highlight_token = None if highlight_token is None else highlight_token // shrink
    tokens = values.shape[0]
    heat = Image.fromarray(_colorize(normalize_map(values), cmap))
    if cell > 1:
        heat = heat.resize((tokens * cell, tokens * cell), Image.Resampling.NEAREST)
    if highlight_token is not None:
        draw = ImageDraw.Draw(heat)
        k, side = highlight_token * cell, tokens * cell - 1
        width = 1 if cell < 4 else 2
        draw.rectangle((0, k, side, k + cell - 1), outline=HIGHLIGHT_COLOR, width=width)
        draw.rectangle((k, 0, k + cell - 1, side), outline=HIGHLIGHT_COLOR, width=width)
    if not labels:
        return _with_title(heat, title)

    frame, (left, top) = _matrix_frame(tokens, cell)
    out = frame.copy()
    out.paste(heat, (left, top))
    return _with_title(out, title)


@lru_cache(maxsize=16)
def _matrix_frame(tokens: int, cell: int) -> tuple[Image.Image, tuple[int, int]]:
    """White canvas with the axis labels of a [tokens, tokens] heatmap of `cell`-pixel entries,
    and where the heatmap goes (cached: the same for every matrix of a model)."""
    font = _font(9)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    step = 8 if cell * 8 >= 16 else 16
    ticks = _ticks(tokens, step)
    label_w = max(_text_size(probe, text, font)[0] for _, text in ticks)
    line_h = 11
    side = tokens * cell
    left, top, bottom = label_w + 6, line_h + 4, line_h + 4
    out = Image.new("RGB", (left + side + 6, top + side + bottom), BACKGROUND)
    draw = ImageDraw.Draw(out)
    last_x, last_y = -1e9, -1e9
    for token, text in ticks:
        centre = token * cell + cell / 2
        text_w = _text_size(draw, text, font)[0]
        if centre - last_y >= line_h:  # rows (query tokens), left of the heatmap
            draw.text((left - 4, top + centre), text, fill=TEXT_COLOR, font=font, anchor="rm")
            draw.line((left - 3, top + centre, left - 1, top + centre), fill=TEXT_COLOR)
            last_y = centre
        if centre - last_x >= text_w + 4:  # columns (key tokens), above the heatmap
            draw.text((left + centre, top - 3), text, fill=TEXT_COLOR, font=font, anchor="mb")
            last_x = centre + text_w / 2
    draw.text((left, top + side + 2), "rows: query, cols: key", fill=(90, 90, 90), font=font, anchor="lt")
    return out, (left, top)


def attention_matrix_grid(matrices, titles: list[str] | None = None, cell: int = 2,
                          highlight_token: int | None = None, shrink: int = 1) -> Image.Image:
    """[L, T, T] matrices as thumbnails side by side, titled "layer 1" ... by default; `shrink` as
    in `attention_matrix_image`."""
    matrices, titles = _per_layer(matrices, titles, "matrices must be [L, T, T]")
    tiles = [attention_matrix_image(m, title=t, highlight_token=highlight_token, cell=cell, labels=False,
                                    shrink=shrink) for m, t in zip(matrices, titles)]
    return _hstack(tiles)


# ----------------------------------------------------------------------------------------------
# Matplotlib figures (not on the per-click path)

def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def plot_curves(curves: dict[str, np.ndarray], title: str, ylabel: str = "target probability",
                aucs: dict[str, float] | None = None) -> Image.Image:
    """Deletion or insertion curves: x = fraction of patches removed/inserted. Each value is a
    curve [K] or a batch of curves [B, K] (drawn as the mean with a +-1 std band). The legend
    shows each method's area under the curve where `aucs` gives it (the caller measures it, e.g.
    with `faithfulness.auc`; drawing computes no metrics)."""
    if not curves:
        raise ValueError("plot_curves needs at least one curve")
    aucs = aucs or {}
    if set(aucs) - set(curves):
        raise ValueError(f"AUCs given for curves that are not drawn: {sorted(set(aucs) - set(curves))}")
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for name, values in curves.items():
        values = _to_numpy(values)
        if values.ndim == 1:
            values = values[None]
        if values.ndim != 2 or values.shape[1] < 2:
            raise ValueError(f"curve {name!r} must be [K] or [B, K] with K >= 2, got {values.shape}")
        mean = values.mean(axis=0)
        x = np.linspace(0.0, 1.0, len(mean))
        label = f"{name} (AUC {float(aucs[name]):.3f})" if name in aucs else name
        (line,) = ax.plot(x, mean, label=label)
        if len(values) > 1:
            std = values.std(axis=0)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set(title=title, xlabel="fraction of patches", ylabel=ylabel, xlim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)


def plot_training_history(history: list[dict], warm_start: int | None = None) -> Image.Image:
    """Loss, accuracy and learning rate per epoch, like the report's training-statistics figure;
    `warm_start`: the epoch after which a run started from these weights (`--init-from`), marked
    (0 or None: no warm start)."""
    fig = Figure(figsize=(12, 3.6))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [h["epoch"] for h in history]
    if warm_start:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(warm_start + 0.5, color="grey", linestyle="--", linewidth=1, label="warm start")
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax_acc.set(title="accuracy", xlabel="epoch")
    ax_lr.plot(epochs, [h["lr"] for h in history])
    ax_lr.set(title="learning rate", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_image(fig)


def plot_confusion(confusion, class_names: list[str]) -> Image.Image:
    """Confusion matrix (rows: true class, columns: predicted), each row as a fraction, with counts."""
    counts = _to_numpy(confusion).astype(np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true class", title="confusion matrix (test)")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    return figure_to_image(fig)


# ----------------------------------------------------------------------------------------------
# Model anatomy (vit_core.anatomy): figures of the model itself, not of one image

def _rows_of_tiles(tiles: list[Image.Image], columns: int, spacing: int = 6) -> Image.Image:
    """Tiles laid out left to right in rows of `columns`, rows top-aligned, on white."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = [_hstack(tiles[i:i + columns], spacing) for i in range(0, len(tiles), columns)]
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + spacing * (len(rows) - 1)),
                    BACKGROUND)
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height + spacing
    return out


def plot_attention_distance(distance, reference: float | None = None) -> Image.Image:
    """Mean attention distance by depth (Dosovitskiy et al. 2021, Fig. 7 right): x = layer, y =
    distance in pixels, one dot per head (colour = head); `reference`, e.g. the distance of
    uniform attention, is drawn as a dashed line."""
    distance = _to_numpy(distance)
    if distance.ndim != 2 or not distance.size:
        raise ValueError(f"distance must be [L, H], got shape {distance.shape}")
    n_layers, n_heads = distance.shape
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.subplots()
    layers = np.arange(1, n_layers + 1)
    for head in range(n_heads):
        ax.scatter(layers, distance[:, head], s=22, alpha=0.8, label=f"head {head + 1}")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set(xlabel="layer", ylabel="mean attention distance (pixels)", xticks=layers, ylim=(0, None),
           title="how far each head looks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return figure_to_image(fig)


def entropy_heatmap(entropy, max_entropy: float | None = None) -> Image.Image:
    """Attention entropy [L, H] in nats as a layer x head heatmap with the values written in;
    the colour scale runs from 0 to `max_entropy` (uniform attention) when given."""
    entropy = _to_numpy(entropy)
    if entropy.ndim != 2 or not entropy.size:
        raise ValueError(f"entropy must be [L, H], got shape {entropy.shape}")
    n_layers, n_heads = entropy.shape
    fig = Figure(figsize=(1.6 + 0.7 * n_heads, 1.2 + 0.42 * n_layers))
    ax = fig.subplots()
    top = max_entropy if max_entropy is not None else float(entropy.max())
    shown = ax.imshow(entropy, cmap="magma", vmin=0, vmax=top, aspect="auto")
    ax.set_xticks(range(n_heads), [str(h + 1) for h in range(n_heads)])
    ax.set_yticks(range(n_layers), [str(layer + 1) for layer in range(n_layers)])
    ax.set(xlabel="head", ylabel="layer", title="attention entropy (nats)")
    for i in range(n_layers):
        for j in range(n_heads):
            ax.text(j, i, f"{entropy[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if entropy[i, j] > 0.6 * top else "white")
    fig.colorbar(shown, ax=ax, fraction=0.05)
    fig.tight_layout()
    return figure_to_image(fig)


def position_similarity_grid(similarity, cell: int = 4, gap: int = 2, cmap: str = "viridis") -> Image.Image:
    """Cosine similarity of position embeddings [N, N] (N = g * g) as a g x g grid of g x g maps
    (Dosovitskiy et al. 2021, Fig. 7 centre): the tile at row r, column c shows how similar patch
    r * g + c's embedding is to every patch's, on a fixed scale from -1 (dark) to 1 (bright)."""
    values = _to_numpy(similarity)
    grid = int(round(np.sqrt(values.shape[0]))) if values.ndim == 2 else 0
    if values.ndim != 2 or values.shape[0] != values.shape[1] or grid * grid != values.shape[0]:
        raise ValueError(f"similarity must be [N, N] with N a square, got shape {values.shape}")
    if int(cell) != cell or cell < 1 or gap < 0:
        raise ValueError(f"cell must be a positive integer and gap >= 0, got {cell}, {gap}")
    colors = _colorize((np.clip(values, -1, 1) + 1) / 2, cmap)  # [N, N, 3]
    tiles = colors.reshape(grid, grid, grid, grid, 3).repeat(cell, axis=2).repeat(cell, axis=3)
    tile = grid * cell
    canvas = np.full((grid * (tile + gap) + gap,) * 2 + (3,), 255, dtype=np.uint8)
    blocks = canvas[gap:, gap:].reshape(grid, tile + gap, grid, tile + gap, 3)
    blocks[:, :tile, :, :tile] = tiles.transpose(0, 2, 1, 3, 4)  # [tile row, y, tile col, x, 3]
    return Image.fromarray(canvas)


def filter_grid(filters, ratios=None, scale: int = 8, columns: int = 7) -> Image.Image:
    """Patch-embedding filters [k, C, p, p] (C = 3: RGB, C = 1: grey) as small images, each
    min-max scaled over all its channels and enlarged `scale` times, titled with the share of
    variance it explains when `ratios` [k] is given (Dosovitskiy et al. 2021, Fig. 7 left)."""
    filters = _to_numpy(filters)
    if filters.ndim != 4 or filters.shape[1] not in (1, 3) or not len(filters):
        raise ValueError(f"filters must be [k, 3 or 1, p, p], got shape {filters.shape}")
    ratios = None if ratios is None else _to_numpy(ratios)
    if ratios is not None and ratios.shape != (len(filters),):
        raise ValueError(f"{ratios.shape} ratios for {len(filters)} filters")
    tiles = []
    for index, weights in enumerate(filters):
        pixels = np.round(normalize_map(weights) * 255).astype(np.uint8).transpose(1, 2, 0)
        image = Image.fromarray(np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels)
        title = f"{ratios[index] * 100:.1f}%" if ratios is not None else f"{index + 1}"
        tiles.append(_with_title(upscale_nearest(image, scale), title, font_size=9))
    return _rows_of_tiles(tiles, columns, spacing=4)


def _missing_tile(side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), (200, 200, 200))
    ImageDraw.Draw(tile).text((side // 2, side // 2), "no images", fill=TEXT_COLOR, font=_font(10), anchor="mm")
    return tile


def class_map_grid(maps, class_names: list[str], images: list[Image.Image | None] | None = None,
                   counts=None, side: int = 96, columns: int = 5, alpha: float = 0.5,
                   cmap: str = "jet") -> Image.Image:
    """One map per class [n, g, g], each normalised on its own and titled with its class name
    (and image count when `counts` is given): a heatmap `side` pixels wide, or overlaid on that
    class's image from `images`. A class whose map is all NaN (no images) gets a grey tile."""
    maps = _to_numpy(maps)
    if maps.ndim != 3 or len(maps) != len(class_names):
        raise ValueError(f"maps must be [n_classes, g, g] with one per class name, got shape "
                         f"{maps.shape} for {len(class_names)} names")
    if images is not None and len(images) != len(maps):
        raise ValueError(f"{len(images)} images for {len(maps)} classes")
    tiles = []
    for index, (patch_map, name) in enumerate(zip(maps, class_names)):
        image = images[index] if images is not None else None
        if not np.isfinite(patch_map).any():
            tile = _missing_tile(side)
        elif image is not None:
            tile = overlay_map(image, patch_map, alpha=alpha, cmap=cmap, scale=max(1, side // image.width))
        else:
            tile = Image.fromarray(_map_colors(patch_map, (side, side), cmap))
        title = name if counts is None else f"{name} ({int(_to_numpy(counts)[index])})"
        tiles.append(_with_title(tile, title, font_size=11))
    return _rows_of_tiles(tiles, columns, spacing=4)
