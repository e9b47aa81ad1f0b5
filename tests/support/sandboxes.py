"""Sandbox and server settings for tests: Docker on the image this tree built, or the direct local
backend for tests of a protocol where the container is not what is tested."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.scripted_model import ScriptedModel, scripted_settings
from sandbox import SandboxSettings
from sandbox.config import SANDBOX_IMAGE

if TYPE_CHECKING:
    from ui.services import ServeSettings

ROOT = Path(__file__).resolve().parents[2]


def docker_settings(home: Path, **kw: object) -> SandboxSettings:
    """Docker settings on the image the ``sandbox_image`` fixture built for this tree."""
    kw.setdefault("image", os.environ.get("JUPYBOX_IMAGE", SANDBOX_IMAGE))
    return SandboxSettings(backend="docker", home=home, **kw)  # type: ignore[arg-type]


def local_settings(home: Path, **kw: object) -> SandboxSettings:
    """The direct local backend: the kernel is a child process of the tests, with no isolation. For
    tests of what a front end says and streams, where a container would only add seconds."""
    return SandboxSettings(backend="local", allow_unsafe_local=True, home=home, **kw)  # type: ignore[arg-type]


def serve_settings(home: Path, instance: str, model: ScriptedModel | None = None, *, local: bool = False,
                   **kw: Any) -> ServeSettings:
    """A server's settings with one warm sandbox, on Docker or (``local``) on the local backend,
    talking to the scripted ``model`` if one is given."""
    from ui.services import ServeSettings

    make = local_settings if local else docker_settings
    sandbox = make(home, instance=instance, pool_size=1)
    model_kw = dict(model=scripted_settings(model)) if model else {}
    return ServeSettings(sandbox=sandbox, **model_kw, **kw)  # type: ignore[arg-type]


def jupybox_containers() -> list[str]:
    """Every jupybox container on this Docker daemon, running or not."""
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=jupybox"], capture_output=True, text=True)
    return out.stdout.split()
