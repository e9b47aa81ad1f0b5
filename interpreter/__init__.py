"""jupybox's interpreter: a model writes Python, the sandbox runs it, until the model answers.

Nothing here knows about containers (that is ``sandbox``) or about the browser (that is ``ui``).
"""

from .conversation import Cell, Conversation
from .errors import FormatError, ModelCancelled, ModelError, ModelUnavailable
from .events import Event
from .formats import FORMATS, get_format
from .llm import create_llm
from .loop import Interpreter, InterpreterSettings

__all__ = [
    "FORMATS",
    "Cell",
    "Conversation",
    "Event",
    "FormatError",
    "Interpreter",
    "InterpreterSettings",
    "ModelCancelled",
    "ModelError",
    "ModelUnavailable",
    "create_llm",
    "get_format",
]
