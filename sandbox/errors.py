"""Errors the sandbox raises, each with a message a user can act on.

User-code failures are *data* (``Execution.status == "error"``); these exceptions are for the
infrastructure around the code::

    JupyboxError
    ├── SandboxError                 a kernel could not be started, reached or kept alive
    │   ├── BackendUnavailable       the isolation backend cannot run on this host (no daemon, no bwrap)
    │   ├── ImageNotFound            the sandbox image is missing: build it
    │   ├── SessionClosed            the session was closed (or reaped) and cannot execute any more
    │   ├── PauseFailed              a session's variables could not be saved: it runs on as it was
    │   └── CapacityError            the manager is at its session limit
    │       └── ConnectionLimit      ... or a session, or the server, at its notebook-connection limit
    ├── LimitsError                  requested resource limits are invalid or above the server's
    ├── WorkspaceError               a file operation on a session workspace was refused
    │   ├── WorkspacePathError       the name escapes the workspace (``..``, absolute, NUL, symlink)
    │   └── QuotaExceeded            a file or the workspace total is over its size limit
    └── KernelMessageRefused         a client's raw kernel message was malformed or not allowed
        ├── KernelMessageTooLarge    ... or over the size limit
        └── WireError                ... or not a message in its websocket format (``kernel_wire.py``)

Lower-layer exceptions (``docker.errors``, ``zmq``, ``OSError``) are translated into these at the
boundary, so callers never need to import a backend's library.
"""

from __future__ import annotations


class JupyboxError(Exception):
    """Base of every error jupybox raises on purpose."""


class SandboxError(JupyboxError):
    """A kernel could not be started, reached or kept alive."""


class BackendUnavailable(SandboxError):
    """The chosen isolation backend cannot run on this host."""


class ImageNotFound(SandboxError):
    """The sandbox image is not present in the Docker daemon."""


class SessionClosed(SandboxError):
    """The session was closed and cannot be used any more."""


class PauseFailed(SandboxError):
    """Saving a session's variables failed (its workspace is full, its kernel does not answer):
    the session was not paused and runs on as it was."""


class CapacityError(SandboxError):
    """The manager already holds its maximum number of sessions."""


class ConnectionLimit(CapacityError):
    """A session, or the whole server, holds its maximum number of notebook connections (relays)."""


class LimitsError(JupyboxError):
    """Requested resource limits are not numbers, below what a kernel can run with, or above the server's."""


class WorkspaceError(JupyboxError):
    """A workspace file operation was refused."""


class WorkspacePathError(WorkspaceError):
    """A file name would reach outside the session workspace."""


class QuotaExceeded(WorkspaceError):
    """A file, or the workspace as a whole, is larger than allowed."""


class KernelMessageRefused(JupyboxError):
    """A client's raw kernel message (the Jupyter kernels API) was not sent: malformed, on a channel
    a client may not use, or over the size limit."""


class KernelMessageTooLarge(KernelMessageRefused):
    """A client's raw kernel message is over the size limit."""
