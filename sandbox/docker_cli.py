"""The docker CLI as the image builder uses it: short queries with a bounded wait, and long
commands whose output streams line by line (the legacy builder, ``DOCKER_BUILDKIT=0``, unless the
caller sets it)."""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from typing import IO

from .errors import BackendUnavailable, SandboxError

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 30

LogSink = Callable[[str], None]


def docker_env() -> dict[str, str]:
    # The legacy builder: it honours `--network host` without BuildKit entitlements and works
    # where buildx is not installed. A caller's own DOCKER_BUILDKIT wins.
    env = dict(os.environ)
    env.setdefault("DOCKER_BUILDKIT", "0")
    return env


def docker(*args: str, timeout: float = QUERY_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a short docker CLI command and return it finished (the caller reads its exit code)."""
    try:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, env=docker_env()
        )
    except FileNotFoundError as exc:
        raise BackendUnavailable(
            "the docker CLI is not on PATH: install Docker (e.g. `apt-get install docker.io`) "
            "or use the bwrap backend (--backend bwrap)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendUnavailable(
            f"`docker {' '.join(args)}` gave no answer within {timeout:.0f} s: is the Docker "
            "daemon stuck? Restart it, or use the bwrap backend (--backend bwrap)"
        ) from exc


def check_daemon() -> None:
    result = docker("version", "--format", "{{.Server.Version}}")
    if result.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BackendUnavailable(
            f"Docker daemon not reachable at {where} ({detail[0]}): start it with "
            "`sudo systemctl start docker` (or `sudo dockerd &`), or use the bwrap backend "
            "(--backend bwrap)"
        )


def image_id(name: str) -> str | None:
    """The local image's id, or None when there is no image of that name."""
    result = docker("image", "inspect", "--format", "{{.Id}}", name)
    if result.returncode == 0:
        return result.stdout.strip()
    if "no such image" in result.stderr.lower():
        return None
    raise SandboxError(f"`docker image inspect {name}` failed: {result.stderr.strip()}")


def stream(
    command: list[str],
    on_log: LogSink | None,
    *,
    timeout: float,
    stdin: IO[bytes] | None = None,
) -> tuple[int, list[str]]:
    """Run a long command, passing each output line on; return its exit code and last lines.

    A command still running after ``timeout`` seconds is killed (exit code negative).
    """
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    try:
        process = subprocess.Popen(
            command,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=docker_env(),
        )
    except FileNotFoundError as exc:
        raise SandboxError(f"{command[0]} is not installed: {exc}") from exc
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            logger.debug("%s: %s", command[0], line)
            if on_log is not None:
                on_log(line)
        rc = process.wait()
    finally:
        timer.cancel()
    if rc < 0:
        tail.append(f"[{command[0]} was stopped after {timeout:.0f} s or by a signal]")
    return rc, list(tail)
