"""The app served in a thread of the tests' own process, the way ``jupybox serve`` serves it.

One harness for every front end's tests (the JSON API, ``/v1``, MCP, the browser UI): the real
ASGI app under ``jupybox serve``'s own uvicorn configuration (bounded connections, its header
timeout), on a free loopback port. In-process, so a test can reach the server's services (its
session manager, its event loop) and measure the server's memory as its own."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from bench.scripted_model import ScriptedModel, scripted_settings
from tests.support.ports import bound_socket
from tests.support.sandboxes import ROOT, docker_settings, serve_settings
from ui.app import create_app
from ui.connections import uvicorn_config
from ui.services import ServeSettings, Services

T = TypeVar("T")
START_S = 60.0
#: The data the UI offers as its example, which the UI's tests upload.
EXAMPLE_CSV = ROOT / "ui" / "examples" / "sales.csv"
#: The browser UI's upload limit on the shared web server.
UPLOAD_LIMIT_MB = 1
#: The API token of the shared API server (and of the servers MCP's tests start).
API_TOKEN = "api-token-5150"


class AppServer:
    """``create_app`` on uvicorn in a thread; use it as a context manager, or ``start()``/``stop()``.
    ``ui=False`` leaves the browser UI out (it has its own tests and takes seconds to build); ``app``
    serves another app on the same services instead (a test of one part, e.g. the UI alone)."""

    def __init__(self, settings: ServeSettings | Services, ui: bool = False, app: Any = None) -> None:
        self.services = settings if isinstance(settings, Services) else Services(settings)
        s = self.services.settings
        self._sock = bound_socket()
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.services, ui=ui) if app is None else app
        config = uvicorn_config(app, host="127.0.0.1", port=self.port,
                                trusted_proxies=s.trusted_proxies, header_timeout_s=s.header_timeout_s,
                                max_connections=s.max_connections, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self._sock])

    def start(self) -> AppServer:
        """Returns once the app answers (its lifespan, the warm sandboxes included, has run)."""
        self._thread.start()
        deadline = time.monotonic() + START_S
        while not self.server.started:
            assert self._thread.is_alive(), "the server did not start (see the log above)"
            assert time.monotonic() < deadline, f"the server did not start within {START_S:.0f} s"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Shuts the app down as SIGTERM would (sessions closed, containers removed)."""
        self.server.should_exit = True
        self._thread.join(60)
        self._sock.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the server's event loop (where its services live) and return its result."""
        assert self.loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sessions(self) -> int:
        """How many sessions the server holds now."""
        return len(self.services.manager.list())


@dataclass
class WebServer:
    """The browser UI's shared server and the scripted model behind it."""

    url: str  # the page: ends with "/"
    model: ScriptedModel
    services: Services
    # Gradio reads its folder from the process's environment (``ui.web.mount_ui``): another UI
    # mounted in this process since (a test's own server) moves it, so the fixture puts it back.
    gradio_folder: str = ""


@contextmanager
def web_ui_server(home: Path) -> Iterator[WebServer]:
    """The browser UI on Docker with its own scripted model, running until the block ends."""
    model = ScriptedModel().start()
    settings = ServeSettings(model=scripted_settings(model), upload_limit_mb=UPLOAD_LIMIT_MB,
                             sandbox=docker_settings(home, instance="webui"))
    try:
        with AppServer(settings, ui=True) as server:
            yield WebServer(f"{server.url}/", model, server.services, os.environ["GRADIO_TEMP_DIR"])
    finally:
        model.stop()


@contextmanager
def local_api_server(home: Path, model: ScriptedModel) -> Iterator[AppServer]:
    """The JSON API, ``/v1`` and MCP on the direct local backend (no browser UI), behind ``API_TOKEN``,
    1 MiB uploads, talking to ``model``: for tests of what the front ends say, not of the sandbox."""
    settings = serve_settings(home, "api-local", model, local=True, api_token=API_TOKEN, upload_limit_mb=1)
    with AppServer(settings) as server:
        yield server
