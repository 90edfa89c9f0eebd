"""Does the explorer hold up when a room full of people uses it? Prints figures; not a test.

    python benchmarks/app_soak.py [--clients 8] [--seconds 300] [--distinct-share 0.5]

Starts `demo/app.py` on a free loopback port with a cache folder of its own (GRADIO_TEMP_DIR), then
`--clients` gradio_client clients each repeat, until `--seconds` have passed: upload an image to
/explain, then /redraw with random settings. A share of the uploads (`--distinct-share`) are fresh
random pictures, which defeat every cache; the rest are the shipped examples. Each redraw's
summary must name the client's own image (session isolation). Every 10 s it samples the server's
resident memory (/proc) and the cache folder's size. At the end: errors, isolation failures,
throughput, latencies, memory growth after the first minute, the cache's peak and final size.
The server is stopped and its cache folder removed whatever happens. Loopback only; at most 32
clients and one hour.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
from gradio_client import Client, handle_file  # noqa: E402

from app_latency import free_port  # noqa: E402 (after the environment is set)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "demo" / "examples").glob("*.jpg"))
SETTINGS = [dict(head_fusion="max"), dict(discard_ratio=0.5), dict(opacity=0.8), dict(layer=2), dict(head="head 3"),
            dict(patch=27), dict(method="last_layer"), dict(method="rollout"), dict()]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folder_mb(folder: Path) -> tuple[float, int]:
    """Size in MiB and file count of everything under `folder`."""
    total = count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                count += 1
            except FileNotFoundError:
                pass
    return total / 2**20, count


def start_server(port: int, cache: Path, log: Path, app_args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_TEMP_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "demo/app.py", "--port", str(port), "--host", "127.0.0.1", *app_args],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            Client(url, verbose=False, analytics_enabled=False, ssl_verify=False, download_files=False)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"no server at {url} after {timeout:.0f} s")


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"/explain": [], "/redraw": []}
        self.errors: list[str] = []
        self.mixups = 0

    def timed(self, endpoint: str, call):
        started = time.perf_counter()
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - every failure is counted and shown
            with self.lock:
                self.errors.append(f"{endpoint}: {type(error).__name__}: {str(error)[:200]}")
            return None
        with self.lock:
            self.latency[endpoint].append((time.perf_counter() - started) * 1000)
        return result


def fresh_picture(rng: random.Random, folder: Path) -> tuple[Path, str]:
    """A random picture no cache has seen, and the name its summary will not carry a label for."""
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    path = folder / f"fresh_{rng.randrange(10**9)}.png"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path, ""


def client_loop(url: str, deadline: float, seed: int, tally: Tally, args, scratch: Path) -> None:
    rng = random.Random(seed)
    client = Client(url, verbose=False, analytics_enabled=False, ssl_verify=args.ssl_verify,
                    download_files=str(scratch / f"client{seed}"))
    while time.monotonic() < deadline:
        if rng.random() < args.distinct_share:
            path, label = fresh_picture(rng, scratch)
        else:
            path = rng.choice(EXAMPLES)
            label = path.stem.rsplit("_", 1)[0]
        explained = tally.timed("/explain", lambda: client.predict(handle_file(str(path)), api_name="/explain"))
        if path.name.startswith("fresh_"):
            path.unlink(missing_ok=True)
        if explained is None:
            continue
        redrawn = tally.timed("/redraw", lambda: client.predict(**rng.choice(SETTINGS), api_name="/redraw"))
        summary = redrawn[-1] if redrawn else ""
        if redrawn and label and f"true label:** {label}" not in summary:
            with tally.lock:
                tally.mixups += 1
        shutil.rmtree(scratch / f"client{seed}", ignore_errors=True)  # the client's downloads


def sample(pid: int, cache: Path, deadline: float, every: float, samples: list) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        size, files = folder_mb(cache)
        samples.append((time.monotonic() - started, rss_mb(pid), size, files))
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))


def report(args, tally: Tally, samples: list, elapsed: float) -> None:
    done = len(tally.latency["/redraw"])
    print(f"{args.clients} clients for {elapsed:.0f} s, {args.distinct_share:.0%} fresh pictures, "
          f"machine load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"errors: {len(tally.errors)}   session mix-ups: {tally.mixups}")
    for error in tally.errors[:5]:
        print(f"  {error}")
    print(f"throughput: {done / elapsed:.1f} explain+redraw pairs/s")
    for endpoint, ms in tally.latency.items():
        if ms:
            print(f"{endpoint}: p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms (n={len(ms)})")
    after_minute = [s for s in samples if s[0] >= 60] or samples[-1:]
    rss = [s[1] for s in samples]
    print(f"server memory (RSS): start {rss[0]:.0f} MB, after the first minute {after_minute[0][1]:.0f} MB, "
          f"end {rss[-1]:.0f} MB, peak {max(rss):.0f} MB; growth after the first minute "
          f"{rss[-1] - after_minute[0][1]:+.0f} MB")
    print(f"cache folder: peak {max(s[2] for s in samples):.1f} MB, end {samples[-1][2]:.1f} MB "
          f"({samples[-1][3]} files)")
    print("samples (s, RSS MB, cache MB, files): "
          + ", ".join(f"({t:.0f}, {r:.0f}, {c:.1f}, {n})" for t, r, c, n in samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--distinct-share", type=float, default=0.5, help="share of uploads that are fresh pictures")
    parser.add_argument("--ssl-verify", action="store_true", help="the client's default (slower: a TLS context "
                        "per downloaded file even over http)")
    parser.add_argument("--app-args", default="", help="extra arguments for demo/app.py")
    args = parser.parse_args(argv)
    args.clients, args.seconds = max(1, min(args.clients, 32)), max(5.0, min(args.seconds, 3600.0))
    scratch = Path(tempfile.mkdtemp(prefix="app-soak-"))
    port, cache = free_port(), scratch / "gradio-cache"
    url = f"http://127.0.0.1:{port}/"
    server = start_server(port, cache, scratch / "server.log", args.app_args.split())
    try:
        wait_for(url, server)
        tally, samples = Tally(), []
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [threading.Thread(target=sample, args=(server.pid, cache, deadline, 10.0, samples), daemon=True)]
        threads += [threading.Thread(target=client_loop, args=(url, deadline, seed, tally, args, scratch), daemon=True)
                    for seed in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.seconds + 120)
        samples.append((time.monotonic() - started, rss_mb(server.pid), *folder_mb(cache)))
        report(args, tally, samples, time.monotonic() - started)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
