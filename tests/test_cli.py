"""`jupybox exec` as a user runs it: the real console script, real containers; plus what happens to
containers when the jupybox process is stopped (SIGTERM) or killed outright (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import SandboxSettings, SessionManager
from sandbox.diskfs import mounts_under

JUPYBOX = str(Path(sys.executable).parent / "jupybox")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # a short home (Unix socket paths) and an instance of our own, so that the CLI's orphan cleanup
    # never touches containers of other jupybox processes on this host
    return {**os.environ, "JUPYBOX_HOME": str(tmp_path_factory.mktemp("cli")), "JUPYBOX_INSTANCE": "cli-test"}


def jupybox(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JUPYBOX, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def containers_of(instance: str) -> dict[str, str]:
    """{container id: owner label} for the jupybox containers of one instance, running or not."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", "label=jupybox", "--format",
                          '{{.ID}} {{.Label "jupybox.owner"}}'], capture_output=True, text=True, check=True).stdout
    rows = (line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {cid: owner for cid, owner in rows if owner.startswith(instance + ".")}


def container_exists(name: str) -> bool:
    return subprocess.run(["docker", "inspect", name], capture_output=True).returncode == 0


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr


# -- exec -------------------------------------------------------------------------------------
def test_exec_json_prints_the_execution(sandbox_image: str, cli_env: dict[str, str]) -> None:
    proc = jupybox(cli_env, "exec", "--json", "print(6*7)")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    assert result["outputs"] == [{"kind": "stream", "name": "stdout", "text": "42\n"}]
    assert result["saved_images"] == []


def test_exec_error_exits_1_with_the_traceback_on_stderr(sandbox_image: str, cli_env: dict[str, str]) -> None:
    proc = jupybox(cli_env, "exec", "1/0")
    assert proc.returncode == 1
    assert "ZeroDivisionError" in proc.stderr and "1/0" in proc.stderr
    assert proc.stdout.strip() == ""


def test_exec_reads_code_from_stdin(sandbox_image: str, cli_env: dict[str, str]) -> None:
    code = "total = sum(range(10))\nprint('total', total)\n"
    proc = jupybox(cli_env, "exec", "-", stdin=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "total 45\n"
    proc = jupybox(cli_env, "exec", stdin="print('default is stdin')")
    assert (proc.returncode, proc.stdout) == (0, "default is stdin\n")


def test_exec_saves_a_plot_under_out(sandbox_image: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    proc = jupybox(cli_env, "exec", "--out", str(tmp_path), code)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[image saved: ")]
    assert len(lines) == 1, proc.stdout
    saved = Path(lines[0].removeprefix("[image saved: ").removesuffix("]"))
    assert saved.parent.parent == tmp_path and saved.name == "fig-001.png"
    assert saved.read_bytes().startswith(b"\x89PNG")


def test_local_backend_needs_an_explicit_opt_in(cli_env: dict[str, str]) -> None:
    proc = jupybox(cli_env, "exec", "--backend", "local", "1")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("jupybox: ") and "--unsafe-local" in proc.stderr
    assert_no_traceback(proc.stderr)


def test_unknown_image_says_how_to_build_it(docker_daemon: None, cli_env: dict[str, str]) -> None:
    proc = jupybox(cli_env, "exec", "--image", "nope:missing", "1")
    assert proc.returncode == 2
    assert "nope:missing" in proc.stderr and "jupybox sandbox build-image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_no_traceback(proc.stderr)


# -- stopping and killing jupybox -------------------------------------------------------------
def test_sigterm_stops_exec_and_removes_its_container(sandbox_image: str, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "JUPYBOX_INSTANCE": "cli-sigterm"}
    before = set(containers_of("cli-sigterm"))
    proc = subprocess.Popen([JUPYBOX, "exec", "import time; print('running', flush=True); time.sleep(60)"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (new := set(containers_of("cli-sigterm")) - before):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no container appeared within 60 s"
            time.sleep(0.2)
        (cid,) = new
        assert proc.stdout.readline() == "running\n"  # the kernel runs the code: now it sleeps
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert time.monotonic() - sent < 15
        assert proc.returncode == 130 and "stopped" in stderr, stderr
        assert_no_traceback(stderr)
        assert not container_exists(cid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ORPHAN_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from sandbox import SandboxSettings, SessionManager

    async def main():
        manager = SessionManager(SandboxSettings(home=Path(sys.argv[1]), image=sys.argv[2], instance="orphan-test"))
        session = await manager.create()
        print(f"jupybox-{session.id} {session.folder}", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


async def test_containers_of_a_killed_process_are_removed_by_the_next_one(
        sandbox_image: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("orph")
    settings = SandboxSettings(home=home, image=sandbox_image, instance="orphan-test")
    live = SessionManager(settings)  # this test process: alive, so its container must survive
    await live.start()
    kept = await live.create()
    orphan = ""
    child = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(home), sandbox_image], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line, child.communicate()[1]
        orphan, folder = line.split()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert container_exists(orphan) and Path(folder).is_dir()  # nobody cleaned up after the kill
        assert mounts_under(Path(folder)) == [str(Path(folder, "data"))]  # its workspace filesystem too

        successor = SessionManager(settings)
        await successor.start()
        try:
            assert not container_exists(orphan)
            assert not Path(folder).exists() and mounts_under(home) == [str(kept.workspace.root)]
            assert container_exists(f"jupybox-{kept.id}") and kept.folder.is_dir()
            assert (await kept.execute("print('still here')")).stdout == "still here\n"
        finally:
            await successor.shutdown()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await live.shutdown()
        if orphan and container_exists(orphan):  # only when the test failed before the cleanup
            subprocess.run(["docker", "rm", "-f", orphan], capture_output=True)
    assert not container_exists(f"jupybox-{kept.id}") and mounts_under(home) == []
