"""jupybox's sandbox: isolated, stateful Jupyter kernels with path-safe workspaces.

Nothing here knows about language models. Start with ``SessionManager`` (async) or
``SyncSessionManager`` (blocking code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import SANDBOX_IMAGE, Limits, SandboxSettings
from .errors import (
    BackendUnavailable,
    CapacityError,
    ImageNotFound,
    JupyboxError,
    LimitsError,
    KernelMessageRefused,
    PauseFailed,
    QuotaExceeded,
    SandboxError,
    SessionClosed,
    WorkspaceError,
    WorkspacePathError,
)
from .models import Execution, ExecutionStatus, ImageFile, Output

if TYPE_CHECKING:
    from .manager import Caller, SessionManager, UserLimit
    from .kernel_wire import KernelMessage
    from .relay import KernelRelay
    from .session import Session
    from .workspace import Workspace, WorkspaceFile

# Imported on first use: the kernel client's libraries (ZeroMQ, Jupyter's) stay unloaded for code
# that only needs the errors or the result model.
_LAZY = {"SessionManager": ".manager", "Caller": ".manager", "UserLimit": ".manager", "Session": ".session", "Workspace": ".workspace",
         "WorkspaceFile": ".workspace",
         "KernelRelay": ".relay", "KernelMessage": ".kernel_wire"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SANDBOX_IMAGE",
    "BackendUnavailable",
    "Caller",
    "CapacityError",
    "Execution",
    "ExecutionStatus",
    "ImageFile",
    "ImageNotFound",
    "JupyboxError",
    "KernelMessageRefused",
    "KernelRelay",
    "KernelMessage",
    "Limits",
    "LimitsError",
    "Output",
    "PauseFailed",
    "QuotaExceeded",
    "SandboxError",
    "SandboxSettings",
    "Session",
    "SessionClosed",
    "SessionManager",
    "UserLimit",
    "Workspace",
    "WorkspaceError",
    "WorkspaceFile",
    "WorkspacePathError",
]
