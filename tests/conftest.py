"""Shared fixtures: tiny models so every test runs in well under a second on a busy CPU."""

from __future__ import annotations

import pytest
import torch

from toys import local_client, make_image_folder, tiny_vit
from vit_core import ViTClassifier


@pytest.fixture
def tiny_model() -> ViTClassifier:
    """16x16 images in 4x4 patches of 4 px, sharpened (see `toys.tiny_vit`)."""
    return tiny_vit(image_size=16, sharpen=True)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_data(tmp_path):
    """A tiny generated ImageFolder with train/ and test/ (two colour classes)."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def server(model):
    """The app launched on a loopback port, serving the test module's own `model` fixture."""
    import demo.app as app  # imported here: most tests never launch the app

    demo = app.build_demo(model)
    app.launch(demo, block=False, quiet=True)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return local_client(server, tmp_path_factory)


@pytest.fixture(scope="module")
def browser(server):
    """Headless Debian Chromium driven by Playwright, once the test module's `server` is up."""
    from playwright.sync_api import sync_playwright

    from toys import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
