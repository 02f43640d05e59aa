"""The local Hugging Face cache: where weights are, whether downloads are allowed, and checksums.

Every lookup reads the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``, ``HF_HUB_OFFLINE``), not
at import time as ``huggingface_hub.constants`` does, so a process (or a test) that changes them is
obeyed. Nothing here downloads unless :func:`download_allowed` says so.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vlmindex.errors import VlmindexError

_TRUE = {"1", "ON", "YES", "TRUE"}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache in force now (``HF_HUB_CACHE`` > ``HF_HOME``/hub > the library default)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(os.path.expanduser(env[key])))
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (now, or when the hub was imported)."""
    if any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True
    return bool(constants.HF_HUB_OFFLINE)


def download_allowed() -> bool:
    """Not offline by the environment, and the hub answers a TCP connect within a few seconds.

    Without the probe, huggingface_hub retries an unreachable host with back-off for ~25 s per
    file, so a study naming ten uncached models would stall for minutes before skipping them.
    """
    return not is_offline() and hub_reachable()


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The cached copy of ``repo_id/filename`` (revision ``main``), or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    except Exception:  # noqa: BLE001 - a malformed repo id is simply "not cached"
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found)
    return None


def download_file(repo_id: str, filename: str) -> Path:
    """Download one file into the cache (callers check :func:`download_allowed` first)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, cache_dir=str(hf_cache_dir())))


def snapshot(repo_id: str, allow_patterns: Sequence[str]) -> Path:
    """Download the files of ``repo_id`` matching ``allow_patterns``; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo_id, allow_patterns=list(allow_patterns), cache_dir=str(hf_cache_dir()))
    )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub (and transformers, which asks it) cache-only for the duration.

    Used once every file a load needs is known to be cached: libraries that would otherwise send a
    HEAD request per file (open_clip's HF text towers, tokenizers) then read the cache directly instead
    of waiting for a network timeout on an air-gapped machine.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes.

    A file in the Hugging Face cache is a link to ``blobs/<sha256>`` when it is stored with Git LFS (all
    weight files are); that name *is* the SHA-256 of the content, so it is used instead of rereading
    gigabytes. Anything else is hashed.
    """
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256_HEX.match(real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(paths: Iterable[str | os.PathLike[str]]) -> str | None:
    """One checksum for the weight files a model was loaded from.

    One file: its SHA-256. Several (sharded checkpoints): SHA-256 of the lines ``"<name> <sha256>\\n"``
    in name order, so the value does not depend on the folder the shards sit in.
    """
    files = sorted(Path(p) for p in paths)
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def missing_error(name: str, source: str, *, gated: bool = False, detail: str = "") -> VlmindexError:
    """The one-line error for a model whose weights are not here and cannot be fetched now."""
    if is_offline():
        why = "downloads are off (HF_HUB_OFFLINE=1)"
    elif not hub_reachable():
        why = "the Hugging Face hub cannot be reached (no network?)"
    else:
        why = "the download failed"
    extra = f" ({detail})" if detail else ""
    msg = (
        f"model '{name}' ({source}) is not in the local cache {hf_cache_dir()} and {why}{extra}: "
        "run once with network access to download it, or pass --checkpoint DIR with a local copy"
    )
    if gated:
        repo = source.split(":", 1)[-1].split("/", 2)
        url = "https://huggingface.co/" + "/".join(repo[:2])
        msg += (
            f"; it is gated: accept its terms at {url} and log in (`hf auth login` or HF_TOKEN) before "
            "downloading"
        )
    return VlmindexError(one_line(msg))


def one_line(text: object, limit: int = 600) -> str:
    """Collapse whitespace so an error message is one line; cut library messages that run on."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
