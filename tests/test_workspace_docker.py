"""What sandboxed code can plant in its workspace (symlinks to host paths) must never make the host
read or write outside it: checked with a real kernel in a real container."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pytest

from sandbox import ExecutionStatus, SessionManager, WorkspacePathError


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def test_symlinks_made_by_the_kernel_do_not_lead_the_host_outside(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    passwd_before = digest("/etc/passwd")
    escape = Path("/tmp/jupybox-test-escape.txt")
    escape.unlink(missing_ok=True)
    try:
        ex = await session.execute(
            "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/', 'root')\n"
            "os.makedirs('nested', exist_ok=True)\nos.symlink('/tmp', 'nested/tmp')\n"
            "open('real.txt', 'w').write('made inside')\nprint(sorted(os.listdir('.')))"
        )
        assert ex.stdout == "['nested', 'passwd', 'real.txt', 'root']\n", ex.text()
        ws = session.workspace

        for name in ("passwd", "root/etc/passwd", "root/etc/hostname", "nested/tmp/x"):
            with pytest.raises(WorkspacePathError, match="symlink"):
                ws.read(name)
        with pytest.raises(WorkspacePathError):
            ws.write("passwd", b"pwned::0:0::/:/bin/sh\n")
        with pytest.raises(WorkspacePathError):
            ws.write("root/tmp/jupybox-test-escape.txt", b"escaped")
        with pytest.raises(WorkspacePathError):
            ws.write("nested/tmp/jupybox-test-escape.txt", b"escaped")
        with pytest.raises(WorkspacePathError):
            ws.delete("root/etc/passwd")
        assert digest("/etc/passwd") == passwd_before
        assert not escape.exists()

        # the kernel's own regular files are there as usual, the links are not listed
        assert [f.path for f in ws.list()] == ["real.txt"]
        assert ws.read("real.txt") == b"made inside"
    finally:
        await docker_manager.close(session.id)


@pytest.mark.parametrize("plant", [
    "os.symlink('/tmp', 'figures')",  # the host's /tmp, seen from outside the container
    "open('figures', 'w').write('not a folder')",  # harmless, but the same situation for the host
], ids=["figures-symlink", "figures-file"])
async def test_a_plot_after_the_kernel_replaced_the_figures_folder(docker_manager: SessionManager,
                                                                   plant: str) -> None:
    """Images go to figures/ in the workspace. When the code made that name a symlink (or a file),
    the host must not follow it; the execution still returns as data, the image is dropped (with a
    warning in the log) or saved somewhere safe, and nothing lands in the host's /tmp."""
    session = await docker_manager.create()
    host_tmp_figures = set(glob.glob("/tmp/fig-*"))
    try:
        assert (await session.execute(f"import os\n{plant}")).ok
        ex = await session.execute(
            "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint('after the plot')"
        )
        assert ex.status is ExecutionStatus.OK, ex.text()
        assert ex.stdout == "after the plot\n"
        for image in ex.images:  # wherever it was saved, it is a real file inside the workspace
            assert not image.path.startswith("figures/")
            assert session.workspace.read(image.path).startswith(b"\x89PNG")
        assert set(glob.glob("/tmp/fig-*")) == host_tmp_figures
        # the session stays usable
        assert (await session.execute("print(1 + 1)")).stdout == "2\n"
    finally:
        await docker_manager.close(session.id)
