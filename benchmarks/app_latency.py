"""How fast is the explorer through its API? Prints figures; not a test.

    python benchmarks/app_latency.py [--checkpoint DIR] [--requests 60] [--clients 8]

Starts `demo/app.py` in a subprocess (with Gradio's request profiling on) and measures, through
`gradio_client`, what a user waits for:

- cold start: process start -> first /explain answer to a fresh client;
- upload -> all panels: /explain with one client (upload, queue, model, drawing, every panel
  downloaded), p50/p95; and /redraw (a settings change) the same way;
- throughput: /explain from `--clients` concurrent clients;
- /explain_arrays: the same explanation as numbers (JSON, no files to download), default client;
- server-side work inside /explain (Gradio's own trace: preprocess + handler + postprocess);
- the floor: a no-op Gradio endpoint returning one small image, in its own process, measured the
  same way (alone, and with the same upload /explain does), and the ratio to it;
- with `--browser N` instead of all that: choosing a file -> first panels (the model's view and the
  main map) and -> every panel shown in Chromium (Playwright, /usr/bin/chromium), timed in the page
  from its file input's change event; N uploads of different examples in one page, each after the
  previous one's chained trust figures are in (as a person looks before uploading again); then the
  same for a no-op Gradio app with the same upload and image outputs (the floor Gradio sets).

`--method` picks the explanation every call asks for (default: the app's own default).

Goals on the 2-core CPU this was written on: /explain p50 <= 250 ms, p95 <= 400 ms, server-side
<= 30 ms, >= 10 explanations/s with 8 clients, cold start <= 8 s, /explain_arrays p50 <= 200 ms
with the default client.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "demo" / "examples").glob("*.jpg"))

FLOOR_APP = textwrap.dedent("""
    import os, sys, tempfile
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    import gradio as gr
    from PIL import Image
    # A file, not a PIL image: Gradio re-encodes and rewrites a returned PIL image in place on every
    # call, which races with concurrent downloads of the same (identical) file.
    SMALL = os.path.join(tempfile.mkdtemp(), "small.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(SMALL)
    with gr.Blocks(analytics_enabled=False) as demo:
        image = gr.Image(type="filepath")
        out = gr.Image(format="png")
        gr.Button("noop").click(lambda: SMALL, None, out, api_name="noop")
        gr.Button("noop_upload").click(lambda path: SMALL, image, out, api_name="noop_upload",
                                       preprocess=False)
    demo.launch(server_port=int(sys.argv[1]), prevent_thread_lock=False, quiet=True, ssr_mode=False,
                enable_monitoring=False, run_history=False)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """A server process; its output goes to a log file (a pipe nobody reads could fill and stall it)."""
    log = open(Path(DOWNLOADS) / f"server-{time.time_ns()}.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    process.log_path = log.name
    return process


def connect(url: str, process: subprocess.Popen, timeout: float = 120.0, verify: bool = True) -> Client:
    """A client, as soon as the server answers (polling every 50 ms)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: "
                               f"{Path(process.log_path).read_text()[-2000:]}")
        try:
            return make_client(url, verify=verify)
        except Exception:
            time.sleep(0.05)
    raise TimeoutError(f"no server at {url} after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def timed(fn, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    return times


def stats(ms: list[float]) -> str:
    return (f"p50 {np.percentile(ms, 50):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms   "
            f"mean {statistics.fmean(ms):6.1f} ms   (n={len(ms)})")


def throughput(make_client, call, clients: int, per_client: int) -> tuple[float, list[float]]:
    """Requests per second with `clients` concurrent clients, each making `per_client` calls."""
    pool = [make_client() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    latencies: list[float] = []

    def work(client):
        barrier.wait()
        for i in range(per_client):
            started = time.perf_counter()
            call(client, i)
            latencies.append((time.perf_counter() - started) * 1000)

    with ThreadPoolExecutor(clients) as executor:
        futures = [executor.submit(work, c) for c in pool]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
    return clients * per_client / elapsed, latencies


def server_side(url: str, fn_name: str) -> dict[str, float]:
    traces = httpx.get(f"{url}gradio_api/profiling/traces", timeout=30).json()
    traces = [t for t in traces if t.get("fn_name") == fn_name]
    if not traces:
        return {}
    pick = lambda key: float(np.percentile([t[key] for t in traces], 50))  # noqa: E731
    work = [t["preprocess_ms"] + t["fn_call_ms"] + t["postprocess_ms"] for t in traces]
    return {"n": len(traces), "preprocess": pick("preprocess_ms"), "handler": pick("fn_call_ms"),
            "postprocess": pick("postprocess_ms"), "work_p50": float(np.percentile(work, 50)),
            "work_p95": float(np.percentile(work, 95)), "queue_wait": pick("queue_wait_ms")}


def make_client(url: str, verify: bool = True, download: bool = True) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, ssl_verify=verify,
                  download_files=DOWNLOADS if download else False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "vit-cifar10"))
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput run")
    parser.add_argument("--per-client", type=int, default=10, help="requests per concurrent client")
    parser.add_argument("--app-args", default="", help="extra arguments for demo/app.py, e.g. '--workers 1'")
    parser.add_argument("--method", default=None, help="explanation method every call asks for (default: the app's)")
    parser.add_argument("--browser", type=int, default=0, help="only time N uploads in Chromium")
    args = parser.parse_args(argv)
    if args.browser:
        return browser_main(args)

    global DOWNLOADS
    DOWNLOADS = tempfile.mkdtemp(prefix="app-latency-")
    images = [handle_file(str(p)) for p in EXAMPLES]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          "(other work on the machine slows every figure)")
    print("note: gradio_client downloads output files one by one and, with its default ssl_verify=True, "
          "builds a fresh TLS context (loading the CA bundle) for each download even over plain http; "
          "'fast client' below is the same client with ssl_verify=False, which changes nothing else "
          "on an http:// URL.")
    app = measure_app(args, images, {} if args.method is None else {"method": args.method})
    floor = measure_floor(args, images)
    ratio = lambda a, b: np.percentile(a, 50) / np.percentile(b, 50)  # noqa: E731
    print("\n/explain p50 over the floor's p50 (same client settings):")
    print(f"  defaults: {ratio(app['default'], floor['noop']):.2f}x the no-op floor, "
          f"{ratio(app['default'], floor['upload']):.2f}x the upload floor")
    print(f"  fast client: {ratio(app['fast'], floor['noop_fast']):.2f}x the no-op floor, "
          f"{ratio(app['fast'], floor['upload_fast']):.2f}x the upload floor; throughput "
          f"{app['rate'] / floor['rate']:.2f}x the floor's")
    return 0


def measure_app(args, images: list, chosen: dict) -> dict:
    """Start the app and print its figures; returns the series the floor is compared with."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    app = start([sys.executable, "demo/app.py", "--checkpoint", args.checkpoint, "--port", str(port),
                 *args.app_args.split()],
                env={"GRADIO_PROFILING": "1"})
    try:
        fast = connect(url, app, verify=False)
        ready = time.perf_counter() - started
        fast.predict(images[0], **chosen, api_name="/explain")
        cold = time.perf_counter() - started
        print(f"\ncold start, process start -> first /explain answer (fast client): {cold:.2f} s   (goal <= 8 s); "
              f"the server answered its first request after {ready:.2f} s")
        clients = {"default": make_client(url), "fast": fast, "bare": make_client(url, verify=False, download=False)}
        for i in range(5):  # warm the clients and the server
            for c in clients.values():
                c.predict(images[i % len(images)], **chosen, api_name="/explain")
        series = explain_figures(url, app, clients, images, chosen, args.requests)
        redraw_figures(url, app, fast, args.requests)
        series["rate"] = load_figures(url, images, chosen, args.clients, args.per_client)
        return series
    finally:
        stop(app)


