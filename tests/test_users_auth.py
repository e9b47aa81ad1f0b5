"""A team's server: `jupybox serve` as a subprocess on loopback, users and keys made with the real
`jupybox users` commands while it runs, real HTTP clients (httpx, the official openai client, a
websocket client). Each test is what a user or an admin does and what they must see; the audit
log, the server's log and every file under JUPYBOX_HOME are searched for keys at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.scripted_model import ScriptedModel

JUPYBOX = str(Path(sys.executable).parent / "jupybox")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "team-admin-token-7c1f"


class ServeProcess:
    """`jupybox serve` on a free loopback port, its output kept for the log checks."""

    def __init__(self, home: Path, instance: str, model_url: str, token: str | None = None) -> None:
        self.home = home
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OPENAI_", "JUPYBOX_")) or k == "JUPYBOX_IMAGE"}
        self.env.update(JUPYBOX_HOME=str(home), JUPYBOX_INSTANCE=instance, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        if token:
            self.env["JUPYBOX_API_TOKEN"] = token
        self.log = home / "serve.log"
        home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ui.cli", "serve", "--port", str(self.port), "--openai-base-url", model_url,
             "--openai-model", "scripted-model", "--format", "fenced"],
            cwd=ROOT, env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def users(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "JUPYBOX_API_TOKEN": ""}
        return subprocess.run([JUPYBOX, "users", *args], capture_output=True, text=True, env=env, timeout=120)

    def add(self, name: str, *flags: str) -> str:
        proc = self.users("add", name, *flags)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()[-1]

    def audit(self, **filters: str) -> list[dict]:
        path = self.home / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_audit(self, action: str, **match: str) -> dict:
        """The first audit line with ``action`` and the given fields (written off the request path)."""
        deadline = time.monotonic() + 10
        while True:
            for event in self.audit():
                if event["action"] == action and all(event.get(k) == v for k, v in match.items()):
                    return event
            assert time.monotonic() < deadline, (action, match, self.audit())
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        return self.log.read_text()


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedModel]:
    scripted = ScriptedModel().start()
    yield scripted
    scripted.stop()


@pytest.fixture(scope="module")
def team(sandbox_image: str, jb_home: Path, model: ScriptedModel) -> Iterator[ServeProcess]:
    """A server with the admin token and, from the first test on, users."""
    server = ServeProcess(jb_home / "team", "users-auth-team", model.url, token=TOKEN)
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def whoami(server: ServeProcess, **kw: object) -> httpx.Response:
    return httpx.get(server.url + "/api/whoami", timeout=30, **kw)  # type: ignore[arg-type]


# -- the door opens to keys -------------------------------------------------------------------------
def test_a_users_key_is_accepted_in_every_form_a_client_sends_it(team: ServeProcess) -> None:
    key = team.add("alice", "--max-sessions", "2")
    assert whoami(team, headers=bearer(key)).json() == {"name": "alice", "admin": False, "via": "key"}
    assert whoami(team, headers={"Authorization": f"token {key}"}).json()["name"] == "alice"  # Jupyter clients

    with httpx.Client(base_url=team.url, timeout=30) as browser:
        login = browser.get("/", params={"token": key, "tab": "files"})
        assert login.status_code == 303 and login.headers["location"] == "/?tab=files"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert browser.get("/api/whoami").json()["name"] == "alice"  # the cookie, from now on

    oa = openai.OpenAI(base_url=team.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in oa.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=team.url + "/v1", api_key="jbx_" + "x" * 43, max_retries=0).models.list()

    assert httpx.get(team.url + "/healthz", timeout=30).status_code == 200  # open to all
    r = httpx.get(team.url + "/api/sessions", timeout=30)
    assert r.status_code == 401 and "needs a key" in r.json()["error"] and "jupybox users add" in r.json()["error"]
    accepted = team.wait_for_audit("key.accepted", user="alice")
    assert accepted["client"] == "127.0.0.1" and accepted["detail"]["via"] == "key"


def test_the_admin_token_still_works_and_is_an_admin(team: ServeProcess) -> None:
    team.add("bob", "--admin")
    assert whoami(team, headers=bearer(TOKEN)).json() == {"name": "(admin token)", "admin": True, "via": "token"}
    r = httpx.get(team.url + "/api/sessions", headers=bearer(TOKEN + "x"), timeout=30)
    assert r.status_code == 401 and "not valid" in r.json()["error"]


def test_an_admin_users_key_says_so(team: ServeProcess) -> None:
    key = team.add("carol", "--admin")
    assert whoami(team, headers=bearer(key)).json() == {"name": "carol", "admin": True, "via": "key"}


def test_a_revoked_key_is_refused_on_its_next_request_even_on_an_open_connection(team: ServeProcess) -> None:
    key = team.add("dave")
    with httpx.Client(base_url=team.url, headers=bearer(key), timeout=30) as client:
        assert client.get("/api/whoami").json()["name"] == "dave"
        assert team.users("revoke", "dave").returncode == 0
        r = client.get("/api/whoami")  # the same keep-alive connection
        assert r.status_code == 401 and "not valid" in r.json()["error"]
    refused = team.wait_for_audit("key.refused", reason="the key of revoked user dave")
    assert refused["result"] == "refused"
    # a new key reinstates dave; the revoked one stays refused
    new_key = team.users("key", "dave").stdout.strip()
    assert whoami(team, headers=bearer(new_key)).json()["name"] == "dave"
    assert whoami(team, headers=bearer(key)).status_code == 401


def test_a_replaced_key_stops_working_and_the_new_one_works_at_once(team: ServeProcess) -> None:
    old = team.add("erin")
    assert whoami(team, headers=bearer(old)).status_code == 200
    new = team.users("key", "erin").stdout.strip()
    assert whoami(team, headers=bearer(old)).status_code == 401
    assert whoami(team, headers=bearer(new)).json()["name"] == "erin"
    team.wait_for_audit("key.refused", reason="unknown key (replaced, mistyped or never issued)")


@pytest.mark.parametrize("headers,message", [
    ([("Authorization", "Bearer jbx_aaaa jbx_bbbb")], "more than one key"),
    ([("Authorization", "Bearer jbx_aaaa,jbx_bbbb")], "more than one key"),
    ([("Authorization", "Bearer jbx_aaaa"), ("Authorization", "Bearer jbx_bbbb")], "more than one Authorization"),
    ([("Authorization", "Bearer " + "k" * 5000)], "at most 512"),
    ([("Authorization", "Bearer")], "holds no key"),
    ([("Authorization", b"Bearer jbx_\xe9\xe9\xe9")], "characters no key has"),
    ([("Cookie", "jupybox_token=a\x7fb")], "characters no key has"),
])
def test_malformed_credentials_are_a_clear_400(team: ServeProcess, headers: list, message: str) -> None:
    r = httpx.get(team.url + "/api/sessions", headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert "k" * 100 not in r.text and "jbx_aaaa" not in r.text  # the credential is never echoed
    r = httpx.get(team.url + "/", params=[("token", "a"), ("token", "b")], timeout=30)
    assert r.status_code == 400 and "more than one token=" in r.json()["error"]


def test_websocket_handshakes_need_a_key_too(team: ServeProcess) -> None:
    url = team.url.replace("http", "ws") + "/api/kernels/no-such-kernel/channels"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, open_timeout=30).close()
    assert refused.value.response.status_code == 401
    key = team.add("frank")
    with pytest.raises(InvalidStatus) as past_the_door:
        ws_client.connect(url, additional_headers={"Authorization": f"token {key}"}, open_timeout=30).close()
    assert past_the_door.value.response.status_code == 404  # the key passed; no such kernel


def test_no_key_reaches_the_audit_log_the_servers_log_or_any_file(team: ServeProcess) -> None:
    keys = [team.add("grace"), team.users("key", "alice").stdout.strip()]
    for key in keys:
        assert whoami(team, headers=bearer(key)).status_code == 200
        httpx.get(team.url + "/", params={"token": key}, timeout=30)
        httpx.get(team.url + "/api/sessions", headers=bearer(key + "0"), timeout=30)  # refused, logged
    team.wait_for_audit("key.accepted", user="grace")
    actions = {e["action"] for e in team.audit()}
    assert {"user.added", "user.key_replaced", "user.revoked", "key.accepted", "key.refused"} <= actions
    assert all(e["time"] and e["action"] and e["result"] for e in team.audit())
    log_text = team.log.read_text()
    assert "GET /?token=[redacted]" in log_text
    for secret in (*keys, TOKEN):
        holders = [p for p in team.home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert holders == [], f"a key is in {holders}"
    view = team.users("list")
    assert "grace" in view.stdout and not any(k in view.stdout for k in keys)
    last_used = {json.loads(line)["name"]: json.loads(line)["last_used"]
                 for line in team.users("list", "--json").stdout.splitlines()}
    assert last_used["alice"] is not None


def test_a_revoked_key_ends_its_open_websocket_and_stream(team: ServeProcess) -> None:
    key = team.add("heidi")
    with httpx.Client(base_url=team.url, headers=bearer(key), timeout=60) as client:
        kernel = client.post("/api/kernels", json={})
        assert kernel.status_code == 201, kernel.text
        kid = kernel.json()["id"]
        sid = client.post("/api/sessions").json()["id"]
        try:
            url = team.url.replace("http", "ws") + f"/api/kernels/{kid}/channels"
            with ws_client.connect(url, additional_headers={"Authorization": f"token {key}"}, open_timeout=30) as ws:
                code = "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)"
                with client.stream("POST", f"/api/sessions/{sid}/execute", params={"stream": "true"},
                                   json={"code": code, "timeout_s": 120}) as stream:
                    assert stream.status_code == 200, stream.read()
                    lines = stream.iter_lines()
                    assert any("tick" in line for line in lines)  # the stream runs
                    assert team.users("revoke", "heidi").returncode == 0
                    revoked_at = time.monotonic()
                    with pytest.raises(httpx.RemoteProtocolError):  # cut off, as for a client that left
                        for _ in lines:  # within a few seconds, not after its 60 s of ticks
                            assert time.monotonic() - revoked_at < 15
                stream_ended = time.monotonic() - revoked_at
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        ws.recv(timeout=15)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert stream_ended < 15
        finally:
            admin = {"Authorization": f"Bearer {TOKEN}"}
            client.delete(f"/api/kernels/{kid}", headers=admin)
            client.delete(f"/api/sessions/{sid}", headers=admin)
    team.wait_for_audit("key.refused", result="closed")


# -- a server without users ---------------------------------------------------------------------------
def test_without_users_the_server_is_loopback_only_until_the_first_user_closes_the_door(
        sandbox_image: str, jb_home: Path, model: ScriptedModel) -> None:
    server = ServeProcess(jb_home / "solo", "users-auth-solo", model.url)
    try:
        assert whoami(server).json() == {"name": "(local)", "admin": True, "via": "loopback"}
        assert whoami(server, headers=bearer("anything")).status_code == 200  # e.g. an OpenAI client's api_key
        r = whoami(server, headers={"Host": "rebinding.example"})
        assert r.status_code == 400 and "jupybox users add" in r.json()["error"]

        key = server.add("alice")
        r = whoami(server)  # the next request after the first user is added
        assert r.status_code == 401 and "needs a key" in r.json()["error"]
        assert whoami(server, headers=bearer(key)).json()["name"] == "alice"

        # a store that cannot be read refuses every key (there is no token here): never the open door
        db = server.home / "jupybox.db"
        saved = db.read_bytes()
        for extra in ("jupybox.db-wal", "jupybox.db-shm"):
            (server.home / extra).unlink(missing_ok=True)
        db.write_bytes(b"garbage" * 1000)
        r = whoami(server, headers=bearer(key))
        assert r.status_code == 503 and "user store cannot be read" in r.json()["error"]
        assert whoami(server).status_code == 401
        assert whoami(server, headers={"Host": "localhost"}).status_code == 401
        db.write_bytes(saved)
        assert whoami(server, headers=bearer(key)).json()["name"] == "alice"
    finally:
        log_text = server.stop()
    assert "damaged or not a jupybox store" in log_text and "Traceback" not in log_text
