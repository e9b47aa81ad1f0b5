"""jupybox's sandbox: isolated, stateful Jupyter kernels with path-safe workspaces.

Nothing here knows about language models. Start with ``SessionManager`` (async) or
``SyncSessionManager`` (blocking code).
"""

from .config import SANDBOX_IMAGE, Limits, SandboxSettings
from .errors import (
    BackendUnavailable,
    CapacityError,
    ImageNotFound,
    JupyboxError,
    QuotaExceeded,
    SandboxError,
    SessionClosed,
    WorkspaceError,
    WorkspacePathError,
)
from .manager import SessionManager
from .models import Execution, ExecutionStatus, ImageFile, Output
from .session import Session
from .workspace import Workspace, WorkspaceFile

__all__ = [
    "SANDBOX_IMAGE",
    "BackendUnavailable",
    "CapacityError",
    "Execution",
    "ExecutionStatus",
    "ImageFile",
    "ImageNotFound",
    "JupyboxError",
    "Limits",
    "Output",
    "QuotaExceeded",
    "SandboxError",
    "SandboxSettings",
    "Session",
    "SessionClosed",
    "SessionManager",
    "Workspace",
    "WorkspaceError",
    "WorkspaceFile",
    "WorkspacePathError",
]
