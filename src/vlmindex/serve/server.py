"""Running ``vlmindex serve``: one process, or N worker processes behind one listening socket.

One process runs one request's Python at a time (the GIL), so under concurrent clients it leaves
cores idle: 8 clients by image_id on an HNSW index of 100k vectors, on 2 cores, got about 400
requests/s from one process and 420-620 from two. Not so on a flat index: one process searches
the queries waiting together in one pass over the vectors (``service._Batcher``), N processes
make N passes (8 clients, 100k, 2 cores: 201-219 requests/s from one, 150-160 from two). Each
worker builds its own service from the settings of the command's (its own caches and loaded
models; each checks every index it opens, as one process does), through uvicorn's supervisor,
which restarts a worker that dies.

Each worker's thread teams (BLAS, OpenMP, torch) get the cores divided by N, unless the
environment already sets their sizes: a team of every core per worker spins against the others'
(on one host, 2 workers on 2 cores, when a flat index was searched by BLAS: p50 146 ms with 8
clients, against 73 with one worker and 71-99 with the cores divided). The flat scan's threads
(``scan.team_size``) follow the same variables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlmindex.catalog import Workspace
from vlmindex.errors import VlmindexError
from vlmindex.models import LoadOptions
from vlmindex.serve.scan import THREAD_VARIABLES, cores
from vlmindex.serve.service import Limits, NeighbourService

SETTINGS_ENV = "VLMINDEX_SERVE_SETTINGS"  # how `serve --workers N` hands the command's settings to each worker
PARENT_POLL_S = 1.0


def check_port(host: str, port: int) -> None:
    """Refuse an address already in use, in one line naming it, before any worker starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise VlmindexError(f"--host {host}: {exc.strerror or exc}; give an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise VlmindexError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                                "or stop what is listening there") from None


class _StartupFailures(logging.Filter):
    """Takes uvicorn's line saying a worker failed to start (the command says why, in one line
    of its own) and remembers that it came: its supervisor then returns as it does on Ctrl-C."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to start" in record.getMessage():
            self.seen = True
            return False
        return True


def run(service: NeighbourService, *, host: str, port: int, workers: int = 1) -> None:
    """Answer requests on ``host:port`` until interrupted, in ``workers`` processes."""
    import uvicorn

    from vlmindex.serve.app import create_app

    if workers == 1:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False)
        return
    for variable in THREAD_VARIABLES:
        os.environ.setdefault(variable, str(max(1, cores() // workers)))  # read by each worker at its start
    os.environ[SETTINGS_ENV] = json.dumps({"workspace": str(service.ws.root), "parent": os.getpid(),
                                           "limits": dataclasses.asdict(service.limits),
                                           "load": dataclasses.asdict(service.load)})
    failures = _StartupFailures()
    log = logging.getLogger("uvicorn.error")
    log.addFilter(failures)
    try:
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False)
    finally:
        log.removeFilter(failures)
    if failures.seen:
        service.ws.require()  # gone since the command checked it: that one line
        raise VlmindexError("a worker process could not start; `vlmindex serve` without --workers says why")


def app_from_environment() -> Any:
    """The application of one worker process of ``serve --workers N``, from its parent's settings.

    A workspace gone since the parent checked it exits with uvicorn's startup-failure code, on
    which its supervisor stops all workers instead of starting this one again, and the parent
    says why."""
    from uvicorn.config import STARTUP_FAILURE

    from vlmindex.serve.app import create_app

    settings = json.loads(os.environ[SETTINGS_ENV])
    _stop_with_parent(int(settings["parent"]))
    try:
        service = NeighbourService(Workspace(Path(settings["workspace"])), limits=Limits(**settings["limits"]),
                                   load=LoadOptions(**settings["load"]))
    except VlmindexError:
        sys.exit(STARTUP_FAILURE)
    return create_app(service)


def _stop_with_parent(parent: int) -> None:
    """Stop this worker, as on SIGTERM, once its supervisor is gone (SIGKILL, the OOM killer):
    uvicorn's workers outlive it, still serving and holding the port."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="vlmindex-parent-watch", daemon=True).start()
