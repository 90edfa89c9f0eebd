"""Reading image files: the one reader behind the app, the explain command and dataset loading.

- `read_image(path_or_file)`: a file from a user. Refuses empty, oversized (bytes or pixels),
  non-image, damaged, truncated and decompression-bomb files with an `ImageError` whose message a
  user can act on, before decoding costs much; returns an upright 8-bit RGB image.
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
MAX_PIXELS = 40_000_000      # larger images are refused from their header, before any pixel is decoded
READABLE_FORMATS = "PNG, JPEG, GIF, BMP, WebP or TIFF"
FRAMES_KEY = "frames"        # `image.info[FRAMES_KEY]`: how many frames the file held (1 unless animated)

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


def _first_frame_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened file's first frame to RGB; `info[FRAMES_KEY]` keeps the frame count."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
    image.load()  # a full decode of the frame: truncated data fails here
    if image.width == 0 or image.height == 0:
        raise ImageError("The image has no pixels.")
    rgb = to_rgb(image)
    rgb.info[FRAMES_KEY] = frames
    return rgb


def decode_rgb(source: Source) -> Image.Image:
    """A path or binary file -> upright 8-bit RGB (first frame of an animation), with PIL's own
    decompression-bomb guard but no size limits or checksum pass: for bulk loading of trusted
    datasets. Unreadable files raise ImageError."""
    with _decoding_errors(), Image.open(source) as image:
        return _first_frame_rgb(image)


def read_image(source: Source, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A path or binary file from a user -> upright 8-bit RGB PIL image (see `to_rgb`; the first
    frame of an animation, the frame count in `image.info[FRAMES_KEY]`).

    Raises ImageError, with a message meant for the user, for a missing, empty, non-image, damaged
    or truncated file, a file over `max_bytes`, an image over `max_pixels` (checked from the header,
    before decoding) and a decompression bomb. A file object is read from where it stands."""
    with _decoding_errors():
        size = _byte_size(source)
        if size == 0:
            raise ImageError("The file is empty (0 bytes).")
        if size > max_bytes:
            raise ImageError(f"The file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB.")
        start = None if isinstance(source, (str, os.PathLike)) else source.tell()
        with Image.open(source) as probe:  # reads the header only; PIL refuses gross bombs here
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageError(f"The image is {width}×{height} pixels; the limit is "
                                 f"{max_pixels / 1e6:g} megapixels.")
            probe.verify()  # structure and checksums, where the format has them
        if start is not None:
            source.seek(start)
        with Image.open(source) as image:  # verify() leaves the image unusable: open it again
            return _first_frame_rgb(image)
