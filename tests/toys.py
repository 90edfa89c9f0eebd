"""Builders for the tests: the tiny ViT, a tiny generated ImageFolder, broken image files and
gradio_client helpers for the launched app."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_core import ViTClassifier

ROOT = Path(__file__).resolve().parents[1]


# The one tiny ViT of the test suite: a few ms per forward pass on a busy CPU.
TINY = dict(image_size=32, patch_size=4, emb_size=32, depth=2, n_heads=4, mlp_ratio=2.0, dropout=0.0,
            n_classes=10)


def tiny_vit(seed: int = 0, sharpen: bool = False, **overrides) -> ViTClassifier:
    """A tiny ViT in eval mode, the same for the same seed and settings (`overrides` go to the
    constructor). With `sharpen`, attention and logits are sharper than at init (q/k weights scaled,
    larger position, CLS and head weights), so maps and class scores are not flat."""
    torch.manual_seed(seed)
    model = ViTClassifier(**{**TINY, **overrides})
    if sharpen:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.in_proj_weight.mul_(4.0)
            model.pos_embed.normal_(0, 0.5)
            model.cls_token.normal_(0, 0.5)
            model.head.weight.normal_(0, 0.5)
    return model.eval()


def make_image_folder(root: Path, classes=("blue", "red"), per_class: int = 48, seed: int = 0,
                      size: int = 32) -> Path:
    """A learnable toy dataset: each class has its own dominant colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = {0: (40, 60, 200), 1: (200, 50, 40), 2: (40, 190, 60)}
    for split, n in (("train", per_class), ("test", max(4, per_class // 4))):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.array(colours[label % 3], dtype=np.float32) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header promising width x height pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# Files every image reader must refuse: name -> (bytes factory, part of the expected message).
BAD_FILES = {
    "empty.png": (lambda: b"", "empty"),
    "notes.txt": (lambda: b"just some text, not pixels\n" * 20, "not an image"),
    "random.jpg": (lambda: os.urandom(2048), "not an image"),
    "truncated.png": (lambda: image_bytes(noise(), "PNG")[:300], "damaged or truncated"),
    "truncated.jpg": (lambda: image_bytes(noise((200, 200)), "JPEG")[:1500], "damaged or truncated"),
    "bad-crc.png": (lambda: (lambda b: b[:60] + bytes([b[60] ^ 0xFF]) + b[61:])(image_bytes(noise(), "PNG")),
                    "damaged or truncated"),
    "bomb.png": (lambda: bomb_png(20_000, 20_000), "too large"),  # 400 MP: PIL refuses at open
    "big.png": (lambda: bomb_png(8_000, 6_000), "megapixels"),   # 48 MP: over the 40 MP limit
}


def write_animated_gif(path: Path) -> Path:
    """Three 48x48 frames, red then green then blue: a reader must show the first (red)."""
    frames = [Image.new("RGB", (48, 48), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def write_rotated_jpeg(path: Path) -> Path:
    """Stored landscape 64x32, left half red, the rest blue, with EXIF orientation 6 ("rotate 90°
    clockwise to view"): read upright it is 32x64 with the red half on top."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path

def local_client(server, tmp_path_factory):
    """A fresh gradio_client session on the launched app, downloading into its own temp folder."""
    from gradio_client import Client  # imported here: most tests never launch the app

    return Client(server.local_url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("client")))


def upload(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def free_port() -> int:
    """A loopback port nobody holds now (another app, or a test's server, may hold the default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Debian's Chromium, started as the headless browser tests need it on a machine with no network.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
