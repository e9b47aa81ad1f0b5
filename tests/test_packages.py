"""Packages without network: sandboxed code installs from the server's wheelhouse with real pip, in
real containers; the kernel keeps no network and cannot write where packages go.

The wheelhouse is built here (a pure-Python wheel, one with a C extension compiled on this host);
one test runs ``jupybox packages add`` against the real package index."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.scripted_model import ScriptedModel
from interpreter.formats.base import packages_note
from interpreter.llm.openai import OpenAILLM
from interpreter.service import ConversationService
from sandbox import KernelMessage, Limits, SandboxSettings, SessionManager
from sandbox.packages import listing
from tests.support.sandboxes import docker_settings
from tests.support.wheels import compiled_wheel, pure_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    compiled_wheel(house, tmp_path_factory.mktemp("build"), "jbfast")
    pure_wheel(house, "jbpure", requires=("jbfast>=1.0", "numpy>=1"),
               code="import jbfast\n\ndef hello():\n    return 'hi %d' % jbfast.twice(21)\n")
    pure_wheel(house, "jbtable", code="ROWS = 3\n")
    pure_wheel(house, "jbsub", code="WHERE = 'subprocess'\n")
    pure_wheel(house, "jbold", requires=("numpy<1",))  # conflicts with the image's numpy
    pure_wheel(house, "jbbig", extra={"blob.bin": os.urandom(3_000_000)})
    return house


@pytest.fixture(scope="module")
async def manager(sandbox_image: str, tmp_path_factory: pytest.TempPathFactory,
                  wheelhouse: Path) -> AsyncIterator[SessionManager]:
    home = tmp_path_factory.mktemp("pk")
    async with SessionManager(docker_settings(home, instance="tests-packages", wheelhouse=wheelhouse)) as m:
        yield m


async def test_pip_install_then_import_in_the_same_kernel_compiled_extension_included(manager: SessionManager) -> None:
    session = await manager.create()
    t0 = time.monotonic()
    ex = await session.execute("%pip install jbpure\nimport jbpure, jbfast\nprint(jbpure.hello(), jbfast.__file__)",
                               timeout=60)
    took = time.monotonic() - t0
    assert ex.ok, ex.text()
    assert "Successfully installed jbfast-1.0 jbpure-0.1" in ex.stdout
    assert "hi 42 /opt/jupybox/site/1/jbfast.cpython-311-x86_64-linux-gnu.so" in ex.stdout  # a .so, loaded
    print(f"%pip install jbpure (+ jbfast) and import: {took:.2f} s")
    # the request never reaches the outputs a client or a model sees
    assert not any("vnd.jupybox" in json.dumps(o.to_dict()) or "jupybox-pip" in json.dumps(o.to_dict())
                   for o in ex.outputs)
    # numpy is the image's: a dependency satisfied there, not installed again
    site = session.site.folder / "1"
    assert sorted(p.name for p in site.glob("*.dist-info")) == ["jbfast-1.0.dist-info", "jbpure-0.1.dist-info"]
    assert not (site / "numpy").exists()
    again = await session.execute("%pip install jbpure numpy", timeout=60)
    assert "jbpure 0.1 is installed already" in again.stdout and "part of the sandbox" in again.stdout
    # a kernel restart (a crash) finds the session's packages again
    assert (await session.execute("import os; os._exit(1)")).status.value == "crashed"
    assert (await session.execute("import jbpure; print(jbpure.hello())")).stdout == "hi 42\n"
    await manager.close(session.id)


async def test_shell_and_subprocess_pip_install_from_the_wheelhouse_too(manager: SessionManager) -> None:
    session = await manager.create()
    ex = await session.execute("!pip install jbtable\nimport jbtable\nprint('rows', jbtable.ROWS)", timeout=60)
    assert ex.ok and "Successfully installed jbtable-0.1" in ex.stdout and "rows 3" in ex.stdout, ex.text()
    ex = await session.execute("import subprocess, sys\n"
                               "subprocess.run([sys.executable, '-m', 'pip', 'install', 'jbsub'], check=True)\n"
                               "import jbsub\nprint(jbsub.WHERE)", timeout=60)
    assert ex.ok and ex.stdout.rstrip().endswith("subprocess"), ex.text()
    assert "jupybox-pip" not in ex.stdout
    listed = await session.execute("!pip list")
    assert "jbtable 0.1" in listed.stdout and "jbsub 0.1" in listed.stdout and "numpy " in listed.stdout
    await manager.close(session.id)


@pytest.mark.parametrize(("line", "words"), [
    ("%pip install https://example.com/evil-1.0-py3-none-any.whl", "is a URL"),
    ("%pip install --index-url https://example.com/simple jbtable", "--index-url is not available"),
    ("%pip install --extra-index-url=https://example.com/simple jbtable", "--extra-index-url is not available"),
    ("%pip install git+https://example.com/x.git", "URL or VCS"),
    ("%pip install ../../etc/passwd", "is a file or path"),
    ("%pip install evil-1.0.tar.gz", "sdists and local files are not installed"),
    ("%pip install -e .", "-e is not available"),
    ("%pip install 'jbtable; os_name==\"posix\"'", "not a package name"),
    ("%pip install jupybox-no-such-package", "not in this server's wheelhouse"),
    ("!pip install --find-links /tmp jbtable", "--find-links is not available"),
])
async def test_refused_requests_fail_within_seconds_and_say_why(manager: SessionManager, line: str, words: str) -> None:
    session = await manager.create()
    t0 = time.monotonic()
    ex = await session.execute(line, timeout=60)
    assert time.monotonic() - t0 < 5
    assert words in ex.stdout + ex.stderr, ex.text()
    if "no-such" in line:
        assert "an admin can add it with `jupybox packages add jupybox-no-such-package`" in ex.stderr
    assert not any(p.name.isdigit() for p in session.site.folder.iterdir())  # nothing installed
    await manager.close(session.id)


async def test_a_conflict_with_the_image_or_the_quota_leaves_nothing_half_installed(manager: SessionManager) -> None:
    session = await manager.create(limits=Limits(workspace_bytes=2_000_000))
    ex = await session.execute("%pip install jbold", timeout=60)
    assert "ERROR: could not install jbold" in ex.stderr and "numpy" in ex.stderr, ex.text()
    ex = await session.execute("%pip install jbbig", timeout=60)
    assert "the session's quota" in ex.stderr and "delete files from the workspace" in ex.stderr, ex.text()
    assert sorted(p.name for p in session.site.folder.iterdir()) == [".answers"]  # no staging, no install
    assert "No module named 'jbbig'" in (await session.execute("import jbbig")).text()
    await manager.close(session.id)


async def test_the_kernel_keeps_no_network_and_cannot_write_its_packages(manager: SessionManager) -> None:
    session = await manager.create()
    assert (await session.execute("%pip install jbtable", timeout=60)).ok
    ex = await session.execute(
        "import socket, os\n"
        "print('ifaces', sorted(n for _, n in socket.if_nameindex()))\n"
        "try:\n    socket.create_connection(('pypi.org', 443), timeout=3); print('connected')\n"
        "except OSError as e:\n    print('no network', type(e).__name__)\n"
        "for target in ('/opt/jupybox/site/1/jbtable/__init__.py', '/opt/jupybox/site/.answers/x.json', '/opt/jupybox/site/2'):\n"
        "    try:\n        open(target, 'w') if not target.endswith('2') else os.mkdir(target); print('wrote', target)\n"
        "    except OSError as e:\n        print('refused', e.errno)\n"
        "print(open('/proc/mounts').read())")
    assert "ifaces ['lo']" in ex.stdout and "no network" in ex.stdout and "connected" not in ex.stdout, ex.text()
    assert "wrote" not in ex.stdout and ex.stdout.count("refused 30") == 3  # EROFS
    site_mount = next(line for line in ex.stdout.splitlines() if " /opt/jupybox/site " in line)
    assert " ro," in site_mount and "noexec" not in site_mount
    tmp_mount = next(line for line in ex.stdout.splitlines() if " /tmp " in line)
    assert "noexec" in tmp_mount  # what the kernel can write stays noexec
    await manager.close(session.id)


@pytest.mark.parametrize("fmt", ["fenced", "react", "tools"])
async def test_the_model_is_told_what_imports_and_what_pip_can_add(manager: SessionManager, model: ScriptedModel,
                                                                   fmt: str) -> None:
    found = await listing(manager.settings)
    assert {"numpy", "pandas", "matplotlib"} <= set(found.importable)
    assert {"jbfast", "jbpure", "jbtable"} <= set(found.installable) and "numpy" not in found.installable
    svc = ConversationService(manager, OpenAILLM(model="scripted-model", base_url=model.url, backoff=0.01))
    model.enqueue("Final Answer: done" if fmt == "react" else "done")
    svc.open("k", "test", fmt=fmt)
    turn = await svc.turn("k", "test", "Which packages can I use?")
    assert [e async for e in turn.events()][-1].type == "answer"
    body = model.history[-1]
    system = body["prompt"].split("<|im_end|>")[0] if fmt == "react" else body["messages"][0]["content"]
    assert "numpy, pandas, scipy" in system and "`%pip install NAME`" in system
    assert "jbpure" in system and "jbtable" in system
    await svc.close("k")
    await svc.llm.close()


def test_the_package_note_stays_within_a_few_hundred_tokens() -> None:
    names = [f"package-number-{i}" for i in range(500)]
    note = packages_note(["numpy"], names)
    assert len(note) < 1600 and note.rstrip(".").endswith("more") and "package-number-0" in note
    assert "Nothing else can be installed" in packages_note(["numpy"], [])


def test_react_keeps_qwens_system_prompt_unless_the_wheelhouse_offers_packages() -> None:
    from interpreter.formats.react import SYSTEM, ReactFormat

    fmt = ReactFormat()
    messages: list = []
    fmt.add_user(messages, "What is 6 * 7?", [])
    plain = fmt.render(messages)
    assert f"system\n{SYSTEM}<|im_end|>" in plain
    fmt.listing = (["numpy", "pandas"], [])
    assert fmt.render(messages) == plain  # what the model and the benchmark were made with
    fmt.listing = (["numpy", "pandas"], ["statsmodels"])
    assert "statsmodels" in fmt.render(messages) and "numpy, pandas" in fmt.render(messages)


def _jupybox(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_jupybox_packages_add_list_sync_remove_against_the_real_index(sandbox_image: str, tmp_path: Path) -> None:
    env = {**os.environ, "JUPYBOX_HOME": str(tmp_path / "home"), "JUPYBOX_WHEELHOUSE": str(tmp_path / "house"),
           "JUPYBOX_IMAGE": sandbox_image, "PYTHONPATH": str(ROOT)}
    added = _jupybox(env, "packages", "add", "tabulate==0.9.0")
    assert added.returncode == 0, added.stderr
    assert "tabulate 0.9.0" in added.stdout and (tmp_path / "house" / "tabulate-0.9.0-py3-none-any.whl").is_file()
    listed = json.loads(_jupybox(env, "packages", "list", "--json").stdout)
    assert [(w["name"], w["version"]) for w in listed] == [("tabulate", "0.9.0")]
    in_image = _jupybox(env, "packages", "add", "pandas")
    assert in_image.returncode == 2 and "already in the sandbox image" in in_image.stderr
    missing = _jupybox(env, "packages", "add", "jupybox-surely-not-on-the-index-31")
    assert missing.returncode == 2 and "No matching distribution found for jupybox-surely-not-on-the-index-31" in missing.stderr
    refused = _jupybox(env, "packages", "add", "https://example.com/x.whl")
    assert refused.returncode == 2 and "URL" in refused.stderr
    # sync: the house holds exactly what the file resolves to (tabulate is kept, nothing else)
    (tmp_path / "requirements.txt").write_text("# the team's packages\ntabulate==0.9.0\n")
    synced = _jupybox(env, "packages", "sync", str(tmp_path / "requirements.txt"))
    assert synced.returncode == 0, synced.stderr
    assert sorted(p.name for p in (tmp_path / "house").iterdir()) == ["tabulate-0.9.0-py3-none-any.whl"]
    removed = _jupybox(env, "packages", "remove", "tabulate")
    assert removed.returncode == 0 and not list((tmp_path / "house").glob("*.whl"))
    gone = _jupybox(env, "packages", "remove", "tabulate")
    assert gone.returncode == 2 and "not in the wheelhouse" in gone.stderr


async def test_many_sessions_install_at_once_each_into_its_own_site(manager: SessionManager) -> None:
    sessions = [await manager.create() for _ in range(2)]
    runs = await asyncio.gather(*(s.execute("%pip install jbtable\nimport jbtable", timeout=90) for s in sessions))
    assert all(r.ok for r in runs), [r.text() for r in runs]
    assert all((s.site.folder / "1" / "jbtable").is_dir() for s in sessions)
    for s in sessions:
        await manager.close(s.id)


async def test_bwrap_sessions_install_from_the_wheelhouse_read_only_too(tmp_path_factory: pytest.TempPathFactory,
                                                                        wheelhouse: Path) -> None:
    settings = SandboxSettings(backend="bwrap", home=tmp_path_factory.mktemp("bw"), instance="tests-packages-bwrap",
                               wheelhouse=wheelhouse)
    async with SessionManager(settings) as bwrap:
        session = await bwrap.create()
        ex = await session.execute("%pip install jbpure\nimport jbpure\nprint(jbpure.hello())\n"
                                   "try:\n    open('/opt/jupybox/site/1/x', 'w')\nexcept OSError as e:\n    print('refused', e.errno)",
                                   timeout=60)
        assert "Successfully installed jbfast-1.0 jbpure-0.1" in ex.stdout and "hi 42" in ex.stdout, ex.text()
        assert "refused 30" in ex.stdout
        refused = await session.execute("!pip install --index-url https://example.com/simple jbpure")
        assert "--index-url is not available" in refused.stdout + refused.stderr


async def test_a_paused_session_resumes_with_its_packages(sandbox_image: str, tmp_path_factory: pytest.TempPathFactory,
                                                         wheelhouse: Path) -> None:
    settings = docker_settings(tmp_path_factory.mktemp("pp"), instance="tests-packages-durable", wheelhouse=wheelhouse,
                               durable=True)
    async with SessionManager(settings) as durable:
        session = await durable.create()
        assert (await session.execute("%pip install jbpure", timeout=60)).ok
        await durable.pause(session.id)
        back = await session.execute("import jbpure\nprint(jbpure.hello())")
        assert back.stdout == "hi 42\n", back.text()
        await durable.close(session.id)


async def test_a_notebook_client_installs_through_its_relay(manager: SessionManager) -> None:
    session = await manager.create()
    relays = [await session.attach(), await session.attach()]  # the request reaches both: served once
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "session": "tests", "username": "tests",
              "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
    cell = KernelMessage("shell", header, content={"code": "%pip install jbtable\nimport jbtable\nprint(jbtable.ROWS)",
                                                   "silent": False, "store_history": True, "user_expressions": {},
                                                   "allow_stdin": False})
    await relays[0].send(cell)
    seen, idle = [], False
    while not idle:
        m = await asyncio.wait_for(relays[0].receive(), 60)
        assert m is not None, relays[0].end_reason
        if m.parent_id == header["msg_id"]:
            seen.append(m)
            idle = m.msg_type == "status" and m.content.get("execution_state") == "idle"
    text = "".join(m.content.get("text", "") for m in seen if m.msg_type == "stream")
    assert "Successfully installed jbtable-0.1" in text and "3\n" in text, text
    assert not any(m.msg_type == "display_data" for m in seen)  # the request itself is not passed on
    assert len(list(session.site.folder.glob("[0-9]*"))) == 1
    await manager.close(session.id)


async def test_a_gvisor_session_installs_and_loads_a_compiled_wheel(gvisor_runtime: str,
                                                                    manager: SessionManager) -> None:
    """Under gVisor the session's site folder is bound read-only as under runc, and its .so loads."""
    session = await manager.create(isolation=gvisor_runtime)
    try:
        ex = await session.execute("%pip install jbpure\nimport jbpure\nprint(jbpure.hello())", timeout=120)
        assert ex.ok and ex.stdout.splitlines()[-1] == "hi 42", ex.text()
        denied = await session.execute("open('/opt/jupybox/site/x', 'w')")
        assert denied.error is not None and denied.error.ename in ("OSError", "PermissionError"), denied.text()
    finally:
        await manager.close(session.id)
