"""The Walkthrough in a real browser: Playwright drives Debian's Chromium at 1280×720 (a projector)
through every step with the keyboard, checking that each step's figure (a canvas that is not blank)
and narration appear; then free mode, a shared link landing on the tab, and a timm ViT with 14×14
patches and no logit lens. Screenshots of two steps go to docs/ (README shows them).

Needs what test_browser.py needs (playwright, /usr/bin/chromium); skipped otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import demo.app as app
from demo.evidence import Evidence
from test_browser import open_page
from toys import CHROMIUM, tiny_vit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted(app.EXAMPLES_DIR.glob("*.jpg")) + sorted(app.EXAMPLES_DIR.glob("*.png"))
CAT = app.EXAMPLES_DIR / "cat_0000.jpg"
# Per canvas of the shown steps: does it hold more than one colour?
CANVASES_DRAWN = """section => [...section.querySelectorAll('canvas')].map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 4; i < d.length; i += 4) if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
  return false; })"""


def serve(model, evidence=None):
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium (run `make browser`)")
    pytest.importorskip("playwright.sync_api")
    demo = app.build_demo(model, evidence=evidence)
    app.launch(demo, block=False, quiet=True)
    return demo


@pytest.fixture(scope="module")
def server():
    if (app.DEFAULT_CHECKPOINT / "model.safetensors").exists():
        model = app.load_checkpoint(app.DEFAULT_CHECKPOINT)  # the real thing: the screenshots go to docs/
        demo = serve(model, Evidence.load(model, app.DEFAULT_CHECKPOINT, app.EXAMPLES_DIR))
    else:
        demo = serve(tiny_vit())
    yield demo
    demo.close()


@pytest.fixture
def projector(browser, server):
    yield from open_page(browser, server, 1280, 720)


def pick_example(page, path: Path = CAT) -> int:
    """Picks an example in the Walkthrough's own gallery; returns the number of steps."""
    page.locator("#wt-examples button.thumbnail-item").nth(EXAMPLES.index(path)).click()
    page.wait_for_function("document.querySelector('#walkthrough .wt-count').innerText.startsWith('Step 1 of')")
    page.locator("#walkthrough .wt-count").click()  # the focus off the gallery, as a presenter's click would
    return int(page.locator("#walkthrough .wt-count").inner_text().split()[-1])


def shown_step(page) -> str:
    sections = page.locator("#walkthrough section.wt-step")
    assert sections.count() == 1
    return sections.first.get_attribute("data-step")


def check_drawn(page, step: str) -> None:
    section = page.locator(f"#walkthrough section[data-step={step}]")
    assert section.locator(".wt-narration").inner_text().strip(), step
    drawn = section.evaluate(CANVASES_DRAWN)
    assert drawn and all(drawn), (step, drawn)


def screenshot(page, name: str) -> None:
    """The tabs (the Walkthrough and its tab bar) as a projector shows them, into docs/."""
    page.evaluate("document.getElementById('tabs').scrollIntoView({block: 'start'})")
    page.locator("#tabs").screenshot(path=str(DOCS / name))


def test_every_step_by_keyboard_then_free_mode(projector):
    page = projector
    assert page.locator("#walkthrough .wt-count").inner_text() == "No image yet"
    page.locator("#walkthrough .wt-next").click()  # a step before any image: a clear message, no error
    assert "No image yet: upload one or pick an example" in page.locator("#walkthrough .wt-empty").inner_text()

    n = pick_example(page)
    seen = []
    for i in range(n):
        assert page.locator("#walkthrough .wt-count").inner_text() == f"Step {i + 1} of {n}"
        step = shown_step(page)
        seen.append(step)
        check_drawn(page, step)
        if step == "block4":
            screenshot(page, "walkthrough_lens.png")
        if step == "decision":  # the map's trust figures on this image arrive after the panels
            page.wait_for_function("document.querySelector('#walkthrough .wt-info').innerText.includes('random maps')")
        page.keyboard.press("ArrowRight")
    assert seen[:4] == ["pixels", "tokens", "position", "cls"] and seen[-3:] == ["heads", "decision", "whatif"]
    assert [s for s in seen if s.startswith("block")] == [f"block{i + 1}" for i in range(n - 7)]
    assert shown_step(page) == "whatif"  # past the last step: stays there

    check_whatif(page)
    screenshot(page, "walkthrough_whatif.png")
    page.keyboard.press("ArrowLeft")
    assert shown_step(page) == "decision"

    page.locator("#walkthrough .wt-free").check()
    page.wait_for_function(f"document.querySelectorAll('#walkthrough section.wt-step').length === {n}")
    for step in seen:
        check_drawn(page, step)
    assert page.locator("#walkthrough .wt-count").inner_text() == f"{n} steps"


def check_whatif(page) -> None:
    """The slider phrases its k from the payload; a click removes a patch by hand (one server call)."""
    section = page.locator("#walkthrough section[data-step=whatif]")
    section.locator("input.wt-k").fill("10")
    page.wait_for_function("document.querySelector('#walkthrough .wt-narration').innerText.includes('10 patches')")
    hand = page.locator("#walkthrough section[data-step=whatif] canvas").nth(2)
    hand.click(position={"x": 5, "y": 5})  # patch 0's corner
    page.wait_for_function("[...document.querySelectorAll('#walkthrough figcaption')]"
                           ".some(c => c.innerText.includes('removed by hand'))")


def test_a_click_on_the_head_grid_tells_the_prediction_without_that_head(projector):
    page = projector
    n = pick_example(page)
    for _ in range(n - 3):
        page.keyboard.press("ArrowRight")
    assert shown_step(page) == "heads"
    page.locator("#walkthrough section[data-step=heads] canvas").click(position={"x": 50, "y": 30})  # block 1, head 1
    assert "Block 1, head 1 off: the model says" in page.locator("#walkthrough .wt-info").inner_text()


def test_a_shared_link_lands_on_the_walkthrough(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone in the audience
    page.goto(server.local_url + "?tab=walkthrough")
    page.wait_for_selector("#walkthrough .wt-count")
    page.wait_for_function("window.scrollY > 0")
    top = page.locator("#walkthrough .wt-bar").bounding_box()["y"]
    assert 0 <= top < 844, top
    page.context.close()


# ------------------------------------------------------------------------------------------------
# A timm ViT: 224 px in 14×14 patches, and no final norm (so no logit lens)

@pytest.fixture(scope="module")
def timm_server(tmp_path_factory):
    import timm
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm-14x14")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5).eval(), folder, safe_serialization=True)
    model = app.load_model(folder)
    model.vit.norm = torch.nn.Identity()  # nothing to apply the head to the tokens inside with
    demo = serve(model)
    yield demo
    demo.close()


def test_a_timm_vit_draws_a_14x14_grid_and_says_why_there_is_no_lens(browser, timm_server):
    for page in open_page(browser, timm_server, 1280, 720):
        n = pick_example(page)
        assert n == 4 + 2 + 3
        for _ in range(n):
            step = shown_step(page)
            check_drawn(page, step)
            if step == "pixels":
                assert "14 × 14 = 196 patches" in page.locator("#walkthrough .wt-narration").inner_text()
            if step.startswith("block"):
                assert "no final norm" in page.locator("#walkthrough .wt-note").inner_text()
            page.keyboard.press("ArrowRight")