def explain_figures(url: str, app: subprocess.Popen, clients: dict, images: list, chosen: dict, n: int) -> dict:
    """/explain one request at a time, with each client setting, and /explain_arrays."""
    explain = lambda c: lambda i: c.predict(images[i % len(images)], **chosen, api_name="/explain")  # noqa: E731
    default_ms = timed(explain(clients["default"]), n)
    httpx.post(f"{url}gradio_api/profiling/clear", timeout=30)
    cpu_before = cpu_seconds(app.pid)
    fast_ms = timed(explain(clients["fast"]), n)
    explain_cpu = (cpu_seconds(app.pid) - cpu_before) / n * 1000
    server = server_side(url, "explain")
    answer_ms = timed(explain(clients["bare"]), n)
    fetcher, fetch_pool = httpx.Client(timeout=30), ThreadPoolExecutor(8)

    def answer_and_fetch(i):
        out = clients["bare"].predict(images[i % len(images)], **chosen, api_name="/explain")
        urls = [o["url"] for o in out if isinstance(o, dict) and o.get("url")]
        list(fetch_pool.map(lambda u: fetcher.get(u).content, urls))

    parallel_ms = timed(answer_and_fetch, n)
    print("/explain, one client, upload -> 9 panels (7 images):   (goal p50 <= 250 ms, p95 <= 400 ms)")
    print(f"  gradio_client defaults:                 {stats(default_ms)}")
    print(f"  fast client (ssl_verify=False):         {stats(fast_ms)}")
    print(f"  answer only (panel URLs, no downloads): {stats(answer_ms)}")
    print(f"  answer + panels fetched in parallel:    {stats(parallel_ms)}   (what a browser does)")
    if server:
        print(f"  server-side work: preprocess {server['preprocess']:.1f} + handler {server['handler']:.1f} + "
              f"postprocess {server['postprocess']:.1f} ms (p50 each); total p50 {server['work_p50']:.1f} ms, "
              f"p95 {server['work_p95']:.1f} ms   (goal <= 30 ms)")
    print(f"  server CPU per /explain, all included (upload, queue, handler, serving 7 images): "
          f"{explain_cpu:.1f} ms")
    arrays_ms = timed(lambda i: clients["default"].predict(images[i % len(images)], **chosen,
                                                           api_name="/explain_arrays"), n)
    print(f"/explain_arrays (the numbers as JSON, no files), gradio_client defaults: {stats(arrays_ms)}"
          "   (goal p50 <= 200 ms)")
    return {"default": default_ms, "fast": fast_ms}


