"""Deploying with Docker, as the README's "Deploy with Docker" says: both images built here (no
registry), the app started by `docker compose` from the repository's compose.yaml with the host's
socket mounted, then used over HTTP on loopback like a client would. Sandboxes must be siblings in
the host's daemon, and stopping (or killing and restarting) the app must leave none behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from sandbox.build import build_image
from tests.support.sandboxes import ROOT

# A cold cache builds both images first (minutes); warm, the module takes about a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TOKEN = "deploy-test-token"
SERVICE = "jupybox"


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed: `apt-get install docker-compose` "
                "(./jupybox.sh test does)")


def clean_env() -> dict[str, str]:
    """Only what the docker CLI needs: the caller's JUPYBOX_* or OPENAI_* must not reach compose."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}


def compose_config(env_file: Path) -> dict:
    out = subprocess.run([*compose_command(), "-f", str(ROOT / "compose.yaml"), "--env-file", str(env_file),
                          "config"], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def sandbox_containers(instance: str) -> list[dict[str, str]]:
    """The host daemon's jupybox sandbox containers owned by ``instance`` (any process of it)."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", "label=jupybox", "--format", "{{json .}}"],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    mine = []
    for row in rows:
        labels = dict(kv.split("=", 1) for kv in row["Labels"].split(",") if "=" in kv)
        if labels.get("jupybox.owner", "").startswith(f"{instance}."):
            mine.append({"id": row["ID"], "name": row["Names"], "owner": labels["jupybox.owner"]})
    return mine


def inspect(container: str) -> dict:
    out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


class Deployment:
    """One compose project from compose.yaml: its own name, instance, JUPYBOX_HOME and port."""

    def __init__(self, app_image: str, home: Path) -> None:
        self.project = f"jbdeploy{uuid.uuid4().hex[:8]}"
        self.instance = f"deploytest-{uuid.uuid4().hex[:6]}"
        self.home = home
        self.env_file = home.parent / f"{self.project}.env"
        self.env_file.write_text("\n".join([
            f"JUPYBOX_APP_IMAGE={app_image}",
            f"JUPYBOX_API_TOKEN={TOKEN}",
            f"JUPYBOX_HOME={home}",
            f"JUPYBOX_INSTANCE={self.instance}",
            "JUPYBOX_BIND=127.0.0.1",
            "JUPYBOX_PUBLISH_PORT=",  # a free port
            "JUPYBOX_HEALTHCHECK_INTERVAL=1s",
        ]) + "\n")
        self.url = ""

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [*compose_command(), "-f", str(ROOT / "compose.yaml"), "-p", self.project,
                   "--env-file", str(self.env_file), *args]
        out = subprocess.run(command, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
        return out

    def up(self) -> Deployment:
        self.compose("up", "-d", "--no-build")
        port = self.compose("port", SERVICE, "7860").stdout.strip()
        assert port.startswith("127.0.0.1:"), port
        self.url = f"http://{port}"
        return self

    @property
    def container(self) -> str:
        return self.compose("ps", "-q", SERVICE).stdout.strip()

    def wait_healthy(self, timeout: float = 120) -> None:
        """Until Docker's own HEALTHCHECK (the image's, probed every second here) says healthy."""
        deadline = time.monotonic() + timeout
        while True:
            state = inspect(self.container)["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            assert state["Running"], f"the app exited: {self.logs()}"
            assert time.monotonic() < deadline, f"not healthy after {timeout:.0f} s: {self.logs()}"
            time.sleep(0.5)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def logs(self) -> str:
        return subprocess.run(["docker", "logs", "--tail", "40", self.container], capture_output=True,
                              text=True).stderr

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", timeout=180)
        for c in sandbox_containers(self.instance):  # only if a test failed half-way
            subprocess.run(["docker", "rm", "-f", c["id"]], capture_output=True)
        self.env_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def app_image(sandbox_image: str) -> str:
    started = time.monotonic()
    tag = build_image(target="app")
    size = inspect(tag)["Size"] / 1e6
    print(f"\napp image {tag}: {size:.0f} MB, made or found in {time.monotonic() - started:.1f} s")
    return tag


@pytest.fixture
def deployment(app_image: str) -> Iterator[Deployment]:
    # Short and absolute: the same path on the host and in the app container, and room for the
    # sockets below it (Unix socket paths stay under ~100 bytes).
    folder = Path(tempfile.mkdtemp(prefix="jbd", dir="/tmp"))
    d = Deployment(app_image, folder / "home")
    try:
        yield d
    finally:
        d.down()
        shutil.rmtree(folder, ignore_errors=True)


def test_compose_file_validates_with_and_without_the_gpu_profile(tmp_path: Path) -> None:
    plain = compose_config(ROOT / "deploy" / "jupybox.env.example")
    app = plain["services"][SERVICE]
    home = app["environment"]["JUPYBOX_HOME"]
    volumes = {v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in app["volumes"]}
    assert any(v.startswith("/var/run/docker.sock:/var/run/docker.sock") for v in volumes)
    assert any(v.startswith(f"{home}:{home}") for v in volumes), "JUPYBOX_HOME must be the same path on both sides"
    assert app["environment"]["JUPYBOX_INSTANCE"] and app["environment"]["JUPYBOX_IMAGE"] == "jupybox-sandbox:latest"
    assert app["read_only"] and app["cap_drop"] == ["ALL"] and app["stop_grace_period"]

    gpu_env = tmp_path / "gpu.env"
    gpu_env.write_text((ROOT / "deploy" / "jupybox.env.example").read_text()
                       .replace("#COMPOSE_PROFILES=vllm", "COMPOSE_PROFILES=vllm")
                       .replace("OPENAI_BASE_URL=\n", "OPENAI_BASE_URL=http://vllm:8000/v1\n"))
    gpu = compose_config(gpu_env)
    vllm = gpu["services"]["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    command = " ".join(vllm["command"])
    assert "--model Qwen/Qwen-7B-Chat-Int4" in command and "--trust-remote-code" in command
    assert "--quantization gptq" in command
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(str(v).startswith("model-cache:") or (isinstance(v, dict) and v.get("source") == "model-cache")
               for v in vllm["volumes"])
    assert gpu["services"][SERVICE]["environment"]["OPENAI_BASE_URL"] == "http://vllm:8000/v1"


def test_app_image_is_labelled_health_checked_and_carries_no_build_tools(app_image: str) -> None:
    config = inspect(app_image)["Config"]
    assert config["Labels"]["jupybox.image"] == "app"
    assert config["Labels"]["org.opencontainers.image.title"] == "jupybox"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"] == ["jupybox", "serve"]
    out = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "sh", app_image, "-c",
         # No compiler and no build tools; pip is there for one job: `jupybox packages` downloads
         # wheels (never sdists) into the wheelhouse and installs them into sessions from it.
         "for t in gcc cc make /opt/jupybox/app/bin/pip; do command -v $t; done; "
         "for m in pip setuptools wheel; do python -c \"import $m\" 2>/dev/null && echo $m; done; "
         "jupybox --help >/dev/null && echo cli-ok"],
        capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["/opt/jupybox/app/bin/pip", "pip", "cli-ok"], out.stdout + out.stderr


def test_deployed_app_runs_code_and_files_in_sibling_sandboxes_and_stops_clean(deployment: Deployment) -> None:
    d = deployment.up()
    d.wait_healthy()
    app = inspect(d.container)
    status = subprocess.run(["docker", "exec", d.container, "cat", "/proc/1/status"], capture_output=True,
                            text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    socket_gid = str(os.stat("/var/run/docker.sock").st_gid)
    assert fields["Uid"].split()[0] == "1000", "the server runs as uid 1000"
    assert socket_gid in fields["Groups"].split(), "with the Docker socket's group"
    assert fields["CapEff"].strip() == "0" * 16, "and no capabilities"

    with httpx.Client(base_url=d.url) as anon:
        assert anon.get("/healthz").json()["status"] == "ok"
        assert anon.post("/api/sessions").status_code == 401
    with d.client() as c:
        r = c.post("/api/sessions")
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "import os\nx = 6 * 7\nprint(x, os.getuid())"}).json()
        assert ex["status"] == "ok" and ex["outputs"][0]["text"] == "42 1000\n"

        rows = b"n,square\n" + b"".join(f"{n},{n * n}\n".encode() for n in range(1, 11))
        r = c.post(f"/api/sessions/{sid}/files", files={"file": ("squares.csv", rows, "text/csv")})
        assert r.status_code == 201, r.text
        code = ("import csv, os\n"
                "total = sum(int(row['square']) for row in csv.DictReader(open('squares.csv')))\n"
                "os.makedirs('out', exist_ok=True)\n"
                "open('out/total.txt', 'w').write(str(total))\n"
                "print(total)")
        ex = c.post(f"/api/sessions/{sid}/execute", json={"code": code}).json()
        assert ex["status"] == "ok", ex
        assert ex["outputs"][0]["text"] == "385\n"
        r = c.get(f"/api/sessions/{sid}/files/out/total.txt")
        assert r.status_code == 200 and r.content == b"385"
        assert c.get(f"/api/sessions/{sid}/files/squares.csv").content == rows

    # The sandbox is a sibling in the host's daemon, and the folders it mounts are host paths
    # under JUPYBOX_HOME (the same path the app sees).
    [sandbox] = sandbox_containers(d.instance)
    assert sandbox["name"] == f"jupybox-{sid}"
    mounts = {m["Destination"]: m["Source"] for m in inspect(sandbox["id"])["Mounts"]}
    assert mounts["/mnt/data"] == f"{d.home}/sessions/{sid}/data"
    assert (d.home / "sessions" / sid / "data" / "out" / "total.txt").read_text() == "385"
    assert app["HostConfig"]["ReadonlyRootfs"]

    # the README's team steps: a colleague's key made in the running app, which sees it at once
    made = d.compose("exec", "-T", "-u", "1000", SERVICE, "jupybox", "users", "add", "alice")
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("jbx_") and key not in made.stderr
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as alice:
        assert alice.get("/api/whoami").json() == {"name": "alice", "admin": False, "via": "key"}
        assert alice.get(f"/api/sessions/{sid}").status_code == 404  # the admin's session is not hers
        r = alice.post("/api/sessions")
        assert r.status_code == 201, r.text
        hers = r.json()["id"]
        assert [x["id"] for x in alice.get("/api/sessions").json()["sessions"]] == [hers]
    with d.client() as c:
        assert {x["id"] for x in c.get("/api/sessions").json()["sessions"]} == {sid, hers}  # the admin sees all
    audit = d.compose("exec", "-T", "-u", "1000", SERVICE, "jupybox", "audit", "--user", "alice").stdout
    assert "user.added" in audit and "session.create" in audit and key not in audit

    started = time.monotonic()
    d.compose("stop", timeout=180)
    took = time.monotonic() - started
    state = inspect(d.container)["State"]
    assert not state["Running"] and state["ExitCode"] == 0, d.logs()
    assert took < 30, f"the app took {took:.0f} s to stop: it was killed, not shut down"
    assert sandbox_containers(d.instance) == [], "stopping the app left sandbox containers"
    # the sessions were paused, not lost: an upgrade or a `docker compose down` keeps a day's work
    assert {p.name for p in (d.home / "sessions").iterdir()} == {sid, hers}

    d.up()
    d.wait_healthy()
    with d.client() as c:
        listed = {x["id"]: x["state"] for x in c.get("/api/sessions").json()["sessions"]}
        assert listed == {sid: "paused", hers: "paused"}
        ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(x, total)"}).json()
        assert ex["outputs"][0]["text"] == "42 385\n" and "x" in ex["resumed"], ex
        assert c.get(f"/api/sessions/{sid}/files/out/total.txt").content == b"385"
        for gone in (sid, hers):
            assert c.delete(f"/api/sessions/{gone}").status_code == 204
    assert list((d.home / "sessions").iterdir()) == []


def test_a_restarted_app_takes_up_the_sandboxes_a_killed_one_left(deployment: Deployment) -> None:
    d = deployment.up()
    d.wait_healthy()
    with d.client() as c:
        r = c.post("/api/sessions")
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert c.post(f"/api/sessions/{sid}/execute", json={"code": "kept = 'here'"}).json()["status"] == "ok"
        orphan = subprocess.run(["docker", "run", "-d", "--label", "jupybox=1", "--label",
                                 f"jupybox.owner={d.instance}.999999.1", "--label", "jupybox.session=norecord",
                                 os.environ.get("JUPYBOX_IMAGE", "jupybox-sandbox:latest"), "sleep", "300"], capture_output=True, text=True, check=True)
    [left] = [x for x in sandbox_containers(d.instance) if x["name"] == f"jupybox-{sid}"]

    subprocess.run(["docker", "kill", "--signal", "KILL", d.container], capture_output=True, check=True)
    assert left["id"] in [c["id"] for c in sandbox_containers(d.instance)], "a killed app cannot clean up"

    d.up()  # the same service, so the same JUPYBOX_INSTANCE
    d.wait_healthy()
    # the session's kernel is taken up as it was; a container no record keeps is an orphan, removed
    assert [c["id"] for c in sandbox_containers(d.instance)] == [left["id"]]
    assert orphan.stdout.strip() not in subprocess.run(["docker", "ps", "-aq", "--no-trunc"], capture_output=True,
                                                       text=True, check=True).stdout
    with d.client() as c:
        ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(kept)"}).json()
        assert ex["outputs"][0]["text"] == "here\n" and not ex.get("resumed"), ex
        assert c.delete(f"/api/sessions/{sid}").status_code == 204
    assert sandbox_containers(d.instance) == [] and list((d.home / "sessions").iterdir()) == []


def test_the_app_image_hash_covers_what_it_installs_and_nothing_else() -> None:
    from sandbox.errors import SandboxError
    from sandbox.build import _app_sources

    names = {p.relative_to(ROOT).as_posix() for p in _app_sources(ROOT)}
    assert {"Dockerfile", "pyproject.toml", "deploy/entrypoint.sh", "ui/serve.py", "sandbox/session.py",
            "sandbox/image/kernel_boot.py", "interpreter/__init__.py"} <= names
    assert not any(n.startswith(("tests/", "README", ".")) or "__pycache__" in n for n in names)
    with pytest.raises(SandboxError, match="unknown image target"):
        build_image(target="nope")
