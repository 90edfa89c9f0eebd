"""Reading image files: the one reader behind the app, the explain command and dataset loading.

- `read_image(path_or_file, size=None)`: a file from a user. Refuses empty, oversized (bytes, or
  pixels to decode), non-image, damaged, truncated and decompression-bomb files with an
  `ImageError` whose message a user can act on, before decoding costs much; returns an upright
  8-bit RGB image. With `size` (the smallest side the caller needs), a JPEG is decoded at a
  reduced scale (libjpeg's 1/2, 1/4 or 1/8), which makes a phone photo cheap to read.
- `decode_rgb(path_or_file)`: the same decoding without the size limits and the extra checksum
  pass, for bulk dataset loading (tens of thousands of small trusted files).
- `to_rgb(image)`: an image already in memory to upright 8-bit RGB.

Every path gives the same pixels: EXIF orientation applied, 16-bit and float images scaled (not
clipped) to 8 bits, transparency composited on white, the first frame of an animation.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 10 * 2**20  # larger files are refused before they are decoded
# Images that would decode to more pixels are refused from their header, before any pixel is
# decoded. It bounds what decoding costs, so a JPEG counts at the scale it will be decoded at.
MAX_PIXELS = 40_000_000
READABLE_FORMATS = "PNG, JPEG, GIF, BMP, WebP or TIFF"
FRAMES_KEY = "frames"        # `image.info[FRAMES_KEY]`: how many frames the file held (1 unless animated)
FULL_SIZE_KEY = "full_size"  # `image.info[FULL_SIZE_KEY]`: upright (width, height) before any reduced decoding

Source = Union[str, os.PathLike, BinaryIO]


class ImageError(ValueError):
    """A file that is not a readable image within the limits; the message says what is wrong."""


# ----------------------------------------------------------------------------------------------
# Pixels in memory

def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float images, which PIL would clip when converting to RGB,
    scaled to 8-bit grey: integers from the 16-bit range, floats from [0, 1] when they fit it."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    elif image.mode != "F":
        values = values / 257.0
    return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).astype(np.uint8), mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB: EXIF orientation applied, 16-bit and float pixels
    scaled to 8 bits, transparency composited on white."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image = _to_8bit(ImageOps.exif_transpose(image))
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Files

@contextlib.contextmanager
def _decoding_errors() -> Iterator[None]:
    """Turns what opening and decoding a file can raise into an ImageError with a plain message."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("The file is missing (no such file).") from None
    except IsADirectoryError:
        raise ImageError("That is a folder, not an image file.") from None
    except PermissionError:
        raise ImageError("The file cannot be read (permission denied).") from None
    except Image.DecompressionBombError:
        raise ImageError("The image is too large to decode safely (possible decompression bomb).") from None
    except UnidentifiedImageError:
        raise ImageError(f"This file is not an image I can read; it must be a {READABLE_FORMATS} "
                         "file.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # truncated or corrupt data
        raise ImageError(f"The image file is damaged or truncated and cannot be decoded ({error}).") from None


def _byte_size(source: Source) -> int:
    """Bytes from here to the end of the file, leaving a file object where it was."""
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise IsADirectoryError(source)
        return os.path.getsize(source)
    start = source.tell()
    end = source.seek(0, os.SEEK_END)
    source.seek(start)
    return end - start


def _reduce(image: Image.Image, size: int | None) -> None:
    """Before decoding: asks a JPEG decoder for the smallest scale (1, 1/2, 1/4 or 1/8) that keeps
    both sides at least `size` (other formats decode at full size)."""
    if size is not None and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (size, size))


def _first_frame_rgb(image: Image.Image, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode an opened file's first frame to RGB, JPEGs reduced for `size` (see `_reduce`), and
    refused over `max_pixels` decoded pixels; `info[FRAMES_KEY]` keeps the frame count and
    `info[FULL_SIZE_KEY]` the upright size before reduction."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
    full = image.size
    _reduce(image, size)
    _check_pixels(image, full, max_pixels, size)
    image.load()  # a full decode of the frame: truncated data fails here
    if image.width == 0 or image.height == 0:
        raise ImageError("The image has no pixels.")
    rgb = to_rgb(image)
    rgb.info[FRAMES_KEY] = frames
    turned = (rgb.width > rgb.height) != (image.width > image.height)  # EXIF rotated it by 90°
    rgb.info[FULL_SIZE_KEY] = full[::-1] if turned else full
    return rgb


def _check_pixels(image: Image.Image, full: tuple[int, int], max_pixels: int | None, size: int | None) -> None:
    """Refuses an opened image whose decoding (at the scale `_reduce` set) exceeds `max_pixels`."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        hint = "; saved as JPEG it would be read at a reduced size" if size is not None else ""
        raise ImageError(f"The image is {full[0]}×{full[1]} pixels; the limit is {max_pixels / 1e6:g} "
                         f"megapixels{hint}.")


def decode_rgb(source: Source) -> Image.Image:
    """A path or binary file -> upright 8-bit RGB (first frame of an animation), with PIL's own
    decompression-bomb guard but no size limits or checksum pass: for bulk loading of trusted
    datasets. Unreadable files raise ImageError."""
    with _decoding_errors(), Image.open(source) as image:
        return _first_frame_rgb(image)


def read_image(source: Source, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS,
               size: int | None = None) -> Image.Image:
    """A path or binary file from a user -> upright 8-bit RGB PIL image (see `to_rgb`; the first
    frame of an animation, the frame count in `image.info[FRAMES_KEY]`).

    `size`: the smallest width and height the caller needs (e.g. the model's input size). A JPEG
    is then decoded at the smallest of libjpeg's scales that keeps both sides at least `size`, so
    the result may be smaller than the file's pixels (`image.info[FULL_SIZE_KEY]` keeps the full
    upright size); other formats always decode at full size.

    Raises ImageError, with a message meant for the user, for a missing, empty, non-image, damaged
    or truncated file, a file over `max_bytes`, an image that would decode to more than
    `max_pixels` (checked from the header, before decoding) and a decompression bomb. A file
    object is read from where it stands."""
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    with _decoding_errors():
        size_bytes = _byte_size(source)
        if size_bytes == 0:
            raise ImageError("The file is empty (0 bytes).")
        if size_bytes > max_bytes:
            raise ImageError(f"The file is {size_bytes / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB.")
        start = None if isinstance(source, (str, os.PathLike)) else source.tell()
        with Image.open(source) as probe:  # reads the header only; PIL refuses gross bombs here
            full = probe.size
            _reduce(probe, size)
            _check_pixels(probe, full, max_pixels, size)
            probe.verify()  # structure and checksums, where the format has them
        if start is not None:
            source.seek(start)
        with Image.open(source) as image:  # verify() leaves the image unusable: open it again
            return _first_frame_rgb(image, size, max_pixels)
