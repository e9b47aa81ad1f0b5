"""The HTTP API end to end: a real uvicorn server on loopback, the scripted model server (the only
fake) behind the interpreter. What the API says runs on the local backend; what it promises of a
container (its limits, its removal) on the real docker sandbox. Every request is real HTTP."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.scripted_model import ScriptedModel, last_observation, scripted_settings
from tests.support.ports import free_port
from tests.support.replies import code_reply
from tests.support.sandboxes import ROOT, local_settings, serve_settings
from tests.support.server import API_TOKEN as TOKEN
from tests.support.server import AppServer
from tests.support.sse import sse_events
from ui.middleware import BODY_LIMIT
from ui.serve import RedactToken
from ui.services import ServeSettings

#: What a test needs of the container itself runs on Docker: ``@ON_DOCKER`` picks this module's
#: own server for its ``server`` and ``client``; the others share the run's local-backend server.
ON_DOCKER = pytest.mark.parametrize("server", ["docker"], indirect=True)


def owner_containers(owner: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=jupybox.owner={owner}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def docker_server(sandbox_image: str, jb_home: Path, scripted_model: ScriptedModel) -> Iterator[AppServer]:
    settings = serve_settings(jb_home / "api", "api-tests", scripted_model, api_token=TOKEN, upload_limit_mb=1)
    with AppServer(settings) as srv:
        yield srv


@pytest.fixture
def server(request: pytest.FixtureRequest, api_server: AppServer) -> AppServer:
    return request.getfixturevalue("docker_server") if getattr(request, "param", None) == "docker" else api_server


@pytest.fixture
def client(server: AppServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture
def session_id(client: httpx.Client) -> Iterator[str]:
    r = client.post("/api/sessions")
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    yield sid
    client.delete(f"/api/sessions/{sid}")


def test_health_is_open_and_everything_else_needs_the_token(server: AppServer) -> None:
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/healthz").json()["status"] == "ok"
        r = anon.get("/api/sessions")
        assert r.status_code == 401 and "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        r = anon.get("/api/sessions", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"error": "the API token is wrong"}
        assert anon.get("/metrics").status_code == 401 and anon.get("/").status_code == 401
        # A token in the query string counts on the UI's entry only: elsewhere it would end up in logs.
        assert anon.get("/api/sessions", params={"token": TOKEN}).status_code == 401
        assert anon.get("/", params={"token": "wrong"}).status_code == 401
        # The browser's way in: /?token= once; the cookie is set and the URL loses the token.
        r = anon.get("/", params={"lang": "zh", "token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/?lang=zh"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"jupybox_token={TOKEN};") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert anon.get("/api/sessions").status_code == 200 and anon.get("/").status_code == 200


def test_the_access_log_never_shows_the_token() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/?lang=zh&token={TOKEN}", "1.1", 303), None)
    assert RedactToken().filter(record)
    assert TOKEN not in record.getMessage() and "/?lang=zh&token=[redacted]" in record.getMessage()


@ON_DOCKER
def test_session_create_get_list_delete(client: httpx.Client) -> None:
    r = client.post("/api/sessions", json={})
    assert r.status_code == 201
    info = r.json()
    sid = info["id"]
    assert info["limits"]["memory_mb"] == 1024 and info["executions"] == 0
    assert client.get(f"/api/sessions/{sid}").json()["id"] == sid
    assert sid in [s["id"] for s in client.get("/api/sessions").json()["sessions"]]
    assert client.delete(f"/api/sessions/{sid}").status_code == 204
    r = client.get(f"/api/sessions/{sid}")
    assert r.status_code == 404 and sid in r.json()["error"]
    assert client.delete(f"/api/sessions/{sid}").status_code == 404
    assert client.post("/api/sessions/nope/execute", json={"code": "1"}).status_code == 404
    # lower limits are honoured by the container; limits above the server's are refused with a reason
    r = client.post("/api/sessions", json={"limits": {"memory_mb": 256, "pids": 64}})
    assert r.status_code == 201 and r.json()["limits"]["memory_mb"] == 256
    small = r.json()["id"]
    host = json.loads(subprocess.run(["docker", "inspect", f"jupybox-{small}"], capture_output=True, text=True,
                                     check=True).stdout)[0]["HostConfig"]
    assert host["Memory"] == 256 * 2**20 and host["PidsLimit"] == 64
    assert client.delete(f"/api/sessions/{small}").status_code == 204
    r = client.post("/api/sessions", json={"limits": {"memory_mb": 999999}})
    assert r.status_code == 400 and "memory_mb=999999" in r.json()["error"]


def test_execute_returns_json_and_keeps_state(client: httpx.Client, session_id: str) -> None:
    r = client.post(f"/api/sessions/{session_id}/execute", json={"code": "x = 6 * 7\nprint(x)"})
    assert r.status_code == 200
    ex = r.json()
    assert ex["status"] == "ok" and ex["outputs"] == [{"kind": "stream", "name": "stdout", "text": "42\n"}]
    ex = client.post(f"/api/sessions/{session_id}/execute", json={"code": "1 / 0"}).json()
    assert ex["status"] == "error" and ex["outputs"][0]["ename"] == "ZeroDivisionError"
    ex = client.post(f"/api/sessions/{session_id}/execute", json={"code": "x + 1"}).json()
    assert ex["outputs"][0]["data"]["text/plain"] == "43"
    ex = client.post(f"/api/sessions/{session_id}/execute",
                     json={"code": "import time\ntime.sleep(10)", "timeout_s": 1}).json()
    assert ex["status"] == "timeout" and "timed out after 1 s" in ex["reason"]


def test_execute_streams_outputs_as_server_sent_events(client: httpx.Client, session_id: str) -> None:
    code = "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.2)"
    with client.stream("POST", f"/api/sessions/{session_id}/execute", params={"stream": "true"},
                       json={"code": code}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    # one event per flush at least (the kernel may split a line across two flushes), then the execution
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "execution" and set(kinds[:-1]) == {"output"} and len(kinds) >= 4, kinds
    assert "".join(e["output"]["text"] for e in events[:-1]) == "tick 0\ntick 1\ntick 2\n"
    assert events[-1]["execution"]["status"] == "ok"


def test_files_upload_list_download_delete(client: httpx.Client, session_id: str) -> None:
    base = f"/api/sessions/{session_id}/files"
    rows = "".join(f"{i},{i * i}\n" for i in range(100)).encode()
    r = client.post(base, files={"file": ("squares.csv", rows, "text/csv")})
    assert r.status_code == 201
    assert {k: r.json()["files"][0][k] for k in ("path", "size")} == {"path": "squares.csv", "size": len(rows)}
    r = client.post(base, params={"path": "in/notes.txt"}, files={"file": ("whatever.txt", b"hello")})
    assert r.status_code == 201 and r.json()["files"][0]["path"] == "in/notes.txt"
    code = ("import pandas as pd\nprint(pd.read_csv('squares.csv', header=None)[1].sum())\n"
            "open('out.txt', 'w').write('made here')")
    ex = client.post(f"/api/sessions/{session_id}/execute", json={"code": code}).json()
    assert ex["outputs"][0]["text"] == f"{sum(i * i for i in range(100))}\n"
    listed = {f["path"]: f["size"] for f in client.get(base).json()["files"]}
    assert listed == {"squares.csv": len(rows), "in/notes.txt": 5, "out.txt": 9}
    r = client.get(f"{base}/out.txt")
    assert r.status_code == 200 and r.content == b"made here" and "out.txt" in r.headers["content-disposition"]
    assert client.get(f"{base}/squares.csv").content == rows
    assert client.delete(f"{base}/in/notes.txt").status_code == 204
    r = client.get(f"{base}/in/notes.txt")
    assert r.status_code == 404 and "no such file" in r.json()["error"]


def test_unsafe_and_oversized_uploads_are_refused(client: httpx.Client, session_id: str) -> None:
    base = f"/api/sessions/{session_id}/files"
    for name in ("../escape.txt", "/etc/passwd", "a/../../b"):
        r = client.post(base, files={"file": (name, b"x")})
        assert r.status_code == 400 and "error" in r.json(), (name, r.text)
    r = client.post(base, params={"path": "../x"}, files={"file": ("ok.txt", b"x")})
    assert r.status_code == 400 and "'..'" in r.json()["error"]
    assert client.get(f"{base}/%2e%2e/%2e%2e/etc/passwd").status_code == 400
    big = b"0" * (1 << 20)  # the test server's limit is 1 MiB per upload
    r = client.post(base, files={"file": ("big.bin", big)})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
        for _ in range(24):
            yield b"0" * 65536
        yield b"\r\n--b--\r\n"

    r = client.post(base, content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert client.get(base).json()["files"] == []  # nothing partial was left behind


def test_request_bodies_over_the_limit_are_refused(client: httpx.Client, session_id: str) -> None:
    url = f"/api/sessions/{session_id}/execute"
    code = json.dumps({"code": "x = 1  # " + "y" * BODY_LIMIT}).encode()
    r = client.post(url, content=code, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and f"{BODY_LIMIT:,} bytes" in r.json()["error"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(code), 1 << 20):
            yield code[i:i + (1 << 20)]

    r = client.post(url, content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = client.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    assert client.post(url, json={"code": "print('still here')"}).json()["outputs"][0]["text"] == "still here\n"


def test_bad_requests_get_clear_json_errors(client: httpx.Client, session_id: str) -> None:
    url = f"/api/sessions/{session_id}/execute"
    r = client.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body is not valid JSON")
    r = client.post(url, json={"code": "1", "surprise": True})
    assert r.status_code == 422 and "surprise" in r.json()["error"]
    r = client.post(url, json={})
    assert r.status_code == 422 and "code" in r.json()["error"]
    r = client.get("/api/no/such/route")
    assert r.status_code == 404 and "no route GET /api/no/such/route" in r.json()["error"]
    for r in (client.post(url, content=b"{not json"), client.post(url, json={"code": 5})):
        assert "Traceback" not in r.text


def test_metrics_count_executions(client: httpx.Client, session_id: str) -> None:
    client.post(f"/api/sessions/{session_id}/execute", json={"code": "print('counted')"})
    text = client.get("/metrics").text
    assert re.search(r'^jupybox_executions_total\{source="api",status="ok"\} [1-9]', text, re.M)
    assert re.search(r"^jupybox_sessions_open [1-9]", text, re.M)
    assert 'jupybox_execution_duration_seconds_bucket{le="0.1",source="api"}' in text
    assert "jupybox_model_tokens_total" in text


def test_chat_streams_events_and_answers_with_the_computed_number(
        client: httpx.Client, session_id: str, model: ScriptedModel) -> None:
    model.enqueue(code_reply("print(sum(i * i for i in range(12)))"),
                  lambda body: f"The sum of squares is {last_observation(body)}.")
    with client.stream("POST", f"/api/sessions/{session_id}/chat", json={"message": "sum of squares below 12?"}) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "text_delta" and {"code", "output", "execution", "usage"} <= set(kinds)
    assert events[-1] == {"type": "answer", "text": "The sum of squares is 506.", "data": {"finish_reason": "stop"}}
    # the session keeps its conversation: the notebook has the cell, the metrics the turn and its tokens
    nb = client.get(f"/api/sessions/{session_id}/notebook").json()
    assert any("range(12)" in "".join(c["source"]) for c in nb["cells"])
    assert re.search(r'^jupybox_chat_turns_total\{outcome="answer",source="api"\} 1', client.get("/metrics").text, re.M)


def test_client_leaving_a_chat_interrupts_the_running_code(
        client: httpx.Client, session_id: str, model: ScriptedModel) -> None:
    model.enqueue(code_reply("import time\nprint('started', flush=True)\ntime.sleep(60)"))
    with client.stream("POST", f"/api/sessions/{session_id}/chat", json={"message": "wait a minute"}) as r:
        for event in sse_events(r):
            if event["type"] == "output":
                break  # the code is running: hang up
    t0 = time.monotonic()
    while client.get(f"/api/sessions/{session_id}").json()["busy"]:
        assert time.monotonic() - t0 < 10, "the turn did not stop after the client left"
        time.sleep(0.1)
    ex = client.post(f"/api/sessions/{session_id}/execute", json={"code": "print('free')"}).json()
    assert ex["outputs"][0]["text"] == "free\n"
    assert time.monotonic() - t0 < 15


def test_openapi_schema_documents_the_api(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/sessions", "/api/sessions/{session_id}/execute", "/api/sessions/{session_id}/files",
              "/api/sessions/{session_id}/chat", "/v1/chat/completions"):
        assert p in paths


def test_without_a_model_the_server_runs_code_and_explains_chat(sandbox_image: str, jb_home: Path) -> None:
    """`jupybox serve` with no flags: the default local model cannot load here, the server starts anyway."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_")) or k == "JUPYBOX_IMAGE"}
    env.update(JUPYBOX_HOME=str(jb_home / "nm"), JUPYBOX_INSTANCE="api-tests-nomodel", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        deadline = time.monotonic() + 180  # importing torch and transformers takes a while on a busy host
        with httpx.Client(base_url=url, timeout=60) as c:
            while (status := c.get("/api/status").json())["model_loading"]:
                assert time.monotonic() < deadline, "the default model neither loaded nor failed"
                time.sleep(0.2)
            assert status["model_available"] is False and "--openai-base-url" in status["model_error"]
            sid = c.post("/api/sessions").json()["id"]
            ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(2 ** 10)"}).json()
            assert ex["outputs"][0]["text"] == "1024\n"
            r = c.post(f"/api/sessions/{sid}/chat", json={"message": "hi"})
            assert r.status_code == 503 and "Configure one" in r.json()["error"]
            assert "--openai-base-url" in r.json()["error"]
            r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503 and "--openai-base-url" in r.json()["error"]["message"]
            assert c.get("/").status_code == 200  # the UI, or the page that says it is not built
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--openai-base-url" in out  # the log says what to configure
    owners = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=jupybox", "--format", '{{.Label "jupybox.owner"}}'],
        capture_output=True, text=True, check=True).stdout.split()
    assert not [o for o in owners if o.startswith(f"api-tests-nomodel.{proc.pid}.")]


def test_a_sandbox_shutting_down_is_a_503_with_the_reason(jb_home: Path, model: ScriptedModel) -> None:
    sandbox = local_settings(jb_home / "down", instance="api-tests-down")
    with AppServer(ServeSettings(sandbox=sandbox, model=scripted_settings(model))) as srv:
        srv.run(srv.services.manager.shutdown())
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/api/sessions")
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json() == {"error": "the sandbox is shutting down: try again once it is back"}
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


@ON_DOCKER
def test_stopping_the_server_leaves_no_container(server: AppServer, client: httpx.Client) -> None:
    client.post("/api/sessions")
    owner = server.services.manager.owner
    assert owner_containers(owner)
    server.stop()
    assert owner_containers(owner) == []
