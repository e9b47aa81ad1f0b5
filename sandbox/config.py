"""One typed settings object for the sandbox, read from flags and environment by the caller."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import LimitsError

SANDBOX_IMAGE = "jupybox-sandbox:latest"
# The kernel's user when jupybox runs as root: a uid and gid that own nothing on a usual host (above
# the ranges of system and login users, below the ranges handed out for user namespaces).
SANDBOX_UID = SANDBOX_GID = 70000
# The least of each limit a kernel can run with; below these Docker refuses, or ignores the limit
# (a CPU quota under 0.01 is none at all), or the kernel cannot start.
MINIMUM_LIMITS = {"memory_mb": 64, "cpus": 0.1, "pids": 16, "tmp_mb": 1, "output_bytes": 1_000,
                  "max_images": 0, "max_image_bytes": 0, "file_bytes": 1, "workspace_bytes": 1 << 20}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one session. Sizes in bytes unless the name says otherwise."""

    memory_mb: int = 1024  # RAM, swap included (no swap on top)
    cpus: float = 1.0
    pids: int = 256
    tmp_mb: int = 256  # tmpfs at /tmp
    output_bytes: int = 100_000  # stdout+stderr text kept per execution (head + tail)
    max_images: int = 20  # images kept per execution
    max_image_bytes: int = 10_000_000  # raw bytes; at most ~11 MB (the host refuses messages over 16 MiB)
    file_bytes: int = 100_000_000  # one workspace file
    workspace_bytes: int = 500_000_000  # a workspace as a whole

    def check(self, ceiling: Limits | None = None) -> None:
        """Raise ``LimitsError`` naming every limit that is not a finite number at or above its
        minimum (``MINIMUM_LIMITS``), or above ``ceiling``'s (the server's own limits); CPUs are
        also capped by this host's processor count."""
        problems = []
        cpu_count = os.cpu_count() or 1
        for f in fields(self):
            value = getattr(self, f.name)
            least = MINIMUM_LIMITS[f.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{f.name}={value!r} is not a number")
            elif value < least:
                problems.append(f"{f.name}={value:g} is below the minimum of {least:g}")
            elif ceiling is not None and value > getattr(ceiling, f.name):
                problems.append(f"{f.name}={value:g} is above the server's {getattr(ceiling, f.name):g}")
            elif f.name == "cpus" and value > cpu_count:
                problems.append(f"cpus={value:g} is more than this host's {cpu_count} processors")
        if problems:
            raise LimitsError("invalid session limits: " + "; ".join(problems))


@dataclass(frozen=True)
class KernelWatch:
    """How often a session looks at its kernel's life, and how long it waits on clients; tests
    pass small values instead of sleeping through these."""

    check_s: float = 1.0  # while a notebook client's request runs, how often to ask if the kernel lives
    idle_check_s: float = 3.0  # with nothing running (Jupyter Server's restarter polls every 3 s too)
    recheck_s: float = 0.5  # a kernel is dead in two looks this far apart: one daemon hiccup costs nothing
    start_check_s: float = 0.25  # while a kernel starts, how often its process is checked
    # a kernel still alive this long after a client's shutdown request is replaced, as Jupyter's own
    # kernel manager kills one after its shutdown wait (5 s): ipykernel can hang on its way out
    shutdown_grace_s: float = 5.0
    client_stall_s: float = 30.0  # a client that reads nothing this long while its queue is full is disconnected


def default_home() -> Path:
    return Path(os.environ.get("JUPYBOX_HOME") or Path.home() / ".cache" / "jupybox")


@dataclass
class SandboxSettings:
    backend: str = "docker"  # docker | bwrap | local | ray
    image: str = SANDBOX_IMAGE
    docker_runtime: str | None = None  # e.g. "runsc" for gVisor
    limits: Limits = field(default_factory=Limits)
    home: Path = field(default_factory=default_home)  # per-session runtime folders and workspaces
    pool_size: int = 0  # warm sessions kept ready
    max_sessions: int = 64
    idle_ttl_s: float = 1800.0  # sessions idle longer are paused (closed, where not durable) by the reaper
    # sessions are records under ``home`` that outlive the server: idle ones and, at shutdown, all are
    # paused (variables saved, container removed, files kept); False: they end with the server
    durable: bool = False
    retain_days: float = 7.0  # a paused session unused this long is deleted with its files
    pause_timeout_s: float = 120.0  # how long saving a session's variables may take
    start_timeout_s: float = 60.0
    interrupt_grace_s: float = 3.0  # after a timeout, how long an interrupt may take before a restart
    default_timeout_s: float = 30.0
    allow_unsafe_local: bool = False  # the local backend has no isolation at all
    instance: str | None = None  # names this process's containers; defaults to the host name
    sandbox_uid: int = SANDBOX_UID  # the kernel's user when jupybox runs as root
    sandbox_gid: int = SANDBOX_GID
    # what the memory limits of all sessions (warm pool included) may add up to; None: 90% of the host's
    memory_budget_mb: int | None = None
    # each workspace its own size-capped filesystem (see sandbox/diskfs.py): auto | loop | plain
    workspace_fs: str = "auto"
    # backend "ray": the cluster to join (host:port of its head); None starts a one-node Ray on loopback
    ray_address: str | None = None
    kernel_watch: KernelWatch = field(default_factory=KernelWatch)
    # wheels sandboxed code may install (``jupybox packages``); None: ``wheelhouse`` under ``home``
    wheelhouse: Path | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> SandboxSettings:
        """Settings from ``JUPYBOX_*`` environment variables; explicit ``overrides`` (flags) win."""
        env = os.environ
        values: dict[str, object] = {}
        if "JUPYBOX_BACKEND" in env:
            values["backend"] = env["JUPYBOX_BACKEND"]
        if "JUPYBOX_IMAGE" in env:
            values["image"] = env["JUPYBOX_IMAGE"]
        if env.get("JUPYBOX_DOCKER_RUNTIME"):
            values["docker_runtime"] = env["JUPYBOX_DOCKER_RUNTIME"]
        if "JUPYBOX_POOL_SIZE" in env:
            values["pool_size"] = int(env["JUPYBOX_POOL_SIZE"])
        if env.get("JUPYBOX_MAX_SESSIONS"):
            values["max_sessions"] = int(env["JUPYBOX_MAX_SESSIONS"])
        if env.get("JUPYBOX_IDLE_TTL"):
            values["idle_ttl_s"] = float(env["JUPYBOX_IDLE_TTL"])
        if env.get("JUPYBOX_RETAIN_DAYS"):
            values["retain_days"] = float(env["JUPYBOX_RETAIN_DAYS"])
        if env.get("JUPYBOX_DURABLE"):
            values["durable"] = env["JUPYBOX_DURABLE"].lower() not in ("0", "false", "no", "off")
        if "JUPYBOX_INSTANCE" in env:
            values["instance"] = env["JUPYBOX_INSTANCE"]
        if env.get("JUPYBOX_WORKSPACE_FS"):
            values["workspace_fs"] = env["JUPYBOX_WORKSPACE_FS"]
        if env.get("JUPYBOX_MEMORY_BUDGET_MB"):
            values["memory_budget_mb"] = int(env["JUPYBOX_MEMORY_BUDGET_MB"])
        if env.get("JUPYBOX_WHEELHOUSE"):
            values["wheelhouse"] = Path(env["JUPYBOX_WHEELHOUSE"])
        if env.get("RAY_ADDRESS"):
            values["ray_address"] = env["RAY_ADDRESS"]
        limits = {}
        for name, conv in (("memory_mb", int), ("cpus", float), ("pids", int)):
            key = f"JUPYBOX_{name.upper()}"
            if key in env:
                limits[name] = conv(env[key])
        for name, key in (("file_bytes", "JUPYBOX_FILE_MB"), ("workspace_bytes", "JUPYBOX_WORKSPACE_MB")):
            if env.get(key):
                limits[name] = int(float(env[key]) * 1_000_000)
        if limits:
            values["limits"] = Limits(**limits)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def memory_budget(self) -> int:
        """MiB the sessions' memory limits may add up to: ``memory_budget_mb``, or 90% of the host's
        memory (a host without /proc/meminfo gets no bound from here)."""
        if self.memory_budget_mb is not None:
            return self.memory_budget_mb
        try:
            with open("/proc/meminfo") as fh:
                total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
        except (OSError, StopIteration, ValueError):
            return 1 << 40
        return int(total_kb / 1024 * 0.9)
