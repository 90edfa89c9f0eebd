"""End to end in a real browser: Playwright drives Debian's Chromium against the launched app.

Needs `playwright` (requirements-dev.txt) and /usr/bin/chromium (`make browser`); skipped
otherwise. Every test opens its own page (a fresh browser context) on one shared server, so each
passes alone and in any order; no page may fetch anything from outside the app. Screenshots go to
tests/artifacts/ (git-ignored): app_1280x720.png and app_model_tab.png are the pictures README
shows (docs/screenshot.png, docs/model_tab.png), and app_390x844.png the phone's view."""

from __future__ import annotations

from pathlib import Path

import pytest

import demo.app as app
from demo.evidence import Evidence
from demo.panels import GAP, MODEL_FIGURES, SCALE
from toys import CHROMIUM, tiny_vit
from vit_core import CIFAR10_CLASSES

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
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
        evidence = Evidence.load(model, app.DEFAULT_CHECKPOINT, app.EXAMPLES_DIR)  # as main() reads it
    else:
        model, evidence = tiny_vit(), None
    demo = app.build_demo(model, evidence=evidence)
    app.launch(demo, block=False, quiet=True)
    yield demo
    demo.close()


def open_page(browser, server, width: int = 1440, height: int = 900):
    """Yields a new page (its own browser context) of `width` x `height` CSS pixels on the app,
    ready for an upload; then closes it and checks it requested nothing outside the app."""
    page = browser.new_page(viewport={"width": width, "height": height})
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


@pytest.fixture
def page(browser, server):
    yield from open_page(browser, server)


@pytest.fixture
def projector(browser, server):
    """A 1280x720 page: what a projector shows."""
    yield from open_page(browser, server, 1280, 720)


@pytest.fixture
def phone(browser, server):
    """A 390x844 page: a phone opening the share link."""
    yield from open_page(browser, server, 390, 844)


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



# ------------------------------------------------------------------------------------------------
# In front of an audience: a projector, a phone, a keyboard

def box(page, elem_id: str) -> dict:
    found = page.locator(f"#{elem_id}").first.bounding_box()
    assert found is not None, f"#{elem_id} is not shown"
    return found


def wait_for_trust(page) -> None:
    page.wait_for_function("document.querySelector('#trust').innerText.includes('of random maps on this image')")


def test_a_projector_shows_image_prediction_map_and_matrices_without_scrolling(projector):
    upload(projector, DOG)
    wait_for_trust(projector)
    header = projector.locator("#header").inner_text()
    assert "test accuracy" in header and "Showing" in header
    assert projector.evaluate("window.scrollY") == 0
    for elem_id in ("image-in", "top5", "info", "method", "trust", "overlay", "matrices"):
        found = box(projector, elem_id)
        assert found["x"] >= 0 and found["y"] >= 0, elem_id
        assert found["x"] + found["width"] <= 1280 and found["y"] + found["height"] <= 720, (elem_id, found)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    projector.screenshot(path=str(ARTIFACTS / "app_1280x720.png"))


def test_a_phone_shows_upload_prediction_and_main_map_first(phone):
    # Not `upload`: the browser loads the images far below the fold only when scrolled to.
    phone.locator("#image-in input[type=file]").set_input_files(str(DOG))
    wait_for_image(phone, "overlay")
    phone.wait_for_function("document.querySelector('#info').innerText.includes('Prediction')")
    wait_for_trust(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    tops = {elem_id: box(phone, elem_id)["y"] for elem_id in
            ("image-in", "top5", "info", "overlay", "controls", "token-attention", "patch-grid", "model-view",
             "matrices", "layer-strip", "matrix", "examples")}
    assert tops["image-in"] < tops["top5"] < tops["info"] < tops["overlay"]
    later = {elem_id: y for elem_id, y in tops.items() if elem_id not in ("image-in", "top5", "info", "overlay")}
    assert min(later.values()) > tops["overlay"], tops
    for elem_id in ("image-in", "overlay", "method", "examples"):
        assert box(phone, elem_id)["width"] <= 390, elem_id
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    phone.screenshot(path=str(ARTIFACTS / "app_390x844.png"))
    phone.screenshot(path=str(ARTIFACTS / "app_390x844_full.png"), full_page=True)


FOCUS = """() => { let e = document.activeElement; while (e && !e.id) e = e.parentElement; return e ? e.id : null; }"""


def tab_through(page, presses: int) -> list[str | None]:
    """The id of the nearest element with one around the focus after each Tab."""
    reached = []
    for _ in range(presses):
        page.keyboard.press("Tab")
        reached.append(page.evaluate(FOCUS))
    return reached


def test_the_keyboard_reaches_every_control(page):
    upload(page, DOG)
    page.locator("#image-in button").first.focus()
    reached = tab_through(page, 100)
    for elem_id in ("examples", "method", "target", "head-fusion", "discard", "opacity", "layer", "head",
                    "patch", "trust-more", "compare-tab-button", "faithfulness-tab-button", "model-tab-button",
                    "export-tab-button"):
        assert elem_id in reached, elem_id
    # The patch number is the keyboard's way to follow a patch (a click on a panel is the mouse's).
    page.locator("#patch input").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type("27")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#info').innerText.includes('patch 27')")
    # A tab opened from the keyboard: its buttons come next in the Tab order.
    for tab, buttons in [("faithfulness", ("faith-button", "sanity-button")), ("export", ("export-button",))]:
        page.locator(f"#{tab}-tab-button").focus()
        page.keyboard.press("Enter")
        reached = tab_through(page, 8)
        assert set(buttons) <= set(reached), (tab, reached)


def test_compare_and_model_tabs(projector):
    upload(projector, DOG)
    wait_for_trust(projector)
    projector.get_by_role("tab", name="Compare").click()
    wait_for_image(projector, "compare")
    table = projector.locator("#compare-table").inner_text()
    assert "LRP (composite)" in table and "rollout" in table
    assert "test set" in projector.locator("#test-set").inner_text().lower()
    projector.get_by_role("tab", name="Model").click()
    projector.wait_for_function("document.querySelector('#anatomy-info').innerText.includes('images')")
    for figure in MODEL_FIGURES:
        wait_for_image(projector, figure.name.replace("_", "-"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    projector.locator("#model-tab").screenshot(path=str(ARTIFACTS / "app_model_tab.png"))
