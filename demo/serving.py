"""How the explorer's answers are served, and what bounds the disk and memory that takes.

- `PanelFiles`: panel pictures become PNG files in Gradio's cache folder, named by their content,
  so a picture drawn again (the same image, an unchanged panel on a redraw) is written once and
  served as the same URL. The folder has a byte budget and a maximum age, oldest-used out first.
- `answering`: a handler's {output name: value} answer as Gradio wants it.
- `CacheKeeper`: a background sweep over the other files Gradio keeps for this app (uploads,
  copies of returned files): each goes after a maximum age, and the oldest go first while the
  cache is over its byte budget; the sweep also forgets deleted files and hands freed heap back to
  the operating system. Gradio's own `delete_cache` (set on the Blocks) is the slow backstop
  and the cleanup at shutdown.
- `static_dir`, `export_dir`: the app's own temp folders (figures drawn once, exports), removed at exit.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils as gr_utils
from PIL import Image

# Panel files: at most this many bytes and this old (since last handed out). A file handed out in
# the last MIN_AGE_S seconds is never removed, whatever the budget: its client may still fetch it.
PANEL_BYTES = 64 * 2**20
PANEL_AGE_S = 600.0
MIN_AGE_S = 30.0
# Everything else Gradio keeps for the app (mostly uploads): the same rules, its own budget.
OTHER_BYTES = 64 * 2**20
OTHER_AGE_S = 600.0
SWEEP_EVERY_S = 10.0
# Gradio's own sweep (Blocks(delete_cache=(every, age))): a backstop to CacheKeeper, and at shutdown
# it removes every file the app made.
GRADIO_DELETE_CACHE = (900, 900)
# Sessions whose state (one image's explanation, about half a megabyte) Gradio keeps, least
# recently used out first: bounds the server's memory however many visitors come and go.
SESSIONS_KEPT = 200
PANEL_FOLDER_PREFIX = "vit-explorer-panels-"
EXPORT_AGE_S = 3600.0  # an export's folder is removed this long after it was written


class PanelFiles:
    """PNG files for panel pictures, written straight into Gradio's cache folder for it to serve.

    Returning a PIL image would make Gradio encode it at PNG level 6 and hash the result on every
    answer; here a picture is hashed from its pixels, encoded at level 1 (several times faster for
    a few more bytes) only if no file holds it yet, and written under a temporary name and renamed,
    so a concurrent request never sees half a file. A file already in Gradio's cache is served as
    is. The index is least recently handed out first; writes evict from its front past
    `max_bytes` or `max_age` (never files handed out within `min_age` s). Each process has its own
    folder, so two servers never remove each other's files; folders left by dead ones are removed."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = PANEL_BYTES,
                 max_age: float = PANEL_AGE_S, min_age: float = MIN_AGE_S):
        root = Path(gr_utils.get_upload_folder())
        self.dir = Path(folder) if folder is not None else root / f"{PANEL_FOLDER_PREFIX}{os.getpid()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_age, self.min_age = max_bytes, max_age, min_age
        self._index: OrderedDict[str, tuple[int, float]] = OrderedDict()  # path -> (bytes, last handed out)
        self.bytes = 0
        self.written = 0  # files encoded and written (the rest were reused)
        self._lock = threading.Lock()
        if folder is None:
            _remove_stale_folders(root, keep=self.dir, older_than=max_age)

    def __call__(self, image: Image.Image) -> str:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.mode}{image.size}".encode())
        path = str(self.dir / f"{digest.hexdigest()}.png")
        now = time.time()
        with self._lock:
            known = path in self._index
            if known:
                self._index[path] = (self._index[path][0], now)
                self._index.move_to_end(path)
        if known:
            try:
                os.utime(path)  # Gradio's delete_cache ages files by their change time
                return path
            except FileNotFoundError:  # removed behind our back (Gradio's sweep): write it again
                self._forget(path)
        size = self._write(image, path)
        with self._lock:
            self._index[path] = (size, now)
            self.bytes += size
            self.written += 1
        self.prune(now)
        return path

    def _write(self, image: Image.Image, path: str) -> int:
        staging = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            image.save(staging, format="png", compress_level=1)
        except FileNotFoundError:  # the folder went (a sweep of stale folders): make it again
            self.dir.mkdir(parents=True, exist_ok=True)
            image.save(staging, format="png", compress_level=1)
        os.replace(staging, path)
        return os.path.getsize(path)

    def _forget(self, path: str) -> None:
        with self._lock:
            entry = self._index.pop(path, None)
            if entry is not None:
                self.bytes -= entry[0]

    def prune(self, now: float | None = None) -> int:
        """Removes the least recently handed-out files past the byte budget or the maximum age
        (none handed out within `min_age` s); returns how many went."""
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            while self._index:
                path, (size, used) = next(iter(self._index.items()))
                age = now - used
                if age < self.min_age or (self.bytes <= self.max_bytes and age <= self.max_age):
                    break
                self._index.popitem(last=False)
                self.bytes -= size
                removed.append(path)
        for path in removed:
            _remove(path)
        return len(removed)

    def __contains__(self, path: str) -> bool:
        return path in self._index

    def close(self) -> None:
        """Removes the folder and everything in it (at shutdown)."""
        with self._lock:
            self._index.clear()
            self.bytes = 0
        shutil.rmtree(self.dir, ignore_errors=True)


