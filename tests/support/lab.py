"""JupyterLab from PyPI as a real gateway client of jupybox's kernels API (``--gateway-url``), with
what starting and stopping a server subprocess needs; used by the kernels API's tests on docker and
on the ray cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

LAB_TOKEN = "lab-token-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer within {seconds:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


@dataclass
class Lab:
    url: str
    ws: str
    root: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"token {LAB_TOKEN}"}, timeout=120)


@contextmanager
def running_lab(gateway_url: str, home: Path, token: str | None = None) -> Iterator[Lab]:
    """JupyterLab whose kernels live in the jupybox server at ``gateway_url`` (``token``: its API
    token, if it has one); told to fetch no news, check no updates and offer no extension installs,
    so it reaches nothing outside this machine."""
    for d in ("config", "data", "runtime", "root", "settings", "workspaces"):
        (home / d).mkdir(parents=True, exist_ok=True)
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))  # and do not ask
    (home / "config" / "jupyter_server_config.json").write_text(json.dumps({
        "LabApp": {"news_url": None, "extension_manager": "readonly",
                   "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate"},
        "ServerApp": {"open_browser": False}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1"}
    port = free_port()
    log = home / "lab.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--ServerApp.root_dir={home / 'root'}", f"--IdentityProvider.token={LAB_TOKEN}",
             f"--gateway-url={gateway_url}", *([f"--GatewayClient.auth_token={token}"] if token else [])],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status?token={LAB_TOKEN}", proc, log)
        yield Lab(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", home / "root")
    finally:
        stop(proc)
