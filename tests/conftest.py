"""Fixtures start what the tests need: a Docker daemon that answers, the sandbox image (built or
taken from the cache), session managers on real backends. Nothing here is mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import SandboxSettings, SessionManager
from sandbox.config import SANDBOX_IMAGE
from tests.scripted_model import ScriptedModel

ROOT = Path(__file__).resolve().parent.parent


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


def docker_settings(home: Path, **kw: object) -> SandboxSettings:
    """Docker settings on the image the ``sandbox_image`` fixture built for this tree."""
    kw.setdefault("image", os.environ.get("JUPYBOX_IMAGE", SANDBOX_IMAGE))
    return SandboxSettings(backend="docker", home=home, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def docker_manager(sandbox_image: str, jb_home: Path) -> AsyncIterator[SessionManager]:
    async with SessionManager(docker_settings(jb_home, instance="tests")) as manager:
        yield manager


def run_under_triton_interpreter(script: str, arg: object) -> Any:
    """Run ``script`` (given ``arg`` as JSON in ``sys.argv[1]``) in a fresh Python under Triton's CPU
    interpreter, the only way a GPU kernel's own source runs here, and return the JSON it prints
    last. A fresh process, because Triton reads ``TRITON_INTERPRET`` when a kernel is defined."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def jupybox_containers() -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=jupybox"], capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedModel]:
    """The scripted model (the suite's only fake) on loopback, shared by a module's tests; a
    module that needs one per test defines its own."""
    m = ScriptedModel().start()
    yield m
    m.stop()


def pytest_configure(config: pytest.Config) -> None:
    """One CPU thread for PyTorch's operations, here and in the processes the tests start (unless
    OMP_NUM_THREADS says otherwise): the models and kernels the tests run are small, and on a busy
    host an operation split over two threads waits for the second to get a core. Set before any
    test module imports torch, which reads it once."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