@functools.cache
def panel_files() -> PanelFiles:
    """This process's panel files (one folder, one index, one budget for every Blocks it serves),
    removed at exit."""
    files = PanelFiles()
    atexit.register(files.close)
    return files


def _remove_stale_folders(root: Path, keep: Path, older_than: float) -> None:
    """Panel folders of processes that are gone (or of this app's older layout), left untouched
    for `older_than` s, go."""
    cutoff = time.time() - older_than
    for folder in root.glob(f"{PANEL_FOLDER_PREFIX.rstrip('-')}*"):
        pid = folder.name[len(PANEL_FOLDER_PREFIX):]
        alive = pid.isdigit() and _process_alive(int(pid))
        try:
            if folder != keep and not alive and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


# One temp folder per kind for the whole process, made on first use, removed at exit.
_PROCESS_DIRS: dict[str, Path] = {}


def _process_dir(prefix: str) -> Path:
    if prefix not in _PROCESS_DIRS:
        _PROCESS_DIRS[prefix] = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, _PROCESS_DIRS[prefix], True)
    return _PROCESS_DIRS[prefix]


def static_dir() -> Path:
    """The folder for files that never change while the app runs (the Model tab's figures)."""
    return _process_dir("vit-explorer-static-")


def export_dir() -> Path:
    """A fresh folder per export under one per-process temp dir; folders older than an hour go."""
    root = _process_dir("vit-explorer-export-")
    now = time.time()
    for old in root.iterdir():
        if now - old.stat().st_mtime > EXPORT_AGE_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def answering(handler: Callable[..., dict], ui: dict[str, gr.components.Component],
              files: PanelFiles) -> Callable[..., dict]:
    """`handler` as Gradio wants it: the same signature (so the same API parameters), with its
    {output name: value} answer keyed by this page's components and its pictures as served
    files. An empty answer changes nothing. A generator handler stays one, answer by answer."""
    def convert(answer: dict):
        if not answer:
            return gr.skip()
        return {ui[name]: files(value) if isinstance(value, Image.Image) else value
                for name, value in answer.items()}

    if inspect.isgeneratorfunction(handler):  # an answer in steps: Gradio shows each as it comes
        @functools.wraps(handler)
        def to_gradio_steps(*args, **kwargs):
            for answer in handler(*args, **kwargs):
                yield convert(answer)
        return to_gradio_steps

    @functools.wraps(handler)
    def to_gradio(*args, **kwargs):
        return convert(handler(*args, **kwargs))
    return to_gradio


