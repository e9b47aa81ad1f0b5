"""Where a server keeps its files: ``JUPYBOX_HOME``, else ``~/.cache/jupybox``. The same rule as
the sandbox's (``sandbox.config.default_home``), stated here again because ``store/`` imports
nothing of the packages above it."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("JUPYBOX_HOME") or Path.home() / ".cache" / "jupybox")
