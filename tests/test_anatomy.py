"""Model anatomy (vit_core.anatomy), its cache, its command and its drawings, on toy attentions and
tiny models whose answers can be worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toys import make_image_folder, tiny_vit
from vit_core import explain, load_checkpoint, preprocess, read_image, viz
from vit_core.anatomy import (
    ANATOMY_NAME,
    AnatomyError,
    attention_entropy,
    class_average_maps,
    compute_anatomy,
    load_anatomy,
    load_example_images,
    mean_attention_distance,
    patch_embedding_filters,
    position_similarity,
    save_anatomy,
    uniform_attention_distance,
    weights_digest,
)
from vit_core.cli.anatomy import main as anatomy_main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "vit-cifar10"


def attention_from_patch_rows(patch_rows: torch.Tensor, cls_share: float = 0.0) -> torch.Tensor:
    """[N, N] patch-to-patch attention -> [T, T] with T = N + 1: patch rows give `cls_share` to CLS
    and the rest in proportion to `patch_rows`; the CLS row is uniform."""
    n = patch_rows.shape[0]
    full = torch.full((n + 1, n + 1), 1.0 / (n + 1))
    full[1:, 0] = cls_share
    full[1:, 1:] = (1 - cls_share) * patch_rows / patch_rows.sum(dim=1, keepdim=True)
    return full


def right_neighbour(grid: int) -> torch.Tensor:
    """Every patch attends to the patch on its right; the last column to the one on its left."""
    rows = torch.zeros(grid * grid, grid * grid)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        rows[i, r * grid + (c + 1 if c + 1 < grid else c - 1)] = 1.0
    return rows


# ---------------------------------------------------------------------------------------------- attention distance

def test_mean_attention_distance_on_hand_worked_heads():
    grid, p = 2, 4
    self_only = attention_from_patch_rows(torch.eye(4), cls_share=0.3)
    uniform = attention_from_patch_rows(torch.ones(4, 4), cls_share=0.5)  # CLS mass is left out
    neighbour = attention_from_patch_rows(right_neighbour(grid))
    attentions = torch.stack([torch.stack([self_only, uniform]), torch.stack([neighbour, self_only])])  # [L=2, H=2]
    distance = mean_attention_distance(attentions, grid, p)
    # From any patch of a 2x2 grid: itself 0, two neighbours at p, the diagonal one at p * sqrt(2).
    by_hand = p * (0 + 1 + 1 + math.sqrt(2)) / 4
    np.testing.assert_allclose(distance, [[0.0, by_hand], [p, 0.0]], atol=1e-9)
    assert by_hand == pytest.approx(uniform_attention_distance(grid, p))


def test_mean_attention_distance_layouts_and_image_average():
    grid, p = 3, 5
    neighbour = attention_from_patch_rows(right_neighbour(grid), cls_share=0.2)
    self_only = attention_from_patch_rows(torch.eye(9))
    one = torch.stack([neighbour, self_only])[None]          # [L=1, H=2, T, T]
    np.testing.assert_allclose(mean_attention_distance(one, grid, p), [[p, 0.0]], atol=1e-9)
    # Two images: one attends to neighbours in head 0, the other to itself: the mean is p / 2.
    batch = torch.stack([one, torch.stack([self_only, self_only])[None]])  # [B=2, L=1, H=2, T, T]
    np.testing.assert_allclose(mean_attention_distance(batch, grid, p), [[p / 2, 0.0]], atol=1e-9)
    # The model's own layout: a tuple of L blocks [B, H, T, T].
    np.testing.assert_allclose(mean_attention_distance((batch[:, 0],), grid, p), [[p / 2, 0.0]], atol=1e-9)
    with pytest.raises(ValueError, match="grid"):
        mean_attention_distance(batch, 4, p)


def test_attention_entropy_uniform_one_hot_and_cls_row():
    tokens = 5
    uniform = torch.full((tokens, tokens), 1.0 / tokens)
    one_hot = torch.eye(tokens)
    cls_uniform = one_hot.clone()
    cls_uniform[0] = 1.0 / tokens
    attentions = torch.stack([uniform, one_hot, cls_uniform])[None]  # [L=1, H=3]
    np.testing.assert_allclose(attention_entropy(attentions), [[math.log(tokens), 0.0, math.log(tokens) / tokens]],
                               atol=1e-9)
    np.testing.assert_allclose(attention_entropy(attentions, cls_only=True),
                               [[math.log(tokens), 0.0, math.log(tokens)]], atol=1e-9)


# ---------------------------------------------------------------------------------------------- weights

def test_position_similarity_by_hand():
    model = tiny_vit(image_size=8)  # a 2x2 grid
    emb = model.pos_embed.shape[-1]
    e1, e2 = torch.eye(emb)[0], torch.eye(emb)[1]
    with torch.no_grad():
        model.pos_embed[0, 0] = 7.0  # CLS's embedding plays no part
        model.pos_embed[0, 1:] = torch.stack([e1, 3 * e1, e2, -e1 + e2])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(position_similarity(model), [[1, 1, 0, -r], [1, 1, 0, -r], [0, 0, 1, r],
                                                            [-r, -r, r, 1]], atol=1e-6)


def test_patch_embedding_filters_rank_one_and_layout():
    model = tiny_vit()  # patches of 3 x 4 x 4 = 48 values
    direction = torch.zeros(48)
    direction[1 * 16 + 2 * 4 + 3] = -1.0  # green channel, row 2, column 3, in patchify order
    loadings = torch.randn(model.patch_embed.out_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.patch_embed.weight.copy_(loadings[:, None] * direction)
    filters, ratio = patch_embedding_filters(model, k=3)
    assert filters.shape == (3, 3, 4, 4) and ratio.shape == (3,)
    assert ratio[0] == pytest.approx(1.0) and ratio[1:] == pytest.approx(0.0, abs=1e-9)
    expected = np.zeros((3, 4, 4))
    expected[1, 2, 3] = 1.0  # the sign is fixed so the largest entry is positive
    np.testing.assert_allclose(filters[0], expected, atol=1e-6)


def test_patch_embedding_filters_of_a_random_model_are_orthonormal_and_ordered():
    filters, ratio = patch_embedding_filters(tiny_vit(), k=10)
    flat = filters.reshape(10, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-5)
    assert (np.diff(ratio) <= 1e-7).all() and 0 < ratio.sum() <= 1 + 1e-6
    with pytest.raises(ValueError, match="k must be"):
        patch_embedding_filters(tiny_vit(), k=49)


def test_weights_digest_follows_the_weights():
    model = tiny_vit()
    assert weights_digest(model) == weights_digest(tiny_vit())
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert weights_digest(model) != weights_digest(tiny_vit())


# ---------------------------------------------------------------------------------------------- class maps

def test_class_average_maps_match_a_loop_over_images(tiny_model):
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 1, 3, 3, 1])
    maps = class_average_maps(tiny_model, images, labels, method="grad_rollout", batch_size=2)
    assert maps.shape == (10, 4, 4)
    for cls in (1, 3):
        singles = [explain(tiny_model, images[i:i + 1], target=cls).grad_rollout[0].double()
                   for i in range(5) if labels[i] == cls]
        expected = torch.stack([m / m.sum() for m in singles]).mean(dim=0)
        np.testing.assert_allclose(maps[cls], expected.numpy(), rtol=1e-4, atol=1e-7)
    assert np.isnan(maps[[0, 2, 4, 9]]).all()
    rollout = class_average_maps(tiny_model, images, labels, method="rollout", batch_size=5)
    assert rollout[3].sum() == pytest.approx(1.0) and not np.allclose(rollout[3], maps[3])
    with pytest.raises(ValueError, match="labels"):
        class_average_maps(tiny_model, images, labels[:4])
    with pytest.raises(ValueError, match="method"):
        class_average_maps(tiny_model, images, labels, method="lrp")


def test_compute_anatomy_agrees_with_its_parts_and_ignores_batching(tiny_model):
    images = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    whole = explain(tiny_model, images, target=labels)
    anatomy = compute_anatomy(tiny_model, images, labels, batch_size=3)
    np.testing.assert_allclose(anatomy.attention_distance, mean_attention_distance(whole.attentions, 4, 4), rtol=1e-5)
    np.testing.assert_allclose(anatomy.attention_entropy, attention_entropy(whole.attentions), rtol=1e-5)
    np.testing.assert_allclose(anatomy.class_maps["grad_rollout"],
                               class_average_maps(tiny_model, images, labels, "grad_rollout"), rtol=1e-4)
    assert anatomy.attention_distance.shape == anatomy.attention_entropy.shape == (2, 4)
    assert anatomy.class_counts.tolist() == [3, 2, 2] + [0] * 7
    assert (anatomy.n_images, anatomy.grouped_by, anatomy.patch_size, anatomy.grid_size) == (7, "label", 4, 4)
    assert anatomy.filters.shape == (28, 3, 4, 4) and anatomy.max_entropy == pytest.approx(math.log(17))
    assert anatomy.matches(tiny_model) and not anatomy.matches(tiny_vit())
    by_prediction = compute_anatomy(tiny_model, images, batch_size=7)
    predicted = whole.probs.argmax(dim=1)
    assert by_prediction.grouped_by == "prediction"
    assert by_prediction.class_counts.tolist() == torch.bincount(predicted, minlength=10).tolist()


# ---------------------------------------------------------------------------------------------- cache

def test_save_and_load_round_trip(tiny_model, tmp_path):
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    anatomy = compute_anatomy(tiny_model, images, torch.tensor([0, 0, 5, 9]), image_source="four noise images")
    path = save_anatomy(anatomy, tmp_path / "ckpt" / ANATOMY_NAME)
    loaded = load_anatomy(tmp_path / "ckpt")  # a folder means its anatomy.npz
    for name in ("attention_distance", "attention_entropy", "position_similarity", "filters",
                 "filter_variance", "class_counts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(anatomy, name))
    assert loaded.class_maps.keys() == anatomy.class_maps.keys()
    for method, maps in anatomy.class_maps.items():
        np.testing.assert_array_equal(loaded.class_maps[method], maps)  # NaN where a class has no images
    assert (loaded.class_names, loaded.n_images, loaded.image_source, loaded.grouped_by) == \
        (anatomy.class_names, 4, "four noise images", "label")
    assert loaded.matches(tiny_model)
    assert not list(path.parent.glob("*.tmp"))


def test_load_anatomy_refuses_bad_files_with_advice(tmp_path):
    with pytest.raises(AnatomyError, match="No anatomy cache.*vit_core.cli.anatomy"):
        load_anatomy(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(AnatomyError, match="not a readable"):
        load_anatomy(tmp_path / "text.npz")
    np.savez(tmp_path / "old.npz", format_version=np.array(0))
    with pytest.raises(AnatomyError, match="format"):
        load_anatomy(tmp_path / "old.npz")
    np.savez(tmp_path / "pickled.npz", format_version=np.array(1), attention_distance=np.array([{}], dtype=object))
    with pytest.raises(AnatomyError):
        load_anatomy(tmp_path / "pickled.npz")


def test_shipped_cache_is_small_and_describes_the_shipped_weights():
    path = SHIPPED / ANATOMY_NAME
    assert path.stat().st_size < 1_000_000
    anatomy = load_anatomy(path)
    model = load_checkpoint(SHIPPED)
    assert anatomy.matches(model), "stale cache: run python -m vit_core.cli.anatomy --checkpoint checkpoints/vit-cifar10"
    assert anatomy.attention_distance.shape == (model.depth, model.n_heads)
    assert anatomy.class_names == model.class_names and anatomy.class_counts.sum() == anatomy.n_images


# ---------------------------------------------------------------------------------------------- image set and command

def _examples(folder: Path, names: list[str], size: int = 16) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_load_example_images_reads_classes_from_names(tiny_model, tmp_path):
    folder = _examples(tmp_path / "ex", ["dog_0001.png", "cat_0000.png", "dog_0000.png"])
    images, labels = load_example_images(folder, tiny_model)
    assert labels.tolist() == [3, 5, 5]  # file-name order: cat, dog, dog
    expected = preprocess([read_image(folder / n) for n in ("cat_0000.png", "dog_0000.png", "dog_0001.png")],
                          tiny_model)
    assert torch.equal(images, expected)
    _examples(tmp_path / "bad", ["wolf_0000.png"])
    with pytest.raises(AnatomyError, match="wolf_0000.png"):
        load_example_images(tmp_path / "bad", tiny_model)
    with pytest.raises(AnatomyError, match="No example images"):
        load_example_images(tmp_path / "nowhere", tiny_model)


def test_the_app_examples_are_three_per_class():
    model = load_checkpoint(SHIPPED)
    _, labels = load_example_images(ROOT / "demo" / "examples", model)
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10


def test_command_writes_the_cache_beside_the_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    folder = _examples(tmp_path / "ex", ["cat_0000.png", "ship_0000.png"])
    threads = torch.get_num_threads()
    try:
        assert anatomy_main(["--checkpoint", str(tmp_path / "ckpt"), "--examples", str(folder),
                             "--num-threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    anatomy = load_anatomy(tmp_path / "ckpt" / ANATOMY_NAME)
    assert anatomy.n_images == 2 and anatomy.matches(tiny_model) and "2 example images" in anatomy.image_source
    assert str(tmp_path / "ckpt" / ANATOMY_NAME) in capsys.readouterr().out


def test_command_with_data_uses_a_fixed_subset(tmp_path):
    model = tiny_vit(image_size=32, n_classes=2, class_names=("blue", "red"))
    model.save_pretrained(tmp_path / "ckpt")
    data = make_image_folder(tmp_path / "data", per_class=24)  # 6 test images per class
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "-n", "5", "--batch-size", "2"]
    assert anatomy_main(argv + ["--out", str(tmp_path / "a.npz")]) == 0
    assert anatomy_main(argv + ["--out", str(tmp_path / "b.npz")]) == 0
    a, b = load_anatomy(tmp_path / "a.npz"), load_anatomy(tmp_path / "b.npz")
    assert a.n_images == 5 and a.class_counts.sum() == 5
    np.testing.assert_array_equal(a.class_maps["rollout"], b.class_maps["rollout"])


@pytest.mark.parametrize("extra, message", [
    (["--examples", "EMPTY"], "No example images"),
    (["--data", "NOWHERE"], "no CIFAR-10 found"),
])
def test_command_bad_input_is_one_line_and_status_2(tiny_model, tmp_path, capsys, extra, message):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / e) if e.isupper() else e for e in extra]
    assert anatomy_main(["--checkpoint", str(tmp_path / "ckpt"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "ckpt" / ANATOMY_NAME).exists()
    assert anatomy_main(["--checkpoint", "user/not-here"]) == 2  # no folder to write beside: needs --out


# ---------------------------------------------------------------------------------------------- drawings

def test_position_similarity_grid_tile_i_is_brightest_at_i(tiny_model):
    similarity = position_similarity(tiny_model)  # 4x4 grid
    cell, gap = 3, 2
    drawing = viz.position_similarity_grid(similarity, cell=cell, gap=gap)
    tile = 4 * cell
    assert drawing.size == (4 * (tile + gap) + gap,) * 2 and drawing.mode == "RGB"
    pixels = np.asarray(drawing).astype(float)
    luminance = pixels @ [0.299, 0.587, 0.114]
    for i in range(16):
        r, c = divmod(i, 4)
        y0, x0 = gap + r * (tile + gap), gap + c * (tile + gap)
        cells = luminance[y0:y0 + tile:cell, x0:x0 + tile:cell]  # one pixel per cell
        assert np.argmax(cells) == i
        assert (pixels[y0 - gap:y0] == 255).all()  # the white gap above the tile
    with pytest.raises(ValueError):
        viz.position_similarity_grid(np.ones((5, 5)))


def test_filter_grid_shows_each_filter_scaled(tiny_model):
    filters, ratio = patch_embedding_filters(tiny_model, k=5)
    drawing = viz.filter_grid(filters, ratio, scale=4, columns=3)
    plain = viz.filter_grid(filters, scale=4, columns=5)
    assert drawing.width < plain.width and drawing.height > plain.height  # two rows instead of one
    expected = np.round(viz.normalize_map(filters[0]) * 255).astype(np.uint8).transpose(1, 2, 0)
    pixels = np.asarray(plain)
    # The first filter's tile sits at the left under its title, one 4x4 block per weight.
    assert any(np.array_equal(pixels[y:y + 16:4, 0:16:4], expected) for y in range(pixels.shape[0] - 15))
    with pytest.raises(ValueError):
        viz.filter_grid(filters, ratio[:2])


def test_class_map_grid_tiles_titles_and_missing_classes():
    maps = np.random.default_rng(0).random((4, 8, 8))
    maps[2] = np.nan
    names = ["cat", "dog", "ship", "frog"]
    drawing = viz.class_map_grid(maps, names, counts=[3, 1, 0, 2], side=64, columns=2)
    assert drawing.mode == "RGB" and 2 * 64 < drawing.width < 2 * 64 + 40 and drawing.height > 2 * 64
    pixels = np.asarray(drawing)
    grey = (pixels == 200).all(-1)
    # The grey "no images" tile is ship's (second row, first column); frog's beside it is a map.
    assert grey[-64:, :64].mean() > 0.8 and grey[-64:, 68:].mean() < 0.05 and grey[:-64].mean() < 0.05
    # Over a black image at opacity 0.5 a tile is the heatmap at half brightness.
    black = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    heat = np.asarray(viz.class_map_grid(maps[:2], names[:2], side=64)).astype(int)
    overlaid = np.asarray(viz.class_map_grid(maps[:2], names[:2], images=[black, black], side=64)).astype(int)
    assert overlaid.shape == heat.shape
    tile = (heat[-64:, :64] != 255).any(-1)  # the first tile (no white: jet has none) fills its bottom rows
    assert tile.all() and np.abs(overlaid[-64:, :64] - heat[-64:, :64] / 2).max() <= 1
    with pytest.raises(ValueError):
        viz.class_map_grid(maps, names[:3])


def test_figures_by_depth_are_images(tiny_model):
    anatomy = compute_anatomy(tiny_model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    for drawing in (viz.plot_attention_distance(anatomy.attention_distance, anatomy.uniform_distance),
                    viz.entropy_heatmap(anatomy.attention_entropy, anatomy.max_entropy)):
        assert drawing.mode == "RGB" and drawing.width > 200 and drawing.height > 150
    with pytest.raises(ValueError):
        viz.plot_attention_distance(np.zeros(3))


def test_command_refuses_n_without_data_and_names_a_missing_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        anatomy_main(["--checkpoint", str(tmp_path / "ckpt"), "-n", "10"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: -n and --download") and err.count("\n") == 1
    assert not (tmp_path / "ckpt" / ANATOMY_NAME).exists()
    assert anatomy_main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "No checkpoint directory" in err and "--out" not in err and err.count("\n") == 1, err


def test_command_says_how_many_images_and_shows_a_bar(tmp_path, capsys):
    model = tiny_vit(image_size=32, n_classes=2, class_names=("blue", "red"))
    model.save_pretrained(tmp_path / "ckpt")
    data = make_image_folder(tmp_path / "data", per_class=8)  # 4 test images per class
    assert anatomy_main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "-n", "20",
                         "--batch-size", "3"]) == 0
    err = capsys.readouterr().err
    assert "8 test images" in err and "-n 20 asked for more" in err and "anatomy: 100%" in err and "8/8" in err
    assert load_anatomy(tmp_path / "ckpt" / ANATOMY_NAME).n_images == 8
