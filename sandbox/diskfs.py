"""A size-capped filesystem for each workspace, so that code in the sandbox cannot fill the host's disk.

The workspace quota (``Limits.workspace_bytes``) is checked by ``Workspace`` for what the host
writes; the kernel writes to ``/mnt/data`` directly. Where jupybox runs as root and the host has
loop devices, each session's workspace folder is therefore the mount point of its own ext4 image
(``data.img`` in the session's folder, sparse, sized to the quota): a write past the quota fails in
the sandbox with "No space left on device", and no other session or host file is touched.

``SandboxSettings.workspace_fs`` chooses: ``loop`` (required: an error if unavailable), ``plain`` (a
folder on the host's filesystem) or ``auto`` (loop where available, else plain, said once in the log).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from .errors import SandboxError

log = logging.getLogger(__name__)

IMAGE_NAME = "data.img"
COMMAND_TIMEOUT_S = 30.0
# ext4's inode tables and group metadata take 2-4% of the image (with one inode per 16 KiB and no
# journal): the image is sized so that at least the quota is free for files
USABLE_FRACTION = 0.955


def unavailable() -> str | None:
    """Why loop-mounted workspaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "jupybox does not run as root (mounting needs it)"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
    if not Path("/dev/loop-control").exists():
        return "the host has no loop devices (/dev/loop-control)"
    return None


def create(folder: Path, image: Path, size: int, owner: tuple[int, int] | None) -> None:
    """Make ``image`` (sparse) holding an empty ext4 of at least ``size`` usable bytes and mount it
    on the empty ``folder``, owned by ``owner`` (uid, gid)."""
    total = int(size / USABLE_FRACTION) + (1 << 20)
    with open(image, "wb") as fh:
        fh.truncate(total)
    uid, gid = owner or (os.geteuid(), os.getegid())
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-T", "default", "-i", "16384", "-O", "^has_journal",
          "-E", f"root_owner={uid}:{gid},nodiscard", str(image)])
    _run(["mount", "-o", "loop,nosuid,nodev,noexec", str(image), str(folder)])
    try:
        (folder / "lost+found").rmdir()  # the sandbox's files only
    except OSError:
        pass


def remount(folder: Path, image: Path) -> None:
    """Mount ``image`` on ``folder`` again unless it still is (the host restarted since a server
    process mounted it); a workspace without an image is left as it is."""
    if not image.exists() or str(folder.resolve()) in mounts_under(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-o", "loop,nosuid,nodev,noexec", str(image), str(folder)])


def release(folder: Path) -> None:
    """Unmount everything mounted at or below ``folder``, deepest first (a busy mount is detached
    lazily), so that the folder and its image can be deleted. Safe when nothing is mounted."""
    for point in sorted(mounts_under(folder), key=len, reverse=True):
        try:
            _run(["umount", point])
        except SandboxError:
            _run(["umount", "--lazy", point])


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder``, from /proc/mounts."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    root = str(folder.resolve())
    points = [line.split()[1].replace("\\040", " ") for line in lines if len(line.split()) > 1]
    return [p for p in points if p == root or p.startswith(root + "/")]


def _run(command: list[str]) -> None:
    """Run a filesystem tool; its words (host paths, devices) go to the log, not to the caller."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("`%s` failed: %s", " ".join(command), exc)
        raise SandboxError(f"{command[0]} could not run for the session's workspace; the server's log has why") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        log.warning("`%s` failed: %s", " ".join(command), detail[0])
        raise SandboxError(f"{command[0]} failed for the session's workspace; the server's log has why")
