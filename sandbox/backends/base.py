"""The seam between a session and *where* its kernel runs.

A backend starts an isolated kernel process and stops it; it does not speak the Jupyter protocol
(``sandbox.kernel`` does). Each backend is one file in this package and registers itself in
``sandbox.backends.BACKENDS``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import Limits, SandboxSettings


SANDBOX_WORDS_CHARS = 300


def sandbox_words(text: str) -> str:
    """The last output of a dead kernel, for its exit reason, marked as what it is: text the
    sandboxed code controls, never the server's words (printable characters only, one line, cut to
    ``SANDBOX_WORDS_CHARS``). Empty when there is none."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not line:
        return ""
    if len(line) > SANDBOX_WORDS_CHARS:
        line = "…" + line[-SANDBOX_WORDS_CHARS:]
    return f"; its last output, written by the sandboxed code: «{line}»"


@dataclass
class KernelSpec:
    """What a session asks for: one kernel, its folders, its labels."""

    session_id: str
    owner: str  # identifies the jupybox process, for orphan cleanup
    runtime_dir: Path  # host folder: connection file and the kernel's ipc sockets
    workspace_dir: Path  # host folder: the session's files
    limits: Limits = field(default_factory=Limits)  # this session's limits
    boot_args: list[str] = field(default_factory=list)  # arguments for kernel_boot.py (kernel paths)
    env: dict[str, str] = field(default_factory=dict)
    isolation: str | None = None  # one of the backend's ``isolations()``; None: the backend's default
    site_dir: Path | None = None  # host folder: packages installed for the session, read-only for the kernel


@dataclass
class KernelHandle:
    """A started kernel. ``ref`` is the backend's own reference (container, process)."""

    spec: KernelSpec
    ref: Any = None


class Backend(abc.ABC):
    name: ClassVar[str]
    #: The backend places whole sessions on other machines (a cluster): the manager asks it for
    #: sessions with ``open_session`` and leaves warm pools to it; ``start``/``stop`` are unused.
    places_sessions: ClassVar[bool] = False
    #: Where the kernel sees its runtime folder and its workspace. ``None`` means the host paths.
    runtime_mount: ClassVar[str | None] = "/run/jupybox"
    workspace_mount: ClassVar[str | None] = "/mnt/data"
    site_mount: ClassVar[str | None] = "/opt/jupybox/site"

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings

    def kernel_paths(self, spec: KernelSpec) -> tuple[str, str]:
        """(runtime folder, workspace folder) as the kernel sees them."""
        return (
            self.runtime_mount or str(spec.runtime_dir),
            self.workspace_mount or str(spec.workspace_dir),
        )

    async def check(self) -> None:
        """Called once by the manager before the first session; raises ``BackendUnavailable`` with
        what to do when this host cannot run the backend. Default: nothing to check."""

    async def isolations(self) -> list[str]:
        """Called by front ends that let a user choose: the isolations a session may ask for in
        ``KernelSpec.isolation`` besides the default (docker: gVisor's ``runsc`` where the daemon
        has it). Default: none."""
        return []

    @abc.abstractmethod
    async def start(self, spec: KernelSpec) -> KernelHandle:
        """Called by a session to start ``kernel_boot.py`` with ``spec.boot_args`` on the kernel's
        Python. Returns once the process is started; the session then waits for the kernel's
        sockets and its first reply. Raises ``SandboxError`` on failure."""

    @abc.abstractmethod
    async def is_alive(self, handle: KernelHandle) -> bool:
        """Called while an execution waits, about once a second: is the kernel process still there?"""

    async def exit_reason(self, handle: KernelHandle) -> str:
        """Called after ``is_alive`` said no: why the kernel died, in words a user understands."""
        return "the kernel process exited"

    @abc.abstractmethod
    async def stop(self, handle: KernelHandle) -> None:
        """Called on close and before a restart: kill the kernel and release everything it held
        (container, processes). Must be idempotent and never raise for an already-gone kernel."""

    async def cleanup_orphans(self, is_orphan: Any) -> int:
        """Called once at manager start-up: remove what dead jupybox processes left behind.
        ``is_orphan(owner, session_id) -> bool`` (a dead owner's session that no record keeps).
        Returns how many things were removed."""
        return 0

    async def adopt(self, spec: KernelSpec) -> KernelHandle | None:
        """Called at manager start-up for each session an earlier server process left (the
        server was killed): its kernel, when it still runs, as a handle this process can use and
        stop; ``None`` when there is none. Default: kernels end with the server (bwrap, local)."""
        return None

    async def open_session(self, session_id: str, limits: Limits) -> Any:
        """Called by the manager instead of building a local ``Session`` when ``places_sessions``:
        a started session, with ``Session``'s interface, living wherever the backend put it.
        Raises ``CapacityError`` when there is no room anywhere."""
        raise NotImplementedError(f"the {self.name} backend starts kernels here; it does not place sessions")

    async def close(self) -> None:
        """Called at manager shutdown after every session is stopped."""
