"""The packages' public names, pinned: a change to what callers may import is a decision made here,
not a side effect of a refactoring. Each name must also resolve (the packages load some lazily)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "sandbox": ["BackendUnavailable", "Caller", "CapacityError", "Execution", "ExecutionStatus", "ImageFile", "ImageNotFound",
                "JupyboxError", "KernelMessage", "KernelMessageRefused", "KernelRelay", "Limits", "LimitsError", "Output", "PauseFailed", "QuotaExceeded", "SANDBOX_IMAGE", "SandboxError",
                "SandboxSettings", "Session", "SessionClosed", "SessionManager", "UserLimit", "Workspace", "WorkspaceError",
                "WorkspaceFile", "WorkspacePathError"],
    "interpreter": ["Cell", "Chat", "Conversation", "ConversationService", "Event", "FORMATS", "FormatError",
                    "GenerationOptions", "Interpreter", "InterpreterSettings", "ModelCancelled", "ModelError",
                    "ModelSettings", "ModelUnavailable", "Turn", "TurnBusy", "create_llm", "get_format"],
    "interpreter.llm": ["BACKENDS", "Chunk", "Completion", "DEFAULT_MODEL", "GenerationOptions", "GenerationRequest",
                        "LLM", "MAX_STREAMS", "Message", "ModelSettings", "StreamStats", "ToolCall", "Usage",
                        "backend_class", "create_llm", "model_family"],
    "interpreter.formats": ["Action", "FORMATS", "Format", "Step", "get_format"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned_and_resolve(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name} does not resolve"


def test_the_layers_import_one_way() -> None:
    """sandbox knows nothing of models or front ends; interpreter nothing of front ends."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for layer, forbidden in (("sandbox", ("interpreter", "ui", "bench")), ("interpreter", ("ui", "bench"))):
        pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(forbidden)})\b", re.M)
        for path in (root / layer).rglob("*.py"):
            found = pattern.search(path.read_text())
            assert found is None, f"{path.relative_to(root)} imports {found.group(2) if found else ''}"
