"""No isolation at all: the kernel is a plain child process of jupybox, with the host's files,
network and privileges. Only for development and trusted code; refused unless
``allow_unsafe_local`` is set, and it says so loudly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from ..config import SandboxSettings
from ..errors import BackendUnavailable, SandboxError
from .base import Backend, KernelHandle, KernelSpec

log = logging.getLogger(__name__)

BOOT = Path(__file__).resolve().parent.parent / "image" / "kernel_boot.py"


class LocalBackend(Backend):
    name = "local"
    runtime_mount = None
    workspace_mount = None
    site_mount = None

    def __init__(self, settings: SandboxSettings) -> None:
        if not settings.allow_unsafe_local:
            raise BackendUnavailable(
                "the local backend runs code without any isolation; pass --unsafe-local (or "
                "allow_unsafe_local=True) if you really trust the code, or use --backend docker"
            )
        super().__init__(settings)
        log.warning("UNSAFE: the local backend runs code with uid %d and full access to this host", os.geteuid())

    async def start(self, spec: KernelSpec) -> KernelHandle:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(BOOT), *spec.boot_args,
                cwd=spec.workspace_dir, env={**os.environ, **spec.env},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"could not start a local kernel: {exc}") from None
        return KernelHandle(spec=spec, ref=proc)

    async def is_alive(self, handle: KernelHandle) -> bool:
        return handle.ref.returncode is None

    async def exit_reason(self, handle: KernelHandle) -> str:
        code = handle.ref.returncode
        if code is not None and code < 0:
            return f"the kernel was killed by signal {signal.Signals(-code).name}"
        return f"the kernel process exited with code {code}"

    async def stop(self, handle: KernelHandle) -> None:
        proc = handle.ref
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await proc.wait()
