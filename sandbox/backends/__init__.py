"""Where kernels run: each backend is one file here, registered by name."""

from __future__ import annotations

import importlib

from ..config import SandboxSettings
from ..errors import BackendUnavailable
from .base import Backend, KernelHandle, KernelSpec

BACKENDS = {
    "docker": "sandbox.backends.docker:DockerBackend",
    "bwrap": "sandbox.backends.bwrap:BwrapBackend",
    "local": "sandbox.backends.local:LocalBackend",
    "ray": "sandbox.cluster.backend:RayBackend",
}


def create_backend(settings: SandboxSettings) -> Backend:
    """Instantiate the backend ``settings.backend`` names."""
    try:
        target = BACKENDS[settings.backend]
    except KeyError:
        raise BackendUnavailable(
            f"unknown backend {settings.backend!r}: choose one of {', '.join(BACKENDS)}"
        ) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(settings)


__all__ = ["BACKENDS", "Backend", "KernelHandle", "KernelSpec", "create_backend"]
