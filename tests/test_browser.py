"""End to end in a real browser: Playwright drives Debian's Chromium against the launched app.

Needs `playwright` (requirements-dev.txt) and /usr/bin/chromium (`make browser`); skipped
otherwise. Every test opens its own page (a fresh browser context) on one shared server, so each
passes alone and in any order; no page may fetch anything from outside the app. Screenshots go to
tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import demo.app as app
from demo.panels import GAP, SCALE
from toys import tiny_vit
from vit_core import CIFAR10_CLASSES

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PANELS = ["model-view", "patch-grid", "overlay", "token-attention", "matrix", "matrices", "layer-strip"]
TIMEOUT_MS = 60_000  # generous: the CPU may be busy with other work
DOG = ROOT / "demo" / "examples" / "dog_0001.jpg"


@pytest.fixture(scope="module")
def server():
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium (run `make browser`)")
    pytest.importorskip("playwright.sync_api")
    if (app.DEFAULT_CHECKPOINT / "model.safetensors").exists():
        model = app.load_checkpoint(app.DEFAULT_CHECKPOINT)  # the real thing, as users see it
    else:
        model = tiny_vit()
    demo = app.build_demo(model)
    app.launch(demo, block=False, quiet=True)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A new page (its own browser context) on the app, ready for an upload. Every request it
    makes outside the app is recorded in `page.external_requests`."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.external_requests = []
    local = server.local_url.rstrip("/")
    page.on("request", lambda r: None if r.url.startswith((local, "data:", "blob:"))
            else page.external_requests.append(r.url))
    page.goto(server.local_url)
    page.wait_for_selector("#image-in input[type=file]", state="attached")
    yield page
    page.context.close()
    assert page.external_requests == [], "the page fetched from outside the app"


def upload(page, path: Path = DOG) -> dict[str, str]:
    """Upload a file and wait for every panel; returns each panel's image URL."""
    page.locator("#image-in input[type=file]").set_input_files(str(path))
    sources = {panel: wait_for_image(page, panel) for panel in PANELS}
    page.wait_for_function("document.querySelector('#info').innerText.includes('Prediction')")
    return sources


def wait_for_image(page, elem_id: str, changed_from: str | None = None) -> str:
    """Wait until the panel shows a fully loaded image (a new one when `changed_from` is given)."""
    page.wait_for_function(
        """([id, old]) => { const img = document.querySelector(`#${id} img`);
             return img && img.complete && img.naturalWidth > 0 && img.src !== old; }""",
        arg=[elem_id, changed_from])
    return page.locator(f"#{elem_id} img").first.get_attribute("src")


def test_upload_renders_every_panel_and_a_click_selects_a_patch(page):
    sources = upload(page, DOG)
    info = page.locator("#info").inner_text()
    assert "true label: dog" in info
    assert any(name in page.locator("#top5").inner_text() for name in CIFAR10_CLASSES)
    for panel in PANELS:
        assert "/gradio_api/file=" in sources[panel], panel
        size = page.locator(f"#{panel} img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert min(size) >= 64, (panel, size)

    # Click the centre of patch 27 (row 3, column 3) in the patch grid, wherever it is drawn.
    # The image is letterboxed inside its <img> box (object-fit: contain).
    grid = page.locator("#patch-grid img").first
    box = grid.bounding_box()
    natural_w, natural_h = grid.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_w, box["height"] / natural_h)
    cell, gap = 4 * SCALE, GAP
    centre = gap + 3 * (cell + gap) + cell / 2
    grid.click(position={"x": (box["width"] - natural_w * scale) / 2 + centre * scale,
                         "y": (box["height"] - natural_h * scale) / 2 + centre * scale})
    page.wait_for_function("document.querySelector('#info').innerText.includes('patch 27')")
    assert page.locator("#patch input").input_value() == "27"
    for panel in ("patch-grid", "overlay", "token-attention", "matrix", "matrices"):
        wait_for_image(page, panel, changed_from=sources[panel])  # redrawn with the highlight

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"))
    page.screenshot(path=str(ARTIFACTS / "app_full.png"), full_page=True)


def test_settings_faithfulness_and_examples(page):
    before = upload(page, DOG)["overlay"]
    page.locator("#opacity input[type=number]").fill("0.9")
    page.locator("#opacity input[type=number]").press("Enter")
    wait_for_image(page, "overlay", changed_from=before)

    page.get_by_role("tab", name="Faithfulness").click()
    page.locator("#faith-button").click()
    wait_for_image(page, "deletion")
    wait_for_image(page, "insertion")
    page.wait_for_function("document.querySelector('#auc').innerText.includes('random')")

    page.locator("#examples button.thumbnail-item").first.click()  # an airplane
    page.wait_for_function("document.querySelector('#info').innerText.includes('true label: airplane')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_faithfulness.png"), full_page=True)


def test_a_bad_file_shows_a_clear_error_and_the_app_keeps_working(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.locator("#image-in input[type=file]").set_input_files(str(bad))
    page.get_by_text("This file is not an image I can read").first.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_error.png"))
    upload(page, DOG)  # the same page goes on working
    assert "true label: dog" in page.locator("#info").inner_text()


def test_nothing_is_fetched_from_outside(page):
    upload(page, DOG)
    page.get_by_role("tab", name="Faithfulness").click()
    page.get_by_role("tab", name="Export").click()
    assert page.external_requests == []

