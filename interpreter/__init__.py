"""jupybox's interpreter: a model writes Python, the sandbox runs it, until the model answers.

Nothing here knows about containers (that is ``sandbox``) or about the browser (that is ``ui``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import FormatError, ModelCancelled, ModelError, ModelUnavailable, TurnBusy
from .events import Event

if TYPE_CHECKING:
    from .conversation import Cell, Conversation
    from .formats import FORMATS, get_format
    from .llm import GenerationOptions, ModelSettings, create_llm
    from .loop import Interpreter, InterpreterSettings
    from .service import Chat, ConversationService, Turn

# Imported on first use, so that a model backend (``interpreter.llm.fastpath``, say) loads on a
# machine that has torch but not the notebook and sandbox libraries.
_LAZY = {"Cell": ".conversation", "Conversation": ".conversation", "FORMATS": ".formats",
         "get_format": ".formats", "create_llm": ".llm", "Interpreter": ".loop", "InterpreterSettings": ".loop",
         "Chat": ".service", "ConversationService": ".service", "Turn": ".service", "ModelSettings": ".llm",
         "GenerationOptions": ".llm"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FORMATS",
    "Cell",
    "Chat",
    "Conversation",
    "ConversationService",
    "Event",
    "FormatError",
    "GenerationOptions",
    "Interpreter",
    "InterpreterSettings",
    "ModelCancelled",
    "ModelError",
    "ModelSettings",
    "ModelUnavailable",
    "Turn",
    "TurnBusy",
    "create_llm",
    "get_format",
]
