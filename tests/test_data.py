import pytest
import torch

from toys import make_image_folder
from vit_core.data import DataError, augment, cutmix, load_split, mix, mixup, random_erase, split_validation


def test_image_folder_loads_into_uint8_tensors(toy_data):
    train = load_split(toy_data, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape == (96, 3, 32, 32)
    assert train.classes == ["blue", "red"]
    assert train.labels.tolist() == [0] * 48 + [1] * 48
    # Class colours survive decoding: red images have more red than blue.
    red = train.images[train.labels == 1].float()
    assert red[:, 0].mean() > red[:, 2].mean() + 50


def test_limit_keeps_a_fixed_random_subset(toy_data):
    a = load_split(toy_data, "train", limit=20, seed=1)
    b = load_split(toy_data, "train", limit=20, seed=1)
    assert len(a) == 20 and torch.equal(a.images, b.images)
    assert set(a.labels.tolist()) == {0, 1}


def test_validation_split_is_fixed_and_disjoint(toy_data):
    train = load_split(toy_data, "train")
    rest, val = split_validation(train, 16, seed=0)
    rest2, val2 = split_validation(train, 16, seed=0)
    assert len(val) == 16 and len(rest) == 80 and torch.equal(val.images, val2.images)
    flat = lambda t: {bytes(x.numpy().tobytes()) for x in t.images}  # noqa: E731
    assert not flat(rest) & flat(val)
    with pytest.raises(ValueError, match="validation size"):
        split_validation(train, 96)


def test_missing_data_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="--data") as info:
        load_split(tmp_path / "nowhere", "train")
    assert "--download" in str(info.value)


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_split(tmp_path, "train")


def test_unreadable_image_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path, per_class=4)
    (tmp_path / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="could not read"):
        load_split(tmp_path, "train")


def test_crop_augmentation_is_an_exact_pixel_shift_or_flip():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = augment(images, "crop", torch.Generator().manual_seed(0), pad=2)
    for original, shifted in zip(images, out):
        candidates = []
        for flip in (False, True):
            src = original.flip(-1) if flip else original
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
            candidates += [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted, c) for c in candidates)


def test_augmentations_vary_per_image_and_keep_shape():
    images = torch.randn(64, 3, 32, 32)
    for policy in ("crop", "rrc", "none"):
        out = augment(images.clone(), policy, torch.Generator().manual_seed(0))
        assert out.shape == images.shape
    flipped = augment(images, "none", torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images))
    n_same = sum(torch.equal(f, i) for f, i in zip(flipped, images))
    assert n_flipped + n_same == 64 and 10 < n_flipped < 54
    crops = augment(images, "rrc", torch.Generator().manual_seed(0))
    assert not torch.allclose(crops, images)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(images, "mixup")


