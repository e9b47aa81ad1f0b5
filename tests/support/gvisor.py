"""gVisor (``runsc``) registered with the Docker daemon by the project's own set-up script, as CI
and users run it; the ``gvisor_runtime`` fixture runs it once per test run."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sandbox import SandboxSettings
from tests.support.sandboxes import ROOT, docker_settings

SETUP = ROOT / "scripts" / "setup-gvisor.sh"


def run_setup() -> subprocess.CompletedProcess[str]:
    """``scripts/setup-gvisor.sh``: installs Debian's ``runsc`` and registers it with Docker."""
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)


def gvisor_settings(home: Path, **kw: object) -> SandboxSettings:
    """Docker settings whose containers run on gVisor's kernel."""
    return docker_settings(home, docker_runtime="runsc", **kw)
