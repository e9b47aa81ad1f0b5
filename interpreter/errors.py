"""Errors of the interpreter layer, under the same ``JupyboxError`` root as the sandbox's::

    JupyboxError
    ├── ModelError                 the model backend failed (HTTP error, generation crashed)
    │   ├── ModelUnavailable       it cannot be used here: weights, GPU or library missing, server unreachable
    │   └── ModelCancelled         the caller cancelled the generation
    ├── FormatError                the chosen prompt format cannot work with this backend
    └── TurnBusy                   the conversation is already answering a question
"""

from __future__ import annotations

from sandbox.errors import JupyboxError


class ModelError(JupyboxError):
    """The model backend failed."""


class ModelUnavailable(ModelError):
    """The model cannot be used on this host: the message says what to install or configure."""


class ModelCancelled(ModelError):
    """Generation was cancelled by the caller."""


class FormatError(JupyboxError):
    """The prompt format cannot be used with this model backend."""


class TurnBusy(JupyboxError):
    """The conversation is already answering a question (one turn at a time)."""