def test_augmentation_is_reproducible_from_the_generator():
    images = torch.randn(8, 3, 32, 32)
    a = augment(images, "rrc", torch.Generator().manual_seed(5))
    b = augment(images, "rrc", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_random_erase_blanks_one_rectangle_per_chosen_image():
    images = torch.rand(64, 3, 32, 32) + 1.0  # no zeros before erasing
    out = random_erase(images, 1.0, torch.Generator().manual_seed(0))
    erased = out == 0
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    assert torch.equal(out[~erased], images[~erased])  # everything else untouched
    for mask in erased[:, 0]:
        rows, cols = mask.nonzero(as_tuple=True)
        height = int(rows.max() - rows.min()) + 1
        width = int(cols.max() - cols.min()) + 1
        assert int(mask.sum()) == height * width  # one solid rectangle
        assert 0.02 * 1024 * 0.5 <= height * width <= 1024 / 3 * 1.5  # area range, rounding aside
    sizes = {int(m.sum()) for m in erased[:, 0]}
    assert len(sizes) > 10  # sizes vary per image


def test_random_erase_probability_and_reproducibility():
    images = torch.rand(400, 3, 8, 8) + 1.0
    assert random_erase(images, 0.0) is images
    out = random_erase(images, 0.25, torch.Generator().manual_seed(1))
    share = (out == 0).flatten(1).any(1).float().mean().item()
    assert 0.17 < share < 0.33
    assert torch.equal(out, random_erase(images, 0.25, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="probability"):
        random_erase(images, 1.5)


def test_cutmix_pastes_one_box_from_the_neighbour_and_reports_each_images_own_share():
    # Image i is filled with the value i, so every pixel tells which image it came from.
    images = torch.arange(64, dtype=torch.float32)[:, None, None, None].expand(64, 3, 16, 16).clone()
    out, own = cutmix(images, 1.0, torch.Generator().manual_seed(0))
    for i in range(64):
        pasted = out[i, 0] != i
        assert torch.all(out[i, :, pasted] == (i - 1) % 64)  # from the previous image only
        assert own[i].item() == pytest.approx(1 - pasted.float().mean().item())
        if pasted.any():
            rows, cols = pasted.nonzero(as_tuple=True)
            box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
            assert int(pasted.sum()) == box  # one solid rectangle
    assert own.min() < 0.3 and own.max() > 0.9  # box sizes vary


def test_cutmix_probability_and_reproducibility():
    images = torch.arange(400, dtype=torch.float32)[:, None, None, None].expand(400, 3, 8, 8).clone()
    same, own = cutmix(images, 0.0)
    assert same is images and torch.equal(own, torch.ones(400))
    out, own = cutmix(images, 0.5, torch.Generator().manual_seed(1))
    touched = (out != images).flatten(1).any(1)
    assert torch.equal(touched, own < 1)
    assert 0.3 < touched.float().mean().item() < 0.55  # p 0.5, minus boxes that round to nothing
    again, _ = cutmix(images, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="probability"):
        cutmix(images, -0.1)


def test_mixup_blends_every_image_with_its_neighbour_by_its_reported_share():
    images = torch.randn(256, 3, 8, 8)
    out, own = mixup(images, 0.4, torch.Generator().manual_seed(0))
    expected = own[:, None, None, None] * images + (1 - own[:, None, None, None]) * images.roll(1, 0)
    assert torch.allclose(out, expected, atol=1e-6)
    assert own.min() >= 0 and own.max() <= 1
    # Beta(0.4, 0.4) piles up near 0 and 1: most images stay mostly one image, some are near halves.
    assert ((own < 0.1) | (own > 0.9)).float().mean() > 0.4 and ((own > 0.3) & (own < 0.7)).any()
    again, own_again = mixup(images, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(own, own_again)
    assert not torch.equal(own, mixup(images, 0.4, torch.Generator().manual_seed(1))[1])
    same, ones = mixup(images, 0.0)
    assert same is images and torch.equal(ones, torch.ones(256))
    with pytest.raises(ValueError, match="alpha"):
        mixup(images, -1.0)


def test_mix_with_both_on_takes_cutmix_or_mixup_per_batch():
    images = torch.arange(32, dtype=torch.float32)[:, None, None, None].expand(32, 3, 8, 8).clone()
    kinds = set()
    for seed in range(40):
        out, _ = mix(images, 1.0, 1.0, torch.Generator().manual_seed(seed))
        # Image i holds the value i: CutMix keeps whole values (its own and its neighbour's in a box),
        # mixup turns each image into one blended value, whole only where it kept all or nothing.
        whole = torch.equal(out, out.round())
        one_value_each = all(len(o.unique()) == 1 for o in out)
        kinds.add("cutmix" if whole and not one_value_each else "mixup" if one_value_each and not whole else "?")
    assert kinds == {"cutmix", "mixup"}
    assert torch.equal(mix(images, 0.5, 0.0, torch.Generator().manual_seed(3))[0],
                       cutmix(images, 0.5, torch.Generator().manual_seed(3))[0])
