"""The one interface of a sandbox session, whatever runs it: a local ``Session`` (this host's
kernel) and a ``ClusterSession`` (a kernel on a node of the cluster) both satisfy it, and the
manager, the server's routes, MCP, the kernels API and eval are written against it alone, so none of
them branches on the backend. ``tests/test_protocol.py`` checks both classes against it, member by
member and signature by signature: a change to one session that the other lacks fails there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from .config import Limits
from .models import Execution, Output

if TYPE_CHECKING:
    from .relay import KernelRelay
    from .workspace import WorkspaceFile

OutputCallback = Callable[[Output], Any]


class FileWriter(Protocol):
    """A file written piece by piece (``SessionFiles.writer``): dropped unless committed."""

    name: str
    written: int

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> WorkspaceFile: ...

    def abort(self) -> None: ...

    def __enter__(self) -> FileWriter: ...

    def __exit__(self, *exc: object) -> None: ...


class SessionFiles(Protocol):
    """A session's workspace. Blocking, path-safe, within ``limits`` (quotas checked as data arrives)."""

    limits: Limits

    def list(self) -> list[WorkspaceFile]: ...

    def usage(self) -> int: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str, missing_ok: bool = False) -> None: ...

    def write(self, name: str, data: bytes | BinaryIO) -> WorkspaceFile: ...

    def writer(self, name: str, size_hint: int | None = None) -> FileWriter: ...

    def upload(self, source: Path | str, name: str | None = None) -> WorkspaceFile: ...

    def open(self, name: str) -> BinaryIO: ...

    def read(self, name: str, max_bytes: int | None = None) -> bytes: ...

    def copy_to(self, name: str, dest: Path, max_bytes: int | None = None) -> int: ...


class SandboxSession(Protocol):
    """A stateful kernel and its files. What the code does is data (an ``Execution``); only the
    sandbox's own failures raise (``SandboxError`` and its kinds)."""

    id: str
    limits: Limits
    workspace: SessionFiles
    created: float  # wall clock
    last_used: float  # monotonic
    executions: int
    isolation: str | None
    paused: bool
    pause_note: str | None
    before_resume: Callable[[Any], None] | None
    after_resume: Callable[[Any], Awaitable[None]] | None

    @property
    def closed(self) -> bool: ...

    @property
    def busy(self) -> bool: ...

    def touch(self) -> None: ...

    async def execute(self, code: str, timeout: float | None = None, on_output: OutputCallback | None = None,
                      cancel: asyncio.Event | None = None) -> Execution: ...

    def stream(self, code: str, timeout: float | None = None,
               cancel: asyncio.Event | None = None) -> AsyncIterator[Output | Execution]: ...

    def interrupt(self, task: asyncio.Task | None = None) -> None: ...

    async def restart(self) -> None: ...

    async def attach(self, allow_stdin: bool = True) -> KernelRelay: ...

    async def close(self, keep_workspace: bool = False) -> None: ...
