"""``%pip install`` in a sandbox without network: the host installs from the wheelhouse.

The kernel keeps no network and no socket to the host, and all it can write stays ``noexec``. Its
``pip`` (a shim in the image, ``sandbox/image/pipshim``) checks the request and asks the host: a
display message of type ``PIP_MIME`` on iopub (from ``%pip`` in the kernel), or a ``PIP_MARKER``
line on stdout (``!pip``, ``pip`` in a subprocess). The session's output collector hands that to
``SitePackages.submit`` and never passes it on. The host then runs pip with ``--no-index`` against
the wheelhouse into a fresh folder, checks the session's quota (workspace and site together) and
renames the folder into the session's *site* folder, which the kernel sees read-only (and not
``noexec``, so a wheel's ``.so`` loads) at ``SITE_MOUNT``. Last it writes the answer file the shim
waits for, ``.answers/<id>.json``; the kernel adds the new folder to ``sys.path`` and imports.

A failed install leaves nothing: the fresh folder is renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from .config import SandboxSettings
from .wheelhouse import (STUB_MARKER, SandboxTarget, Wheelhouse, WheelhouseError, parse_requirement, pip_reason,
                         run_pip, target_for, wheelhouse_dir, write_stubs)
from .workspace import Workspace, remove_tree

log = logging.getLogger(__name__)

PIP_MIME = "application/vnd.jupybox.pip+json"
PIP_MARKER = "\x1ejupybox-pip:"  # a stdout line of the shim run as a subprocess: marker, JSON, newline
SITE_MOUNT = "/opt/jupybox/site"
ANSWERS = ".answers"
ID_RE = re.compile(r"^[0-9a-f]{16,32}$")
MAX_REQUIREMENTS = 20
MAX_REQUESTS_PER_MINUTE = 20
INSTALL_TIMEOUT_S = 50.0  # under the shim's own wait (60 s), so it always hears an answer


def admin_hint(name: str) -> str:
    return f"an admin can add it with `jupybox packages add {name}`"


def parse_marker_lines(text: str) -> tuple[str, list[Any]]:
    """Split stream ``text`` into what the user sees and the requests its marker lines carry."""
    if PIP_MARKER not in text:
        return text, []
    kept, requests = [], []
    for line in text.split("\n"):  # not splitlines(): it splits at the marker's own \x1e
        if line.startswith(PIP_MARKER):
            try:
                requests.append(json.loads(line[len(PIP_MARKER):]))
            except ValueError:
                log.debug("dropped a malformed pip request line")
        else:
            kept.append(line)
    return "\n".join(kept), requests


def take_pip_requests(kind: str, content: dict[str, Any], submit: Callable[[Any], None]) -> dict[str, Any] | None:
    """Hand the pip requests an iopub ``stream`` or ``display_data`` message carries to ``submit``
    and return what is left of its content to show: ``None`` when nothing is, ``content`` itself
    when it carried none."""
    if kind == "display_data":
        data = content.get("data")
        if isinstance(data, dict) and PIP_MIME in data:
            submit(data[PIP_MIME])
            return None
        return content
    if kind != "stream":
        return content
    text, requests = parse_marker_lines(str(content.get("text", "")))
    for request in requests:
        submit(request)
    if not requests:
        return content
    return {**content, "text": text} if text else None


@dataclass
class SitePackages:
    """One session's installed packages: ``folder`` on the host (``<n>/`` per install, ``.answers/``),
    mounted read-only in the kernel. Installs run one at a time."""

    folder: Path
    settings: SandboxSettings
    workspace: Workspace
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _recent: list[float] = field(default_factory=list)  # when the last requests came (a rate bound)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)  # request ids: each relay sees each one

    def prepare(self) -> None:
        """Called before a kernel starts: the folders exist (the mount needs them), readable by the
        kernel's user, writable by no one but this host's process."""
        (self.folder / ANSWERS).mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o755)
        os.chmod(self.folder / ANSWERS, 0o755)

    def submit(self, request: Any) -> None:
        """Called by the output collector or a notebook relay with the kernel's request (untrusted
        JSON; each id is served once); the answer is written when the install is done. Bounded to
        ``MAX_REQUESTS_PER_MINUTE``."""
        if not isinstance(request, dict) or not isinstance(request.get("id"), str) or not ID_RE.match(request["id"]):
            log.debug("dropped a pip request without a valid id")
            return
        if request["id"] in self._seen:
            return
        self._seen[request["id"]] = None
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < 60] + [now]
        if len(self._recent) > MAX_REQUESTS_PER_MINUTE:
            self._write_answer(request["id"], {"ok": False, "error": f"more than {MAX_REQUESTS_PER_MINUTE} pip "
                                               "requests in a minute: install several packages in one line"})
            return
        task = asyncio.ensure_future(self._answer(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float = INSTALL_TIMEOUT_S) -> None:
        """Wait for installs still running (the execution ended or timed out meanwhile)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _answer(self, request: dict[str, Any]) -> None:
        rid = request["id"]
        try:
            raw = request.get("requirements")
            if not isinstance(raw, list) or not raw or not all(isinstance(r, str) for r in raw):
                raise WheelhouseError("pip install needs at least one package name")
            if len(raw) > MAX_REQUIREMENTS:
                raise WheelhouseError(f"at most {MAX_REQUIREMENTS} packages in one install")
            reqs = [str(parse_requirement(r)) for r in raw]
            async with self._lock:
                answer = await asyncio.wait_for(self._install(reqs), INSTALL_TIMEOUT_S)
        except WheelhouseError as exc:
            answer = {"ok": False, "error": str(exc)}
        except asyncio.TimeoutError:
            answer = {"ok": False, "error": f"the install took longer than {INSTALL_TIMEOUT_S:g} s and was stopped"}
        except Exception:  # noqa: BLE001 - the kernel must hear an answer, whatever went wrong here
            log.exception("pip request %s failed", rid)
            answer = {"ok": False, "error": "the install failed on the server; its log has the reason"}
        await asyncio.to_thread(self._write_answer, rid, answer)

    async def _install(self, reqs: list[str]) -> dict[str, Any]:
        target = await target_for(self.settings)
        return await asyncio.to_thread(self._install_sync, reqs, target)

    def installed(self) -> dict[str, str]:
        """What earlier installs of this session put in the site folder (canonical name -> version)."""
        found: dict[str, str] = {}
        for entry in self._install_dirs():
            for info in entry.glob("*.dist-info"):
                name, _, version = info.name[: -len(".dist-info")].rpartition("-")
                found[canonicalize_name(name)] = version
        return found

    def _install_dirs(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))

    def _install_sync(self, reqs: list[str], target: SandboxTarget) -> dict[str, Any]:
        t0 = time.monotonic()
        house = Wheelhouse(wheelhouse_dir(self.settings), target)
        mine = self.installed()
        wanted = {canonicalize_name(parse_requirement(r).name): r for r in reqs}
        in_image = [n for n in wanted if n in target.installed]
        already = [n for n in wanted if n in mine]
        notes = [f"{n} {target.installed[n]} is part of the sandbox" for n in in_image]
        notes += [f"{n} {mine[n]} is installed already" for n in already]
        todo = [r for n, r in wanted.items() if n not in target.installed and n not in mine]
        if not todo:
            return {"ok": True, "installed": [], "notes": notes}
        available = set(house.names())
        missing = [parse_requirement(r).name for r in todo if canonicalize_name(parse_requirement(r).name) not in available]
        if missing:
            raise WheelhouseError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in this server's "
                                  f"wheelhouse (the sandbox has no network): {admin_hint(' '.join(missing))}")
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=self.folder))
        try:
            stubs = staging / "stubs"
            constraints = write_stubs(stubs, target, {**target.installed, **mine})
            out = staging / "lib"
            done = run_pip(["install", "--no-index", "--find-links", str(house.path), "--find-links", str(stubs),
                            "-c", str(constraints), "--target", str(out), "--no-compile", "--no-warn-script-location",
                            *target.pip_options(), *todo], timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                log.info("pip install in session failed: %s", done.stderr[-4000:])
                raise WheelhouseError(f"could not install {', '.join(todo)}: {pip_reason(done)}")
            for info in list(out.glob("*.dist-info")):
                if (info / STUB_MARKER).exists():
                    shutil.rmtree(info)
            size = _tree_size(out)
            used = self.workspace.usage() + sum(_tree_size(d) for d in self._install_dirs())
            quota = self.workspace.limits.workspace_bytes
            if used + size > quota:
                raise WheelhouseError(f"installing {', '.join(todo)} needs {size / 1e6:.1f} MB and the session's quota "
                                      f"({quota / 1e6:.0f} MB for files and packages) has {max(quota - used, 0) / 1e6:.1f} "
                                      "MB left: delete files from the workspace first")
            for path in [out, *out.rglob("*")]:
                os.chmod(path, 0o755 if path.is_dir() else 0o644 | (os.stat(path).st_mode & 0o111))
            number = max((int(p.name) for p in self._install_dirs()), default=0) + 1
            os.rename(out, self.folder / str(number))  # atomic: the kernel sees all of it or nothing
        finally:
            remove_tree(staging)
        new = {n: v for n, v in self.installed().items() if n not in mine}
        log.info("session site %s: installed %s in %.2f s", self.folder, new, time.monotonic() - t0)
        return {"ok": True, "path": f"{SITE_MOUNT}/{number}", "installed": sorted(new.items()), "notes": notes}

    def _write_answer(self, rid: str, answer: dict[str, Any]) -> None:
        answers = self.folder / ANSWERS
        answers.mkdir(parents=True, exist_ok=True)
        tmp = answers / f".{rid}.tmp"
        tmp.write_text(json.dumps(answer))
        os.chmod(tmp, 0o644)
        os.rename(tmp, answers / f"{rid}.json")


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):  # host-made trees only: pip's output, never the kernel's
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclass(frozen=True)
class PackageListing:
    """What the model may rely on: the image's main packages and what ``%pip install`` can add."""

    importable: list[str]
    installable: list[str]


MAIN_PACKAGES = ("numpy", "pandas", "scipy", "sympy", "matplotlib", "seaborn", "scikit-learn", "openpyxl", "pillow")


async def listing(settings: SandboxSettings) -> PackageListing:
    """For the prompt: the image's main packages (those of ``MAIN_PACKAGES`` it holds) and the
    wheelhouse's top names. Never raises: without an answer the lists are the defaults / empty."""
    try:
        target = await target_for(settings)
        importable = [n for n in MAIN_PACKAGES if n in target.installed]
    except Exception as exc:  # noqa: BLE001 - no image or daemon yet: the turn itself will say so
        log.debug("the sandbox's packages could not be listed: %s", exc)
        target, importable = SandboxTarget(), list(MAIN_PACKAGES)
    names = await asyncio.to_thread(lambda: Wheelhouse(wheelhouse_dir(settings), target).names())
    return PackageListing(importable=importable, installable=[n for n in names if n not in target.installed])
