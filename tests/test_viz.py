"""Drawing helpers: geometry, colours and index lookups checked pixel by pixel."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from vit_core import viz


def lut(cmap: str, value: float) -> np.ndarray:
    return np.round(np.array(matplotlib.colormaps[cmap](value)[:3]) * 255).astype(np.uint8)


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------- maps

def test_normalize_map_min_max_and_constant():
    out = viz.normalize_map(torch.tensor([[2.0, 4.0], [6.0, 10.0]]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])
    assert np.array_equal(viz.normalize_map(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    np.testing.assert_allclose(viz.normalize_map(np.array([-1.0, 1.0])), [0.0, 1.0])


def test_upscale_nearest_replicates_pixels(image):
    big = viz.upscale_nearest(image, 3)
    assert big.size == (96, 96) and big.mode == "RGB"
    a, b = np.asarray(image), np.asarray(big)
    assert np.array_equal(b[::3, ::3], a) and np.array_equal(b[2::3, 1::3], a)
    with pytest.raises(ValueError):
        viz.upscale_nearest(image, 0)


# ---------------------------------------------------------------------------------------------- patch grid

def test_patch_grid_geometry_and_pixels(image):
    scale, gap, p = 2, 3, 4
    grid = viz.patch_grid(image, p, scale=scale, gap=gap, numbered=False)
    cell, g = p * scale, 8
    assert grid.mode == "RGB" and grid.size == (g * cell + (g + 1) * gap,) * 2
    pixels, big = np.asarray(grid), np.asarray(viz.upscale_nearest(image, scale))
    for index in (0, 5, 13, 63):
        r, c = divmod(index, g)
        y0, x0 = gap + r * (cell + gap), gap + c * (cell + gap)
        assert np.array_equal(pixels[y0:y0 + cell, x0:x0 + cell], big[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell])
    assert (pixels[:gap] == 255).all() and (pixels[:, :gap] == 255).all()      # outer frame
    assert (pixels[:, gap + cell:gap + cell + gap] == 255).all()              # gap after column 0
    assert (pixels[gap + cell:2 * gap + cell] == 255).all()                  # gap after row 0


def test_patch_grid_numbers_and_highlight(image):
    plain = np.asarray(viz.patch_grid(image, 4, numbered=False))
    numbered = np.asarray(viz.patch_grid(image, 4, numbered=True))
    differs = (plain != numbered).any(-1)
    # Numbers sit in each patch's top-left corner: patch 9 (row 1, col 1) starts at 2 + 34 = 36.
    assert differs[36:44, 36:44].any() and not differs[56:66, 56:66].any()
    lit = np.asarray(viz.patch_grid(image, 4, numbered=False, highlight=9))
    changed = (lit != plain).any(-1)
    ys, xs = np.nonzero(changed)
    # The outline frames patch 9 (pixels 36..67) in its surrounding gap.
    assert ys.min() == 34 and ys.max() == 69 and xs.min() == 34 and xs.max() == 69
    assert (lit[changed] == viz.HIGHLIGHT_COLOR).all()
    with pytest.raises(ValueError):
        viz.patch_grid(image, 4, highlight=64)
    with pytest.raises(ValueError):
        viz.patch_grid(image, 5)


def test_patch_grid_index_round_trip():
    g, p, scale, gap = 8, 4, 8, 2
    cell = p * scale
    for index in range(g * g):
        r, c = divmod(index, g)
        x0, y0 = gap + c * (cell + gap), gap + r * (cell + gap)
        for x, y in ((x0, y0), (x0 + cell - 1, y0 + cell - 1), (x0 + cell / 2, y0 + 0.5)):
            assert viz.patch_grid_index(x, y, g, p, scale, gap) == index
    assert viz.patch_grid_index(0, 50, g, p, scale, gap) is None             # outer frame
    assert viz.patch_grid_index(gap + cell, 50, g, p, scale, gap) is None    # gap between columns
    assert viz.patch_grid_index(50, gap + cell + 1, g, p, scale, gap) is None
    side = g * cell + (g + 1) * gap
    assert viz.patch_grid_index(side - 1, 50, g, p, scale, gap) is None
    assert viz.patch_grid_index(side + 10, 50, g, p, scale, gap) is None
    assert viz.patch_grid_index(-1, 50, g, p, scale, gap) is None


def test_patch_index_at_plain_image():
    assert viz.patch_index_at(0, 0, 256, 256, 8) == 0
    assert viz.patch_index_at(255, 0, 256, 256, 8) == 7
    assert viz.patch_index_at(40, 33, 256, 256, 8) == 9   # row 1, col 1
    assert viz.patch_index_at(255.9, 255.9, 256, 256, 8) == 63
    assert viz.patch_index_at(-5, 300, 256, 256, 8) == 56  # clamped: row 7, col 0
    assert viz.patch_index_at(99, 10, 100, 50, 4) == 3


# ---------------------------------------------------------------------------------------------- overlays

def test_overlay_map_blends_crisp_patches(image):
    patch_map = torch.zeros(8, 8)
    patch_map[2, 5] = 3.0   # patch 21 is the maximum
    patch_map[7, 0] = 1.0
    base = np.asarray(viz.upscale_nearest(image, 8)).astype(int)
    solid = np.asarray(viz.overlay_map(image, patch_map, alpha=1.0, cmap="jet"))
    assert solid.shape == (256, 256, 3)
    # Patches are 4 px scaled by 8 = 32 px: patch (2, 5) covers rows 64..95, columns 160..191.
    assert (solid[64:96, 160:192] == lut("jet", 1.0)).all()           # whole patch, one colour
    assert (solid[224:256, 0:32] == lut("jet", 1 / 3)).all()
    assert (solid[0:32, 0:32] == lut("jet", 0.0)).all()
    assert not (solid[64:96, 192:224] == lut("jet", 1.0)).all()
    blocks = solid.reshape(8, 32, 8, 32, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()                     # crisp: constant within each patch
    none = np.asarray(viz.overlay_map(image, patch_map, alpha=0.0)).astype(int)
    assert np.array_equal(none, base)
    half = np.asarray(viz.overlay_map(image, patch_map, alpha=0.5)).astype(int)
    assert np.abs(half - (base + solid.astype(int)) / 2).max() <= 1


def test_overlay_map_highlight_and_errors(image):
    patch_map = np.random.default_rng(1).random((8, 8))
    plain = np.asarray(viz.overlay_map(image, patch_map))
    lit = np.asarray(viz.overlay_map(image, patch_map, highlight=10))
    ys, xs = np.nonzero((plain != lit).any(-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (32, 63, 64, 95)   # patch 10 = row 1, col 2
    with pytest.raises(ValueError):
        viz.overlay_map(image, patch_map, alpha=1.5)
    with pytest.raises(ValueError):
        viz.overlay_map(image, np.zeros((3, 4)))
    with pytest.raises(ValueError):
        viz.overlay_map(image, patch_map, cmap="no-such-map")


def test_map_strip_tiles(image):
    maps = torch.rand(6, 8, 8)
    strip = viz.map_strip(maps, image, scale=4)
    assert strip.mode == "RGB" and strip.width >= 6 * 128 and strip.height > 128
    bare = viz.map_strip(maps)                    # no image: 4 * scale pixels per cell
    assert bare.width >= 6 * 128
    one = viz.map_strip(maps[:1], titles=[""])
    assert one.size == (128, 128)
    # Each tile is normalised on its own: a constant-plus-peak map shows the colormap's top colour.
    peak = torch.zeros(1, 8, 8)
    peak[0, 0, 0] = 1e-6
    tile = np.asarray(viz.map_strip(peak, titles=[""], cmap="jet"))
    assert (tile[0, 0] == lut("jet", 1.0)).all() and (tile[-1, -1] == lut("jet", 0.0)).all()
    with pytest.raises(ValueError):
        viz.map_strip(maps, titles=["a"])
    with pytest.raises(ValueError):
        viz.map_strip(torch.rand(8, 8))


# ---------------------------------------------------------------------------------------------- matrices

def test_attention_matrix_image_cells_and_highlight():
    matrix = np.zeros((17, 17))
    matrix[3, 5] = 1.0
    bare = np.asarray(viz.attention_matrix_image(matrix, cell=4, labels=False, cmap="viridis"))
    assert bare.shape == (68, 68, 3)
    assert (bare[12:16, 20:24] == lut("viridis", 1.0)).all()
    assert (bare[0:4, 0:4] == lut("viridis", 0.0)).all()
    lit = np.asarray(viz.attention_matrix_image(matrix, cell=4, labels=False, highlight_token=2))
    ys, xs = np.nonzero((lit != bare).any(-1))
    on_row = (ys >= 8) & (ys < 12)
    on_col = (xs >= 8) & (xs < 12)
    assert (on_row | on_col).all()
    assert (on_row & ~on_col).any() and (on_col & ~on_row).any()  # both the row and the column
    with pytest.raises(ValueError):
        viz.attention_matrix_image(matrix, highlight_token=17)
    with pytest.raises(ValueError):
        viz.attention_matrix_image(np.zeros((3, 4)))


def test_attention_matrix_image_labels_add_margins():
    matrix = torch.rand(65, 65)
    bare = viz.attention_matrix_image(matrix, cell=4, labels=False)
    labelled = viz.attention_matrix_image(matrix, title="block 6", cell=4, labels=True)
    assert labelled.width > bare.width and labelled.height > bare.height + 20
    pixels = np.asarray(labelled)
    # The heatmap is pasted unchanged inside the labelled image.
    found = any(np.array_equal(pixels[y:y + 260, x:x + 260], np.asarray(bare))
                for y in range(labelled.height - 259) for x in range(labelled.width - 259))
    assert found


def test_pool_blocks_is_the_mean_of_each_block_ragged_edges_included():
    values = np.arange(49, dtype=np.float64).reshape(7, 7)
    pooled = viz.pool_blocks(values, 3)
    assert pooled.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            assert pooled[i, j] == values[3 * i:3 * i + 3, 3 * j:3 * j + 3].mean()
    assert viz.pool_blocks(values, 1) is values


def test_a_shrunk_matrix_draws_block_means_and_keeps_the_highlight():
    matrix = torch.rand(9, 9, generator=torch.Generator().manual_seed(0))
    shrunk = viz.attention_matrix_image(matrix, cell=1, labels=False, shrink=3)
    means = viz.attention_matrix_image(viz.pool_blocks(matrix.double().numpy(), 3), cell=1, labels=False)
    assert shrunk.size == (3, 3) and np.array_equal(np.asarray(shrunk), np.asarray(means))
    lit = np.asarray(viz.attention_matrix_image(matrix, cell=4, labels=False, shrink=3, highlight_token=7))
    assert tuple(lit[8, 1]) == viz.HIGHLIGHT_COLOR and tuple(lit[4, 1]) != viz.HIGHLIGHT_COLOR  # token 7: block 2
    with pytest.raises(ValueError, match="shrink"):
        viz.attention_matrix_image(matrix, shrink=2)  # axis labels would name the wrong tokens
    with pytest.raises(ValueError, match="highlight_token"):
        viz.attention_matrix_image(matrix, labels=False, shrink=3, highlight_token=9)


def test_attention_matrix_grid_side_by_side():
    mats = torch.rand(6, 17, 17)
    grid = viz.attention_matrix_grid(mats, cell=2)
    assert grid.mode == "RGB" and grid.width >= 6 * 34 and grid.height > 34
    assert viz.attention_matrix_grid(mats[:2], titles=["", ""], cell=3).size == (2 * 51 + 6, 51)
    with pytest.raises(ValueError):
        viz.attention_matrix_grid(mats, titles=["only one"])


# ---------------------------------------------------------------------------------------------- figures

def test_plot_curves_and_training_history():
    img = viz.plot_curves({"rollout": np.linspace(1, 0, 65), "random": np.random.rand(4, 65)}, "deletion")
    assert img.mode == "RGB" and img.width > 100 and img.height > 100
    with pytest.raises(ValueError):
        viz.plot_curves({}, "empty")
    with pytest.raises(ValueError):
        viz.plot_curves({"short": np.array([1.0])}, "too short")
    # The legend shows the AUCs the caller measured; drawing computes none itself.
    curve = {"rollout": np.linspace(1, 0, 65)}
    with_auc = np.asarray(viz.plot_curves(curve, "deletion", aucs={"rollout": 0.5}))
    assert not np.array_equal(with_auc, np.asarray(viz.plot_curves(curve, "deletion")))
    with pytest.raises(ValueError, match="not drawn"):
        viz.plot_curves(curve, "deletion", aucs={"random": 0.5})
    history = [dict(epoch=e, train_loss=1 / e, val_loss=1 / e, train_acc=e / 10, val_acc=e / 11, lr=1e-3)
               for e in range(1, 4)]
    assert viz.plot_training_history(history).mode == "RGB"


def test_drawing_leaves_pyplot_alone():
    import sys
    viz.plot_curves({"a": np.linspace(0, 1, 5)}, "t")
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []
