"""How fast is the Walkthrough in a browser? Prints figures; not a test.

    python benchmarks/walkthrough_browser.py [--checkpoint DIR] [--uploads 8] [--keys 60]

Starts `demo/app.py` in a subprocess and drives Debian's Chromium (Playwright, 1280×720) on it:

- upload -> first step: for `--uploads` files chosen in the Explorer's upload (timed in the page
  from its file input's change event), when the Explorer's first panels (the model's view and the
  main map) show the new picture, and when the Walkthrough has drawn its step for the new image
  (the payload computed after the panels, sent, its pixels decoded, the step drawn); their ratio
  per upload. Each upload waits for the previous one's trust figures, as a person would.
- key press -> next step drawn: `--keys` presses of → (and ← back at the last step) on the
  Walkthrough, from the keydown event to the end of the drawing and to the next animation frame.

Goals (issue 30): key press -> next step p50 <= 50 ms; the Walkthrough's first step within 1.5x
the Explorer's first panels (the same uploads, the same run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from app_latency import ALL_NEW, EXAMPLES, FIRST_IDS, WATCH_PICK, connect, free_port, open_page, start, stop

ROOT = Path(__file__).resolve().parents[1]

NEW_WALKTHROUGH = """(old) => window.__wtImageDrawn && window.__wtImageDrawn.key !== old && window.__wtImageDrawn.at"""
DRAWN = "document.querySelector('#walkthrough [data-drawn]')"  # the element walkthrough.js draws in
KEY_TIMER = """() => { window.addEventListener('keydown', () => { window.__keyAt = performance.now(); }, true); }"""


def stats(ms: list[float]) -> str:
    return f"p50 {statistics.median(ms):7.1f} ms   p95 {sorted(ms)[int(0.95 * (len(ms) - 1))]:7.1f} ms   (n={len(ms)})"


def upload_times(page, uploads: int) -> dict[str, list[float]]:
    """ms from the file chosen to the Explorer's first panels and to the Walkthrough's first step."""
    times = {"explorer": [], "walkthrough": [], "arrived": [], "ratio": []}
    for i in range(uploads + 2):  # the first two warm the page and the server
        old = {panel: page.evaluate(f"document.querySelector('#{panel} img')?.src || ''") for panel in FIRST_IDS}
        old_key = page.evaluate("window.__wtImageDrawn ? window.__wtImageDrawn.key : ''")
        page.evaluate(WATCH_PICK)
        page.locator("#image-in input[type=file]").set_input_files(str(EXAMPLES[(3 * i) % len(EXAMPLES)]))
        panels = page.wait_for_function(ALL_NEW, arg=old, polling=5).json_value()
        walkthrough = page.wait_for_function(NEW_WALKTHROUGH, arg=old_key, polling=5).json_value()
        picked = page.evaluate("window.__picked")
        if i >= 2:
            times["explorer"].append(panels - picked)
            times["walkthrough"].append(walkthrough - picked)
            times["arrived"].append(page.evaluate("window.__wtArrived.at") - picked)
            times["ratio"].append((walkthrough - picked) / (panels - picked))
        page.wait_for_function("!document.querySelector('#trust').innerText.includes('Measuring')")
        page.locator("#image-in button[aria-label='Remove Image']").first.click()
    return times


def key_times(page, presses: int) -> dict[str, list[float]]:
    """ms from a keydown to the next step drawn, and to the animation frame after it."""
    old_key = page.evaluate("window.__wtImageDrawn ? window.__wtImageDrawn.key : ''")
    page.locator("#image-in input[type=file]").set_input_files(str(EXAMPLES[0]))
    page.wait_for_function(NEW_WALKTHROUGH, arg=old_key, polling=5)
    page.evaluate(KEY_TIMER)
    page.evaluate("document.getElementById('tabs').scrollIntoView({block: 'start'})")
    n = int(page.locator("#walkthrough .wt-count").inner_text().split()[-1])
    times, step = {"drawn": [], "next frame": []}, 1
    for _ in range(presses):
        key = "ArrowLeft" if step == n else "ArrowRight"
        before = int(page.evaluate(f"{DRAWN}.dataset.drawn"))
        page.keyboard.press(key)
        page.wait_for_function(f"+{DRAWN}.dataset.drawn > {before} && "
                               "window.__wtFrameAt > window.__wtDrawnAt", polling=5)
        key_at, drawn, frame = page.evaluate("[window.__keyAt, window.__wtDrawnAt, window.__wtFrameAt]")
        times["drawn"].append(drawn - key_at)
        times["next frame"].append(frame - key_at)
        step = int(page.locator("#walkthrough .wt-count").inner_text().split()[1])
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "vit-cifar10"))
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--keys", type=int, default=60)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = start([sys.executable, "demo/app.py", "--checkpoint", args.checkpoint, "--port", str(port)])
    try:
        connect(url, server, verify=False)
        with sync_playwright() as playwright:
            page = open_page(playwright, url, 1280, 720)
            page.wait_for_selector("#image-in input[type=file]", state="attached")
            uploads = upload_times(page, args.uploads)
            keys = key_times(page, args.keys)
    finally:
        stop(server)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Chromium 1280x720, "
          f"checkpoint {args.checkpoint}")
    print("upload (the file chosen in the page) ->")
    print(f"  the Explorer's first panels        {stats(uploads['explorer'])}")
    print(f"  the Walkthrough's numbers arrived  {stats(uploads['arrived'])}")
    print(f"  the Walkthrough's first step drawn {stats(uploads['walkthrough'])}")
    print(f"  ratio, per upload                  p50 {statistics.median(uploads['ratio']):.2f}x   "
          f"max {max(uploads['ratio']):.2f}x   (goal <= 1.5x)")
    print("key press (→ / ←) -> the next step")
    print(f"  drawn                              {stats(keys['drawn'])}   (goal p50 <= 50 ms)")
    print(f"  the next animation frame           {stats(keys['next frame'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