class CacheKeeper:
    """Bounds what Gradio keeps on disk for one Blocks app, from a daemon thread.

    Every `every` s: the files the app's Blocks track (uploads, copies of returned files; the
    panel files are `panels`' own) go when older than `max_age` s by change time, then the oldest
    while they add up to more than `max_bytes`, never one younger than `min_age` s nor one the
    app keeps for good (its examples); the sets Gradio tracks them in forget them (Gradio's own
    sweep never forgets a file someone else removed, so they would grow for ever); the panel
    files are pruned; freed heap goes back to the operating system."""

    def __init__(self, blocks: gr.Blocks, panels: PanelFiles | None = None, max_bytes: int = OTHER_BYTES,
                 max_age: float = OTHER_AGE_S, min_age: float = MIN_AGE_S, every: float = SWEEP_EVERY_S):
        self.blocks, self.panels = blocks, panels
        self.max_bytes, self.max_age, self.min_age, self.every = max_bytes, max_age, min_age, every
        self.bytes = 0  # what the tracked files (panel files aside) held after the last sweep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now: float | None = None) -> int:
        """One pass; returns how many files were removed."""
        now = time.time() if now is None else now
        keep = set().union(*(getattr(b, "keep_in_cache", ()) for b in self.blocks.blocks.values()))
        files = []  # (change time, bytes, path, the set that tracks it)
        for tracked in self.blocks.temp_file_sets:
            for path in _snapshot(tracked):
                if path in keep or (self.panels is not None and path in self.panels):
                    continue
                try:
                    info = os.stat(path)
                except FileNotFoundError:
                    tracked.discard(path)
                    continue
                files.append((info.st_ctime, info.st_size, path, tracked))
        files.sort(key=lambda f: f[0])
        total, removed = sum(f[1] for f in files), 0
        for changed, size, path, tracked in files:
            age = now - changed
            if age < self.min_age or (total <= self.max_bytes and age <= self.max_age):
                continue
            if _remove(path):
                removed += 1
                _remove_empty_parent(path, Path(self.blocks.GRADIO_CACHE))
            tracked.discard(path)
            total -= size
        self.bytes = total
        if self.panels is not None:
            removed += self.panels.prune(now)
            for tracked in self.blocks.temp_file_sets:  # panel files Gradio still lists but that are gone
                for path in _snapshot(tracked):
                    if path.startswith(str(self.panels.dir)) and path not in self.panels:
                        tracked.discard(path)
        release_free_heap()
        return removed

    def start(self) -> "CacheKeeper":
        """Sweeps every `every` s from a daemon thread, until `stop()` or until the Blocks, having
        run, is closed."""
        def run():
            seen_running = False
            while not self._stop.wait(self.every):
                running = bool(getattr(self.blocks, "is_running", False))
                if seen_running and not running:
                    return
                seen_running = seen_running or running
                try:
                    self.sweep()
                except Exception as error:  # never let one bad pass end the sweeping
                    print(f"cache sweep failed: {error!r}", file=sys.stderr)
        self._thread = threading.Thread(target=run, name="cache-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _snapshot(tracked: set) -> list:
    """A copy of a set other threads add to (copying can meet a resize: then try again)."""
    for _ in range(5):
        try:
            return list(tracked)
        except RuntimeError:
            continue
    return []


def _remove_empty_parent(path: str, cache_root: Path) -> None:
    """Gradio keeps each file in a folder of its own, named by the file's hash: remove it too."""
    parent = Path(path).parent
    if parent.parent == cache_root:
        try:
            parent.rmdir()
        except OSError:
            pass


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_heap_arenas(arenas: int = 2) -> bool:
    """glibc gives each new thread's allocations an arena of their own (up to 8 per core), and a
    server's many short-lived worker threads leave them fragmented, so the process grows for a
    long while under load. Called before the server starts its threads, this caps them."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX


def release_free_heap() -> None:
    """Hands the heap's free pages back to the operating system (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
