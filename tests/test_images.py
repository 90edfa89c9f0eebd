"""vit_core.images: the one reader of image files (app uploads, the explain command, datasets)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toys import BAD_FILES, write_animated_gif, write_rotated_jpeg
from vit_core.images import FRAMES_KEY, FULL_SIZE_KEY, ImageError, decode_rgb, read_image, to_rgb
from vit_core.preprocessing import to_model_pixels

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "demo" / "examples" / "cat_0000.jpg"


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_get_a_clear_image_error(tmp_path, name):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(ImageError, match=message):
        read_image(path)
    with pytest.raises(ImageError, match=message):  # a file object reads the same
        with open(path, "rb") as file:
            read_image(file)
    assert issubclass(ImageError, ValueError)


def test_missing_folder_and_oversized_files(tmp_path):
    with pytest.raises(ImageError, match="missing"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="folder"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="limit is"):
        read_image(CAT, max_bytes=100)
    with pytest.raises(ImageError, match="megapixels"):
        read_image(CAT, max_pixels=32 * 32 - 1)
    assert read_image(CAT, max_pixels=32 * 32).size == (32, 32)


def test_reads_an_example_as_rgb_from_a_path_or_a_file():
    image = read_image(CAT)
    assert image.mode == "RGB" and image.size == (32, 32) and image.info[FRAMES_KEY] == 1
    with open(CAT, "rb") as file:
        same = read_image(file)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    with Image.open(CAT) as original:
        assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))


def test_animated_images_use_the_first_frame(tmp_path):
    image = read_image(write_animated_gif(tmp_path / "anim.gif"))
    assert image.info[FRAMES_KEY] == 3
    assert to_model_pixels(image, 32).getpixel((16, 16)) == (255, 0, 0)


def test_exif_orientation_and_alpha_are_honoured(tmp_path):
    path = write_rotated_jpeg(tmp_path / "rotated.jpg")
    upright = read_image(path)
    assert upright.size == (32, 64)
    top, bottom = np.asarray(upright)[8, 16], np.asarray(upright)[56, 16]
    assert top[0] > 200 and top[2] < 60       # the red half is on top once upright
    assert bottom[2] > 200 and bottom[0] < 60
    assert np.array_equal(np.asarray(decode_rgb(path)), np.asarray(upright))

    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(transparent)
    assert read_image(transparent).getpixel((10, 10)) == (255, 255, 255)
    keyed = tmp_path / "keyed.png"  # palette image with a transparent index
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(keyed, transparency=0)
    assert read_image(keyed).getpixel((5, 5)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(path)
    image = read_image(path)
    assert image.mode == "RGB" and all(abs(c - 127) <= 1 for c in image.getpixel((0, 0)))


def test_float_images_in_the_unit_range_are_scaled():
    image = to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F"))
    assert image.mode == "RGB" and all(abs(c - 127) <= 1 for c in image.getpixel((0, 0)))
    with pytest.raises(TypeError):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))


def test_decode_rgb_has_no_size_limits_but_the_same_errors(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(big)
    assert decode_rgb(big).getpixel((0, 0)) == (10, 20, 30)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="not an image"):
        decode_rgb(broken)


# ----------------------------------------------------------------------------------------------
# Large photos: JPEGs decode at the scale the caller needs, the pixel limit counts decoded pixels

@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory) -> Path:
    """An 8000×6000 (48 MP) JPEG, EXIF-rotated like a phone's portrait shot: the stored top half
    red, bottom half blue; orientation 6 turns it so red ends up on the right."""
    stored = Image.new("RGB", (8000, 6000), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8000, 3000))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path_factory.mktemp("photo") / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=80)
    return path


def test_a_48_megapixel_jpeg_is_read_at_reduced_size_quickly_and_upright(phone_photo):
    started = time.perf_counter()
    image = read_image(phone_photo, size=32)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"reading took {elapsed:.2f} s"
    assert image.info[FULL_SIZE_KEY] == (6000, 8000)          # upright full size, for messages
    assert image.size == (750, 1000)                           # libjpeg's 1/8 scale, turned upright
    left, right = np.asarray(image)[500, 100], np.asarray(image)[500, 650]
    assert right[0] > 200 and right[2] < 60 and left[2] > 200 and left[0] < 60
    # Without a size the same file is a full decode, which the pixel budget refuses.
    with pytest.raises(ImageError, match="8000×6000 pixels; the limit is 40 megapixels"):
        read_image(phone_photo)


def test_reduced_decoding_matches_a_full_decode_once_resized(tmp_path):
    ramp = np.linspace(0, 255, 1600, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp[:1200] * 0.5, ramp * 0.5), np.tile(ramp, (1200, 1)),
                       np.tile(ramp[:1200, None], (1, 1600))], axis=-1).astype(np.uint8)
    path = tmp_path / "ramp.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    reduced, full = read_image(path, size=32), read_image(path)
    assert reduced.size == (200, 150) and full.size == (1600, 1200)
    difference = np.abs(np.asarray(to_model_pixels(reduced, 32), dtype=int)
                        - np.asarray(to_model_pixels(full, 32), dtype=int))
    assert difference.mean() < 2.0 and difference.max() < 16


def test_other_formats_decode_at_full_size_under_the_same_budget(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 300), (1, 2, 3)).save(path)
    image = read_image(path, size=32)
    assert image.size == (400, 300) and image.info[FULL_SIZE_KEY] == (400, 300)
    with pytest.raises(ImageError, match="400×300 pixels; the limit is 0.1 megapixels; saved as JPEG"):
        read_image(path, size=32, max_pixels=100_000)
    jpeg = tmp_path / "wide.jpg"
    Image.new("RGB", (400, 300), (1, 2, 3)).save(jpeg)
    assert read_image(jpeg, size=32, max_pixels=100_000).size == (50, 38)  # 1/8 scale fits the budget
    with pytest.raises(ValueError, match="size must be a positive"):
        read_image(jpeg, size=0)
