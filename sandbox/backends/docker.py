"""The default backend: one container per session, locked down.

No network, read-only root, tmpfs /tmp (nosuid, nodev, noexec), every capability dropped,
no-new-privileges, a seccomp profile without io_uring (``sandbox/seccomp.py``), memory (no extra
swap), CPU, pids, open-file, file-size and core-size limits, a non-root user; the kernel's channels are ZMQ
Unix sockets in a bind-mounted per-session folder, so no port is opened anywhere. ``docker_runtime="runsc"`` runs the
same container under gVisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from .. import seccomp
from ..config import SandboxSettings
from ..errors import BackendUnavailable, ImageNotFound, SandboxError
from .base import Backend, KernelHandle, KernelSpec, sandbox_words

log = logging.getLogger(__name__)

LABEL = "jupybox"  # every container jupybox starts carries this label
BOOT = "/opt/jupybox/kernel_boot.py"
NOFILE = 4096  # open files per process in the sandbox (soft and hard)


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, settings: SandboxSettings, labels: dict[str, str] | None = None) -> None:
        """``labels`` scope this backend (a cluster node's name): every container it starts carries
        them, and its orphan clean-up only considers containers that carry them."""
        super().__init__(settings)
        self._client: Any = None
        self.labels = dict(labels or {})

    def _docker(self) -> Any:
        if self._client is None:
            import docker
            from docker.errors import DockerException

            try:
                self._client = docker.from_env(timeout=60)
                self._client.ping()
            except DockerException as exc:
                self._client = None
                host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
                raise BackendUnavailable(
                    f"Docker daemon not reachable at {host}: start it (`dockerd &`) or choose another "
                    f"backend (--backend bwrap). ({exc.__class__.__name__})"
                ) from None
        return self._client

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Docker SDK calls block; run them off the event loop and translate their errors. The
        daemon's own words (paths, ids, cgroup names) go to the log, not to whoever asked."""
        from docker.errors import APIError, DockerException, ImageNotFound as DockerImageNotFound

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except DockerImageNotFound:
            raise ImageNotFound(
                f"the sandbox image {self.settings.image!r} is missing: build it with `jupybox sandbox build-image`"
            ) from None
        except DockerException as exc:
            log.warning("Docker refused %s: %s", getattr(fn, "__name__", "a call"), exc)
            status = f" (HTTP {exc.status_code})" if isinstance(exc, APIError) and exc.status_code else ""
            raise SandboxError(f"the Docker daemon refused the sandbox{status}; the server's log has "
                               "its reason") from None

    async def check(self) -> None:
        client = await asyncio.to_thread(self._docker)
        await self._call(client.images.get, self.settings.image)
        if self.settings.docker_runtime:
            info = await self._call(client.info)
            if self.settings.docker_runtime not in info.get("Runtimes", {}):
                raise BackendUnavailable(
                    f"the Docker runtime {self.settings.docker_runtime!r} is not registered with the daemon "
                    f"(known: {', '.join(info.get('Runtimes', {}))}); see the README's gVisor section"
                )

    async def isolations(self) -> list[str]:
        """``runsc`` when the daemon has gVisor registered and it is not the default already."""
        info = await self._call(self._docker().info)
        return [r for r in ("runsc",) if r in info.get("Runtimes", {}) and r != self.settings.docker_runtime]

    async def start(self, spec: KernelSpec) -> KernelHandle:
        from docker.types import Ulimit

        lim = spec.limits
        client = self._docker()
        user = (f"{self.settings.sandbox_uid}:{self.settings.sandbox_gid}" if os.geteuid() == 0
                else f"{os.geteuid()}:{os.getegid()}")
        name = f"jupybox-{spec.session_id}"
        run = asyncio.ensure_future(self._call(
            client.containers.run,
            self.settings.image,
            ["python", BOOT, *spec.boot_args],
            name=name,
            detach=True,
            init=True,
            user=user,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={lim.tmp_mb}m,mode=1777"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges", seccomp.security_opt(spec.isolation or self.settings.docker_runtime)],
            # fsize: no file the code writes, sparse or not, is larger than a workspace file may be
            ulimits=[Ulimit(name="nofile", soft=NOFILE, hard=NOFILE), Ulimit(name="core", soft=0, hard=0),
                     Ulimit(name="fsize", soft=lim.file_bytes, hard=lim.file_bytes)],
            mem_limit=f"{lim.memory_mb}m",
            memswap_limit=f"{lim.memory_mb}m",
            nano_cpus=int(lim.cpus * 1e9),
            pids_limit=lim.pids,
            ipc_mode="private",
            hostname="sandbox",
            working_dir="/mnt/data",
            environment=spec.env,
            volumes={
                str(spec.runtime_dir): {"bind": self.runtime_mount, "mode": "rw"},
                str(spec.workspace_dir): {"bind": self.workspace_mount, "mode": "rw"},
                # installed packages: read-only, and not noexec, so a wheel's .so loads
                **({str(spec.site_dir): {"bind": self.site_mount, "mode": "ro"}} if spec.site_dir else {}),
            },
            labels={LABEL: "1", f"{LABEL}.session": spec.session_id, f"{LABEL}.owner": spec.owner, **self.labels},
            runtime=spec.isolation or self.settings.docker_runtime,
            # the kernel can write to its stdout file descriptor directly: keep the daemon's log small
            log_config={"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
        ))
        try:
            container = await asyncio.shield(run)
        except asyncio.CancelledError:
            # The daemon call goes on in its thread and will create the container anyway: wait for
            # it and remove it, so a cancelled start (shutdown, a client gone) leaks nothing.
            try:
                leftover = await run
                await asyncio.to_thread(leftover.remove, force=True)
            except Exception:
                pass
            raise
        except SandboxError:
            # `run` is create then start: a container the daemon created but could not start stays
            # behind in the Created state unless removed here.
            await self._remove_by_name(client, name)
            raise
        return KernelHandle(spec=spec, ref=container)

    async def _remove_by_name(self, client: Any, name: str) -> None:
        try:
            await asyncio.to_thread(client.api.remove_container, name, force=True)
        except Exception as exc:  # never created, or already gone
            log.debug("removing %s after a failed start: %s", name, exc)

    async def is_alive(self, handle: KernelHandle) -> bool:
        try:
            await asyncio.to_thread(handle.ref.reload)
        except Exception:  # gone or daemon hiccup: treat as dead, the session restarts it
            return False
        return handle.ref.status in ("running", "created")

    async def exit_reason(self, handle: KernelHandle) -> str:
        try:
            await asyncio.to_thread(handle.ref.reload)
        except Exception:
            return "its container disappeared"
        state = handle.ref.attrs.get("State", {})
        if state.get("OOMKilled"):
            return f"out of memory (the session's limit is {handle.spec.limits.memory_mb} MiB)"
        code = state.get("ExitCode")
        if code == 137:
            return "killed (SIGKILL), most likely for using too much memory"
        logs = ""
        try:
            logs = (await asyncio.to_thread(handle.ref.logs, tail=5)).decode(errors="replace").strip()
        except Exception:
            pass
        return f"the kernel process exited with code {code}{sandbox_words(logs)}"

    async def stop(self, handle: KernelHandle) -> None:
        try:
            await asyncio.to_thread(handle.ref.remove, force=True)
        except Exception as exc:  # already removed
            log.debug("removing %s: %s", handle.spec.session_id, exc)

    async def adopt(self, spec: KernelSpec) -> KernelHandle | None:
        """The session's container, still running since an earlier server started it."""
        client = self._docker()
        try:
            container = await asyncio.to_thread(client.containers.get, f"jupybox-{spec.session_id}")
        except Exception:  # noqa: BLE001 - not there (removed, host restarted): the session is paused
            return None
        labels = container.labels or {}
        if labels.get(f"{LABEL}.session") != spec.session_id or any(labels.get(k) != v for k, v in self.labels.items()):
            return None
        if container.status != "running":
            await self.stop(KernelHandle(spec=spec, ref=container))
            return None
        return KernelHandle(spec=spec, ref=container)

    async def cleanup_orphans(self, is_orphan: Callable[[str, str], bool]) -> int:
        client = self._docker()
        # sparse: one list call, no inspect per container (which races with others removing theirs)
        wanted = [LABEL, *(f"{k}={v}" for k, v in self.labels.items())]
        containers = await self._call(client.containers.list, all=True, sparse=True, filters={"label": wanted})
        removed = 0
        for c in containers:
            labels = c.attrs.get("Labels") or {}
            if is_orphan(labels.get(f"{LABEL}.owner", ""), labels.get(f"{LABEL}.session", "")):
                log.info("removing orphaned sandbox container %s", c.id[:12])
                try:
                    await asyncio.to_thread(client.api.remove_container, c.id, force=True)
                    removed += 1
                except Exception as exc:  # already gone
                    log.debug("could not remove orphan %s: %s", c.id[:12], exc)
        return removed

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
