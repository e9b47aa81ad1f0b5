"""Fixtures start what the tests need: a Docker daemon that answers, the sandbox image (built or
taken from the cache), session managers on real backends, the scripted model, gVisor, one Chromium
and the browser UI's server. Nothing here is mocked; what they are built from is ``tests/support``.

What is expensive to start (Chromium, gVisor's set-up, the browser UI's server, the API server on
the local backend) starts once a run."""

from __future__ import annotations

import os

# Gradio reads these when it is imported: no analytics calls, and closed tabs noticed quickly.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "1"

import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import pytest  # noqa: E402

from bench.scripted_model import ScriptedModel  # noqa: E402
from sandbox import SessionManager  # noqa: E402
from tests.support.browser import Chromium, attach  # noqa: E402
from tests.support.gvisor import run_setup  # noqa: E402
from tests.support.real_model import smollm2  # noqa: E402,F401  (a fixture)
from tests.support.sandboxes import docker_settings  # noqa: E402

if TYPE_CHECKING:
    from tests.support.server import AppServer, WebServer


def _docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Each phase's report on the test item (``item.rep_call``...), so that a fixture's teardown
    can tell whether its test failed (e.g. to print a server's log only then)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def docker_daemon() -> None:
    """A Docker daemon that answers; started here when none does (as the README's setup does)."""
    if _docker_answers():
        return
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed: run ./jupybox.sh test, which installs docker.io")
    subprocess.Popen(["dockerd"], stdout=open("/var/log/jupybox-dockerd.log", "ab"), stderr=subprocess.STDOUT,
                     start_new_session=True)
    for _ in range(60):
        if _docker_answers():
            return
        time.sleep(0.5)
    pytest.fail("dockerd did not start; see /var/log/jupybox-dockerd.log")


@pytest.fixture(scope="session")
def sandbox_image(docker_daemon: None) -> str:
    from sandbox.build import build_image

    tag = build_image()
    # The exact image of this tree, for settings made here and for CLIs and servers started as
    # subprocesses: `jupybox-sandbox:latest` is shared with any other checkout on this host.
    os.environ["JUPYBOX_IMAGE"] = tag
    return tag


@pytest.fixture(scope="session")
def jb_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short on purpose: Unix socket paths are limited to 107 bytes.
    return tmp_path_factory.mktemp("jb")


@pytest.fixture(scope="session")
async def docker_manager(sandbox_image: str, jb_home: Path) -> AsyncIterator[SessionManager]:
    async with SessionManager(docker_settings(jb_home, instance="tests")) as manager:
        yield manager


@pytest.fixture(scope="session")
def gvisor_runtime(docker_daemon: None) -> str:
    """gVisor registered with Docker by ``scripts/setup-gvisor.sh``, once a run; its name."""
    if os.geteuid() != 0:
        pytest.fail("the gVisor tests set up the runsc runtime and need root (run ./jupybox.sh test as root)")
    done = run_setup()
    if done.returncode != 0:
        pytest.fail(f"scripts/setup-gvisor.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return "runsc"


@pytest.fixture(scope="session")
def scripted_model() -> Iterator[ScriptedModel]:
    """The scripted model (the suite's only fake) on loopback, one for the run; servers that
    live longer than a test take this one, tests take ``model``."""
    m = ScriptedModel().start()
    yield m
    m.stop()


@pytest.fixture
def model(scripted_model: ScriptedModel) -> ScriptedModel:
    """The run's scripted model with an empty queue, so that replies a test left unread don't
    answer the next one. A module that needs a model of its own defines this fixture itself."""
    scripted_model.replies.clear()
    return scripted_model


@pytest.fixture(scope="session")
def api_server(jb_home: Path, scripted_model: ScriptedModel) -> Iterator[AppServer]:
    """One server on the local backend for the run: the JSON API's, ``/v1``'s and MCP's protocol
    tests share it (``tests.support.server.API_TOKEN``). Sessions are the server's, so a test
    counts what it made, never what the server holds in all."""
    from tests.support.server import local_api_server

    with local_api_server(jb_home / "api-local", scripted_model) as server:
        yield server


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """One headless Chromium process for the run."""
    process = Chromium.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(chromium: Chromium) -> Iterator[Any]:
    """Playwright's browser on the run's Chromium, for one module: while it is attached, an event
    loop runs in the main thread, so a module's async tests cannot run beside it."""
    with attach(chromium) as b:
        yield b


@pytest.fixture(scope="session")
def web_ui(sandbox_image: str, jb_home: Path) -> Iterator[WebServer]:
    """The browser UI on Docker for the run; tests take ``web_server``."""
    from tests.support.server import web_ui_server  # the app takes seconds to import: only when needed

    with web_ui_server(jb_home / "web") as server:
        yield server


@pytest.fixture
def web_server(web_ui: WebServer, monkeypatch: pytest.MonkeyPatch) -> WebServer:
    """The run's browser UI, shared by the UI's test modules, its model's queue emptied and its
    Gradio folder in force. Each browser context (or API client) is its own Gradio session, so
    tests don't see each other's."""
    web_ui.model.replies.clear()
    monkeypatch.setenv("GRADIO_TEMP_DIR", web_ui.gradio_folder)
    return web_ui


def pytest_configure(config: pytest.Config) -> None:
    """One CPU thread for PyTorch's operations, here and in the processes the tests start (unless
    OMP_NUM_THREADS says otherwise): the models and kernels the tests run are small, and on a busy
    host an operation split over two threads waits for the second to get a core. Set before any
    test module imports torch, which reads it once."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
