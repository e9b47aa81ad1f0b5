"""``%pip install NAME; import NAME`` of a small package from the wheelhouse, as a user waits for it.

A wheelhouse of its own (tiny pure-Python wheels written here, so no network is needed) and one
session; each run installs a package not installed before, so every sample is a real install (the
host's pip, the move into the session's site folder, the kernel's import). The baseline is a cell
that imports a module of the standard library in the same session, measured in the same run.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from sandbox import SandboxError, SandboxSettings, SessionManager

from .session_timing import percentile


def pure_wheel(dest: Path, name: str, version: str = "0.1", requires: tuple[str, ...] = (),
               code: str = "VALUE = 1\n", extra: dict[str, bytes] | None = None) -> Path:
    """A ``py3-none-any`` wheel of package ``name`` whose ``__init__`` is ``code``, written as a zip
    (a wheel needs nothing more for pip to install it)."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", code)
        for member, data in (extra or {}).items():
            zf.writestr(f"{name}/{member}", data)
        zf.writestr(f"{info}/METADATA", metadata)
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: jupybox\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


async def pip_install_times(settings: SandboxSettings, runs: int) -> dict[str, Any]:
    """Seconds for ``%pip install benchpkgN`` and its import (p50, max, and the first, which also
    asks the image what it holds once), next to an import of ``json`` in the same session."""
    with tempfile.TemporaryDirectory(prefix="jupybox-bench-wheels-") as tmp:
        house = Path(tmp)
        for i in range(runs + 1):
            pure_wheel(house, f"benchpkg{i}", code=f"N = {i}\n")
        own = dataclasses.replace(settings, wheelhouse=house, pool_size=0,
                                  instance=f"{settings.instance or 'bench'}-pip")
        async with SessionManager(own) as manager:
            session = await manager.create()
            try:
                installs, baseline = [], []
                for i in range(runs + 1):
                    t0 = time.perf_counter()
                    ex = await session.execute(f"%pip install benchpkg{i}\nimport benchpkg{i}\nbenchpkg{i}.N", timeout=60)
                    installs.append(time.perf_counter() - t0)
                    if not ex.ok or not ex.results or ex.results[-1].data.get("text/plain") != str(i):
                        raise SandboxError(f"the pip phase could not install and import benchpkg{i}: {ex.text()}")
                    t0 = time.perf_counter()
                    await session.execute("import json")
                    baseline.append(time.perf_counter() - t0)
            finally:
                await manager.close(session.id)
    first, rest = installs[0], installs[1:]
    return {"pip_install_import_first_s": first, "pip_install_import_p50_s": percentile(rest, 0.5),
            "pip_install_import_max_s": max(rest), "pip_baseline_import_p50_ms": percentile(baseline, 0.5) * 1e3}