def redraw_figures(url: str, app: subprocess.Popen, fast: Client, n: int) -> None:
    """/redraw (a settings change) one request at a time, cycling through the settings a person moves."""
    settings = [dict(head_fusion="max"), dict(discard_ratio=0.5), dict(opacity=0.8), dict(layer=2),
                dict(head="head 3"), dict(patch=27), dict(method="last_layer"), dict()]
    httpx.post(f"{url}gradio_api/profiling/clear", timeout=30)
    cpu_before = cpu_seconds(app.pid)
    redraw_ms = timed(lambda i: fast.predict(**settings[i % len(settings)], api_name="/redraw"), n)
    redraw_cpu = (cpu_seconds(app.pid) - cpu_before) / n * 1000
    server = server_side(url, "redraw")
    print(f"/redraw (a settings change; 6 images), fast client: {stats(redraw_ms)}")
    if server:
        print(f"  server-side work p50 {server['work_p50']:.1f} ms, p95 {server['work_p95']:.1f} ms; "
              f"server CPU per call, all included: {redraw_cpu:.1f} ms")


def load_figures(url: str, images: list, chosen: dict, clients: int, per_client: int) -> float:
    """/explain from concurrent fast clients; returns explanations per second."""
    httpx.post(f"{url}gradio_api/profiling/clear", timeout=30)
    call = lambda c, i: c.predict(images[i % len(images)], **chosen, api_name="/explain")  # noqa: E731
    rate, latencies = throughput(lambda: make_client(url, verify=False), call, clients, per_client)
    loaded = server_side(url, "explain")
    print(f"/explain, {clients} concurrent fast clients: {rate:.1f} explanations/s   (goal >= 10/s)")
    print(f"  latency under load: {stats(latencies)}")
    if loaded:
        print(f"  server-side work under load p50 {loaded['work_p50']:.1f} ms, queue wait p50 "
              f"{loaded['queue_wait']:.1f} ms")
    return rate


