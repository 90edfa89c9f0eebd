"""Loading a trained ViT: the one loader behind the app and every command.

`load_checkpoint(path_or_repo_id)` takes a folder written by `save_pretrained` (config.json +
model.safetensors) or a Hugging Face Hub repo id, and returns the model in eval mode on the CPU.
Whatever goes wrong ends in a `CheckpointError` whose message says what to pass instead. Weights
are read from safetensors only, with strict key and shape checks (`ViTClassifier._from_pretrained`).

A Hub id is looked up in the local Hub cache first, without the network. Only when it is not there
and the Hub answers a quick connection probe is it downloaded, so an offline machine gets its error
in seconds instead of after the Hub client's retries.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError

from .model import WEIGHTS_NAME, CheckpointMismatchError, ViTClassifier

CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PROBE_TIMEOUT_S = 3.0
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OFFLINE_ADVICE = ("Offline? Pass a local checkpoint directory instead (a local model folder: ours, or one saved by "
                  "timm or transformers).")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or loaded; the message says which and what to pass instead."""


def looks_like_repo_id(text: str) -> bool:
    """"user/name", as the Hub spells repo ids (not a relative path such as ./x or runs/a/b)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def candidate_folders(source: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Where a model folder named `source` may lie: the path itself (relative ones from the working
    directory), then, for a relative one, under each of `search_dirs`, in that order."""
    path = Path(source)
    return [path] if path.is_absolute() else [path] + [Path(d) / path for d in search_dirs]


def host_reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds, name lookup included
    (run in a thread, since a lookup can block longer than any socket timeout)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used right now, or None when it answers."""
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"
    if not host_reachable(host):
        return f"the Hub ({host}) cannot be reached"
    return None


def _load_folder(folder: Path) -> ViTClassifier:
    where = f"Cannot load the checkpoint in {folder}"
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{where}: it holds no {CONFIG_NAME} (save_pretrained writes {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME}).")
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        extra = f"; {', '.join(pickles)} would need unpickling, which this loader never does" if pickles else ""
        raise CheckpointError(f"{where}: it holds no {WEIGHTS_NAME}{extra}.")
    try:
        return ViTClassifier.from_pretrained(str(folder))
    except CheckpointMismatchError as error:
        raise CheckpointError(f"{where}: {error}") from error
    except SafetensorError as error:
        raise CheckpointError(f"{where}: {WEIGHTS_NAME} is not a readable safetensors file ({error}).") from error
    except (ValueError, TypeError, KeyError) as error:  # config.json that no ViTClassifier fits
        raise CheckpointError(f"{where}: {CONFIG_NAME} does not describe a ViTClassifier "
                              f"({type(error).__name__}: {error}).") from error
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{where}: {error}") from error


def hub_file(repo_id: str, filename: str) -> str:
    """The local path of a Hub repo's file: from the local cache, else downloaded; CheckpointError at
    once when it is not cached and the Hub cannot be reached. A repo's files land side by side in
    one snapshot folder. Other Hub client errors (no such repo or file) pass through."""
    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    reason = hub_offline_reason()
    if reason is not None:
        raise CheckpointError(f"Cannot load {repo_id!r} from the Hugging Face Hub: {filename} is not in the "
                              f"local cache and {reason}. {OFFLINE_ADVICE}")
    return hf_hub_download(repo_id, filename)


def _load_from_hub(repo_id: str) -> ViTClassifier:
    failed = f"Cannot load {repo_id!r} from the Hugging Face Hub (no local folder of that name either)"
    try:
        hub_file(repo_id, CONFIG_NAME)
        return _load_folder(Path(hub_file(repo_id, WEIGHTS_NAME)).parent)
    except CheckpointError:
        raise
    except Exception as error:  # the Hub client raises many kinds (HTTP, validation, I/O); all end here
        raise CheckpointError(f"{failed} ({type(error).__name__}: {error}). {OFFLINE_ADVICE}") from error


def load_checkpoint(source: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> ViTClassifier:
    """A `save_pretrained` folder or a Hub repo id -> ViTClassifier in eval mode on the CPU.

    A relative folder is looked for in the working directory, then in each of `search_dirs` (the
    app passes the repository root). Raises CheckpointError: no such folder, a folder without
    config.json or model.safetensors, weights that are not safetensors or do not fit config.json,
    a config.json no ViTClassifier accepts, or a Hub id that is neither cached nor downloadable."""
    text = str(source)
    for candidate in candidate_folders(text, search_dirs):
        if candidate.is_dir():
            return _load_folder(candidate)
        if candidate.is_file():
            raise CheckpointError(f"{candidate} is a file; pass the checkpoint folder that holds "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    if looks_like_repo_id(text):
        return _load_from_hub(text)
    looked = "" if Path(text).is_absolute() else f" (looked in {', '.join(map(str, [Path.cwd(), *search_dirs]))})"
    raise CheckpointError(f"No checkpoint directory {text!r}{looked}; pass a directory with "
                          f"{CONFIG_NAME} + {WEIGHTS_NAME} or a Hub repo id like user/name.")
