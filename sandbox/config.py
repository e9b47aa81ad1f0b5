"""One typed settings object for the sandbox, read from flags and environment by the caller."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SANDBOX_IMAGE = "jupybox-sandbox:latest"


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
    idle_ttl_s: float = 1800.0  # sessions idle longer are closed by the reaper
    start_timeout_s: float = 60.0
    interrupt_grace_s: float = 3.0  # after a timeout, how long an interrupt may take before a restart
    default_timeout_s: float = 30.0
    allow_unsafe_local: bool = False  # the local backend has no isolation at all
    instance: str | None = None  # names this process's containers; defaults to the host name
    sandbox_uid: int = 1000  # the kernel's user when jupybox runs as root
    sandbox_gid: int = 1000
    # each workspace its own size-capped filesystem (see sandbox/diskfs.py): auto | loop | plain
    workspace_fs: str = "auto"
    # backend "ray": the cluster to join (host:port of its head); None starts a one-node Ray on loopback
    ray_address: str | None = None

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
        if "JUPYBOX_INSTANCE" in env:
            values["instance"] = env["JUPYBOX_INSTANCE"]
        if env.get("JUPYBOX_WORKSPACE_FS"):
            values["workspace_fs"] = env["JUPYBOX_WORKSPACE_FS"]
        if env.get("RAY_ADDRESS"):
            values["ray_address"] = env["RAY_ADDRESS"]
        limits = {}
        for name, conv in (("memory_mb", int), ("cpus", float), ("pids", int)):
            key = f"JUPYBOX_{name.upper()}"
            if key in env:
                limits[name] = conv(env[key])
        if limits:
            values["limits"] = Limits(**limits)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
