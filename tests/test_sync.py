"""The blocking API as a script or a notebook uses it: the same sessions as the async core, run on a
background loop, with nothing left behind after shutdown."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandbox import ExecutionStatus, Output, SessionClosed
from sandbox.sync import SyncSessionManager
from tests.support.sandboxes import docker_settings


def test_a_script_runs_code_keeps_state_and_cleans_up(sandbox_image: str,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("sync")
    with SyncSessionManager(docker_settings(home, image=sandbox_image, instance="sync-test")) as manager:
        session = manager.create()
        assert manager.get(session.id).id == session.id

        assert session.execute("prices = [3, 5, 8]").ok
        seen: list[Output] = []
        ex = session.execute("print('n =', len(prices))\nsum(prices)", on_output=seen.append)
        assert ex.status is ExecutionStatus.OK
        assert ex.stdout == "n = 3\n" and ex.results[-1].data["text/plain"] == "16"
        assert [(o.kind, o.text) for o in seen][0] == ("stream", "n = 3\n")
        assert [o.kind for o in seen] == ["stream", "result"]

        # files go both ways through the workspace
        session.workspace.write("input/numbers.txt", b"1\n2\n39\n")
        ex = session.execute("total = sum(int(x) for x in open('input/numbers.txt'))\n"
                             "open('total.txt', 'w').write(str(total))\ntotal")
        assert ex.ok, ex.text()
        assert session.workspace.read("total.txt") == b"42"
        assert sorted(f.path for f in session.workspace.list()) == ["input/numbers.txt", "total.txt"]

        # errors are data, a timeout comes back as a status, and the state survives both
        assert session.execute("1/0").status is ExecutionStatus.ERROR
        assert session.execute("import time; time.sleep(30)", timeout=1).status is ExecutionStatus.TIMEOUT
        assert session.execute("print(total)").stdout == "42\n"

        container = f"jupybox-{session.id}"
        folder = Path(session.workspace.root).parent
        assert _container_exists(container) and folder.is_dir()

        other = manager.create()
        manager.close(other.id)
        assert not _container_exists(f"jupybox-{other.id}")
        with pytest.raises(SessionClosed):
            manager.get(other.id)

    assert not _container_exists(container)
    assert not folder.exists()
    left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=jupybox.session=" + session.id],
                          capture_output=True, text=True, check=True).stdout
    assert left.strip() == ""


def _container_exists(name: str) -> bool:
    return subprocess.run(["docker", "inspect", name], capture_output=True).returncode == 0