def measure_floor(args, images: list) -> dict:
    """The same round trips around a no-op Gradio handler in its own process: the floor Gradio sets."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    floor_script = Path(DOWNLOADS) / "floor_app.py"
    floor_script.write_text(FLOOR_APP)
    floor = start([sys.executable, str(floor_script), str(port)])
    n = args.requests
    try:
        client = connect(url, floor)
        fast = make_client(url, verify=False)
        for _ in range(5):
            for c in (client, fast):
                c.predict(api_name="/noop")
                c.predict(images[0], api_name="/noop_upload")
        series = {"noop": timed(lambda i: client.predict(api_name="/noop"), n),
                  "noop_fast": timed(lambda i: fast.predict(api_name="/noop"), n),
                  "upload": timed(lambda i: client.predict(images[i % len(images)], api_name="/noop_upload"), n)}
        cpu_before = cpu_seconds(floor.pid)
        series["upload_fast"] = timed(lambda i: fast.predict(images[i % len(images)], api_name="/noop_upload"), n)
        floor_cpu = (cpu_seconds(floor.pid) - cpu_before) / n * 1000
        series["rate"], _ = throughput(lambda: make_client(url, verify=False),
                                       lambda c, i: c.predict(images[i % len(images)], api_name="/noop_upload"),
                                       args.clients, args.per_client)
    finally:
        stop(floor)
    print("\nfloor: a no-op endpoint returning one small image")
    print(f"  gradio_client defaults:          {stats(series['noop'])}")
    print(f"  fast client:                     {stats(series['noop_fast'])}")
    print(f"  with an upload, defaults:        {stats(series['upload'])}")
    print(f"  with an upload, fast client:     {stats(series['upload_fast'])}; server CPU {floor_cpu:.1f} ms per "
          f"call; {series['rate']:.1f}/s with {args.clients} fast clients")
    return series


PANEL_IDS = ["model-view", "patch-grid", "overlay", "token-attention", "matrix", "matrices", "layer-strip"]
FIRST_IDS = ["model-view", "overlay"]  # what a person looks at first: the input as the model sees it, the main map
# True (the page's clock, ms) once every panel named in `old` shows a loaded picture other than `old`'s.
ALL_NEW = """(old) => Object.keys(old).every(id => { const img = document.querySelector(`#${id} img`);
                return img && img.complete && img.naturalWidth > 0 && img.src !== old[id]; }) && performance.now()"""
WATCH_PICK = """() => { window.__picked = null; document.querySelector('#image-in input[type=file]')
                .addEventListener('change', () => { window.__picked = performance.now(); }, {once: true}); }"""

# The floor for the browser figures: a Gradio app that does nothing with the same upload and as many
# image outputs (with the same element ids) as the explorer, each answer new 256-px PNG files
# already in Gradio's cache (as the explorer's panels are).
BROWSER_FLOOR_APP = textwrap.dedent("""
    import itertools, os, sys
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import gradio.utils as gr_utils
    from PIL import Image
    ids = sys.argv[2].split(",")
    folder = os.path.join(gr_utils.get_upload_folder(), f"browser-floor-{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    pool = []
    for i in range(64):
        pool.append(os.path.join(folder, f"{i}.png"))
        Image.new("RGB", (256, 256), (4 * i, 100, 200)).save(pool[-1])
    counter = itertools.count()
    with gr.Blocks(analytics_enabled=False) as demo:
        image = gr.Image(type="filepath", sources=["upload"], elem_id="image-in")
        outs = [gr.Image(format="png", interactive=False, elem_id=i) for i in ids]
        gr.Markdown("ready", elem_id="trust")
        image.upload(lambda upload: [pool[next(counter) % len(pool)] for _ in ids], image, outs,
                     preprocess=False, show_progress="minimal")
    demo.launch(server_port=int(sys.argv[1]), quiet=True, ssr_mode=False, enable_monitoring=False)
""")


def open_page(playwright, url: str, width: int, height: int):
    """Debian's Chromium (headless) on `url` at width x height, patient with a busy server; it
    closes with `playwright`."""
    import shutil

    browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    page.goto(url)
    return page

def browser_latency(url: str, uploads: int) -> dict[str, list[float]]:
    """Milliseconds from the browser's file-chosen event to the first panels (FIRST_IDS) and to every
    panel showing its new picture, in the page's own clock; and to every panel from Playwright's
    set_input_files call (which adds the file's transfer into the page)."""
    from playwright.sync_api import sync_playwright

    times = {"first": [], "every": [], "every, from set_input_files": []}
    with sync_playwright() as playwright:
        page = open_page(playwright, url, 1440, 900)
        for i in range(uploads + 2):  # the first two warm the page and the server
            old = {panel: page.evaluate(f"document.querySelector('#{panel} img')?.src || ''") for panel in PANEL_IDS}
            page.wait_for_selector("#image-in input[type=file]", state="attached")
            page.evaluate(WATCH_PICK)
            started = time.perf_counter()
            page.locator("#image-in input[type=file]").set_input_files(str(EXAMPLES[i % len(EXAMPLES)]))
            first = page.wait_for_function(ALL_NEW, arg={k: old[k] for k in FIRST_IDS}, polling=5).json_value()
            every = page.wait_for_function(ALL_NEW, arg=old, polling=5).json_value()
            if i >= 2:
                picked = page.evaluate("window.__picked")
                times["first"].append(first - picked)
                times["every"].append(every - picked)
                times["every, from set_input_files"].append((time.perf_counter() - started) * 1000)
            page.wait_for_function("!document.querySelector('#trust').innerText.includes('Measuring')")
            page.locator("#image-in button[aria-label='Remove Image']").first.click()  # ready for the next file
    return times


def browser_run(command: list[str], url: str, uploads: int) -> dict[str, list[float]]:
    server = start(command)
    try:
        connect(url, server, verify=False)
        return browser_latency(url, uploads)
    finally:
        stop(server)


def browser_main(args) -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = browser_run([sys.executable, "demo/app.py", "--checkpoint", args.checkpoint, "--port", str(port),
                       *args.app_args.split()], url, args.browser)
    floor_script = Path(DOWNLOADS) / "browser_floor_app.py"
    floor_script.write_text(BROWSER_FLOOR_APP)
    port = free_port()
    floor = browser_run([sys.executable, str(floor_script), str(port), ",".join(PANEL_IDS)],
                        f"http://127.0.0.1:{port}/", args.browser)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("browser, from choosing a file (the page's change event) to the panels shown, the app's default method:")
    for name, ms in app.items():
        print(f"  {name:<30} {stats(ms)}")
    print(f"floor (a no-op Gradio app, the same upload and {len(PANEL_IDS)} image outputs):")
    for name, ms in floor.items():
        print(f"  {name:<30} {stats(ms)}")
    print("goals: our ViT every panel p50 <= 200 ms; another library's ViT-Tiny first panels p50 <= 400 ms")
    return 0


DOWNLOADS = tempfile.gettempdir()

if __name__ == "__main__":
    sys.exit(main())
