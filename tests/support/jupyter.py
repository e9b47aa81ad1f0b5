"""Jupyter Server (the server under JupyterLab and Notebook) started with ``--gateway-url`` at a
jupybox server, so that its own gateway client code speaks to jupybox, and a cell run through its
channels websocket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import websockets.sync.client as ws_client
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from tests.support.ports import free_port

TOKEN = "jupyter-server-token-3a7c"  # what the Jupyter Server takes from its own clients
START_S = 120.0


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@contextmanager
def jupyter_server(gateway: str, key: str, home: Path, token: str = TOKEN) -> Iterator[str]:
    """Jupyter Server (the one under JupyterLab and Notebook) whose kernels live in jupybox, its
    gateway client holding ``key``; its URL. It takes ``token`` from its own clients; its folders
    are under ``home``; the Lab extension installed beside it is told to fetch no news and check
    no updates, so it reaches nothing outside this machine."""
    for d in ("config", "data", "runtime", "root"):
        (home / d).mkdir(parents=True, exist_ok=True)
    (home / "config" / "jupyter_server_config.json").write_text(json.dumps({"LabApp": {
        "news_url": None, "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate"}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
    port, log = free_port(), home / "jupyter-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ip=127.0.0.1",
             f"--port={port}", f"--ServerApp.root_dir={home / 'root'}", f"--IdentityProvider.token={token}",
             f"--gateway-url={gateway}", f"--GatewayClient.auth_token={key}"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/api/status", headers=auth(token), timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"Jupyter Server did not answer:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_cell(ws_url: str, code: str, token: str = TOKEN) -> str:
    """What ``code`` printed, run over a Jupyter Server's channels websocket (its JSON protocol)."""
    request = Session().msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                "user_expressions": {}, "allow_stdin": False,
                                                "stop_on_error": True})
    printed = ""
    with ws_client.connect(ws_url, additional_headers=auth(token), open_timeout=60) as ws:
        ws.send(json.dumps({**request, "channel": "shell", "buffers": []}, default=json_default))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                continue
            if msg["msg_type"] == "stream":
                printed += msg["content"]["text"]
            elif msg["msg_type"] == "execute_reply":
                assert msg["content"]["status"] == "ok", msg["content"]
                return printed
