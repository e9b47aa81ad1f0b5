"""The wheelhouse: the packages an admin lets sandboxed code install, as wheels in one folder.

The kernel has no network. ``jupybox packages add`` downloads wheels here, on the host, for the
*sandbox's* Python and platform (``SandboxTarget``, probed once per image), with their dependencies;
``sandbox.packages`` installs from here into a session's own site folder when the kernel asks.

Packages already in the sandbox image are never downloaded or installed again: pip's resolver sees
them as *stub wheels* (metadata only, pinned by a constraints file to the image's versions), so a
requirement that needs another version of one of them is a resolution error that names it, and the
stubs are dropped from what pip produced. Only wheels are taken (``--only-binary=:all:``): nothing a
user or an index supplies is ever built or run on the host.

Errors: ``WheelhouseError`` (a ``SandboxError``) with pip's own reason and the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from .config import SandboxSettings
from .errors import SandboxError

log = logging.getLogger(__name__)

STUB_MARKER = "JUPYBOX_STUB"  # a file in a stub's .dist-info: what pip "installed" from it is dropped
PIP_TIMEOUT_S = 600.0
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$")
# the probe runs on the sandbox's Python: its version, machine, C library and installed distributions
PROBE = ("import json, platform, sys, importlib.metadata as m; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
         "'machine': platform.machine(), 'libc': platform.libc_ver(), 'dists': sorted({(d.metadata['Name'] or '', d.version) "
         "for d in m.distributions() if d.metadata['Name']})}))")


class WheelhouseError(SandboxError):
    """A package could not be added, removed or installed; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxTarget:
    """The Python a kernel runs on, as pip's ``--platform``/``--abi`` options need it, and what
    its image already holds (canonical name -> version)."""

    python: str = "3.11"
    machine: str = "x86_64"
    glibc: tuple[int, int] = (2, 36)
    installed: dict[str, str] = field(default_factory=dict)

    @property
    def platforms(self) -> list[str]:
        """Newest first: pip prefers the first, which the stubs carry so they win every tie."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        tags += [f"manylinux2014_{self.machine}", f"manylinux2010_{self.machine}", f"manylinux1_{self.machine}",
                 f"linux_{self.machine}"]
        return tags

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def pip_options(self) -> list[str]:
        opts = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp"]
        for abi in (self.abi, "abi3", "none"):
            opts += ["--abi", abi]
        for platform in self.platforms:
            opts += ["--platform", platform]
        return opts

    def describe(self) -> str:
        return f"CPython {self.python} on {self.machine} (glibc {self.glibc[0]}.{self.glibc[1]})"


def wheelhouse_dir(settings: SandboxSettings) -> Path:
    """``JUPYBOX_WHEELHOUSE`` (``settings.wheelhouse``), else ``wheelhouse`` under the home."""
    return Path(settings.wheelhouse) if settings.wheelhouse else settings.home / "wheelhouse"


def parse_requirement(text: str) -> Requirement:
    """A requirement that names a package and at most a version range: no URL, path, VCS
    reference, extras-injection or environment marker. ``WheelhouseError`` names what is wrong."""
    text = text.strip()
    if "://" in text or text.startswith(("git+", "hg+", "svn+", "bzr+")) or "@" in text:
        raise WheelhouseError(f"{text!r} is a URL or VCS reference: only package names from the wheelhouse "
                              "can be installed (NAME or NAME==VERSION)")
    if "/" in text or "\\" in text or text.startswith(".") or text.endswith((".whl", ".tar.gz", ".zip", ".tgz")):
        raise WheelhouseError(f"{text!r} is a file or path: only package names from the wheelhouse can be installed "
                              "(NAME or NAME==VERSION)")
    try:
        req = Requirement(text)
    except InvalidRequirement:
        raise WheelhouseError(f"{text!r} is not a package name with an optional version (NAME or NAME==VERSION)") from None
    if req.url or req.marker or not NAME_RE.match(req.name):
        raise WheelhouseError(f"{text!r} is not a plain package name with an optional version (NAME or NAME==VERSION)")
    return req


_PROBED: dict[str, dict[str, Any]] = {}  # image id, or this host's Python -> what the probe said


def probe_target(settings: SandboxSettings) -> SandboxTarget:
    """The sandbox's Python, asked once per image and cached under the home: the docker image's
    own interpreter (a throwaway container without network), or this host's for bwrap and local."""
    cache, key = None, sys.executable
    if settings.backend in ("docker", "ray"):  # the cluster's nodes run the same image
        image_id = _docker(settings.image, lambda client: client.images.get(settings.image).id)
        cache, key = settings.home / "packages" / f"target-{image_id.replace(':', '-')[:80]}.json", image_id
    if key in _PROBED:  # this process asked already (another home, the same image or Python)
        raw = _PROBED[key]
    elif cache is not None and cache.is_file():
        raw = json.loads(cache.read_text())
    else:
        if cache is not None:
            out = _docker(settings.image, lambda client: client.containers.run(
                settings.image, ["python", "-I", "-c", PROBE], network_mode="none", remove=True, stderr=False))
        else:
            try:
                out = subprocess.run([sys.executable, "-I", "-c", PROBE], capture_output=True, timeout=120, check=True).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                raise WheelhouseError(f"could not ask the kernel's Python what it is ({exc})") from None
        raw = json.loads(out)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(raw))
    _PROBED[key] = raw
    libc = raw.get("libc") or ["glibc", "2.17"]
    major, _, minor = (libc[1] or "2.17").partition(".")
    return SandboxTarget(python=raw["python"], machine=raw["machine"], glibc=(int(major), int(minor or 17)),
                         installed={canonicalize_name(n): v for n, v in raw["dists"]})


def _docker(image: str, call: Callable[[Any], Any]) -> Any:
    """``call(client)`` on the Docker daemon about ``image``, its failures in words with the next step."""
    import docker
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env(timeout=120)
        try:
            return call(client)
        finally:
            client.close()
    except ImageNotFound:
        raise WheelhouseError(f"the sandbox image {image!r} is missing: build it with `jupybox sandbox build-image` "
                              "(or name another with --image / JUPYBOX_IMAGE)") from None
    except DockerException as exc:
        raise WheelhouseError(f"could not ask the sandbox image what it holds ({exc}): is the Docker daemon "
                              "running and the image built (`jupybox sandbox build-image`)?") from None


def write_stubs(folder: Path, target: SandboxTarget, dists: dict[str, str]) -> Path:
    """Metadata-only wheels for ``dists`` (name -> version) in ``folder``, and a constraints file
    pinning them; returns the constraints file. The stubs carry the target's first tag and a
    build number, so pip picks them over any real wheel of the same version."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"cp{target.python.replace('.', '')}-{target.abi}-{target.platforms[0]}"
    lines = []
    for name, version in sorted(dists.items()):
        stem = f"{name.replace('-', '_')}-{version}"
        path = folder / f"{stem}-1-{tag}.whl"
        lines.append(f"{name}=={version}")
        if path.exists():
            continue
        info = f"{stem}.dist-info"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: jupybox\nRoot-Is-Purelib: true\nBuild: 1\nTag: {tag}\n")
            zf.writestr(f"{info}/{STUB_MARKER}", "")
            zf.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/{STUB_MARKER},,\n{info}/RECORD,,\n")
    constraints = folder / "constraints.txt"
    constraints.write_text("\n".join(lines) + "\n")
    return constraints


def pip_reason(done: subprocess.CompletedProcess[str]) -> str:
    """pip's own ERROR lines (what it could not find, what conflicts), without its advice."""
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines
              if line.startswith("ERROR:") and not line.startswith("ERROR: ResolutionImpossible")]
    conflict = [line.rstrip(".") + "." for line in lines
                if " depends on " in line or line.startswith("The user requested (constraint)")]
    words = " ".join(errors[:2] + conflict[:4]) or (lines[-1] if lines else "pip failed")
    return words[:1200]


# what ``packages add`` keeps of the host's pip settings: where the index is and how to reach it
INDEX_SETTINGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CLIENT_CERT",
                  "PIP_PROXY", "PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")


def run_pip(args: list[str], timeout: float = PIP_TIMEOUT_S, index: bool = False) -> subprocess.CompletedProcess[str]:
    """This host's pip (the one jupybox runs on), never prompting, with no config file and no
    ``PIP_*`` setting of the host's (a ``PIP_FIND_LINKS`` would add wheels beside the wheelhouse),
    except, with ``index``, those that say how to reach the package index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or (index and k in INDEX_SETTINGS)}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CONFIG_FILE=os.devnull)
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env)


@dataclass(frozen=True)
class Wheel:
    name: str  # canonical
    version: str
    filename: str


class Wheelhouse:
    """The folder of wheels; changing it is an admin's job (the CLI on the server's host)."""

    def __init__(self, path: Path, target: SandboxTarget) -> None:
        self.path = path
        self.target = target

    def wheels(self) -> list[Wheel]:
        if not self.path.is_dir():
            return []
        found = []
        for entry in sorted(self.path.glob("*.whl")):
            try:
                name, version, _, _ = parse_wheel_filename(entry.name)
            except ValueError:
                continue
            found.append(Wheel(str(name), str(version), entry.name))
        return found

    def names(self) -> list[str]:
        return sorted({w.name for w in self.wheels()})

    def add(self, requirements: list[str]) -> list[Wheel]:
        """Download ``requirements`` and their dependencies as wheels for the sandbox. Returns the
        wheels that are new here; packages of the image are left out (their versions constrain
        the resolution)."""
        reqs = [parse_requirement(r) for r in requirements]
        in_image = [r.name for r in reqs if canonicalize_name(r.name) in self.target.installed]
        if in_image:
            raise WheelhouseError(", ".join(f"{n} {self.target.installed[canonicalize_name(n)]}" for n in in_image)
                                  + " is already in the sandbox image: it is importable as it is")
        self.path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="jupybox-wheels-") as tmp:
            stubs = Path(tmp) / "stubs"
            constraints = write_stubs(stubs, self.target, self.target.installed)
            dest = Path(tmp) / "dest"
            args = ["download", "--dest", str(dest), "--progress-bar", "off", *self.target.pip_options(),
                    "--find-links", str(stubs), "--find-links", str(self.path), "-c", str(constraints),
                    *(str(r) for r in reqs)]
            done = run_pip(args, index=True)
            if done.returncode != 0:
                log.info("pip download failed: %s", done.stderr[-4000:])
                raise WheelhouseError(f"could not add {', '.join(map(str, reqs))}: {pip_reason(done)}. "
                                      f"Only wheels for the sandbox's Python ({self.target.describe()}) are taken: "
                                      "check the name, or pick a version that has such a wheel")
            have = {w.filename for w in self.wheels()}
            added = []
            for entry in sorted(dest.glob("*.whl")):
                name, version, _, _ = parse_wheel_filename(entry.name)
                if canonicalize_name(name) in self.target.installed or entry.name in have:
                    continue  # a stub, or a wheel this house holds already
                shutil.move(str(entry), self.path / entry.name)
                os.chmod(self.path / entry.name, 0o644)
                added.append(Wheel(str(name), str(version), entry.name))
        return added

    def remove(self, name: str) -> list[Wheel]:
        """Remove every wheel of ``name``; ``WheelhouseError`` when there is none."""
        wanted = canonicalize_name(parse_requirement(name).name)
        gone = [w for w in self.wheels() if w.name == wanted]
        if not gone:
            raise WheelhouseError(f"{name} is not in the wheelhouse ({self.path}); `jupybox packages list` shows what is")
        for wheel in gone:
            (self.path / wheel.filename).unlink()
        return gone

    def sync(self, requirements_file: Path) -> tuple[list[Wheel], list[Wheel]]:
        """Make the wheelhouse hold exactly what ``requirements_file`` (one requirement a line, ``#``
        comments) resolves to: (added, removed)."""
        lines = [line.split("#", 1)[0].strip() for line in requirements_file.read_text().splitlines()]
        reqs = [line for line in lines if line]
        before = {w.filename for w in self.wheels()}
        with tempfile.TemporaryDirectory(prefix="jupybox-sync-") as tmp:
            fresh = Wheelhouse(Path(tmp) / "house", self.target)
            for wheel in self.wheels():  # reuse what is here: no download for wheels already present
                fresh.path.mkdir(parents=True, exist_ok=True)
                os.link(self.path / wheel.filename, fresh.path / wheel.filename)
            kept = set()
            if reqs:
                fresh.add(reqs)
                kept = _closure(fresh, reqs)
            self.path.mkdir(parents=True, exist_ok=True)
            for wheel in fresh.wheels():
                if wheel.filename in kept and wheel.filename not in before:
                    shutil.copy2(fresh.path / wheel.filename, self.path / wheel.filename)
        removed = [w for w in self.wheels() if w.filename not in kept]
        for wheel in removed:
            (self.path / wheel.filename).unlink()
        added = [w for w in self.wheels() if w.filename not in before]
        return added, removed


def _closure(house: Wheelhouse, reqs: list[str]) -> set[str]:
    """The wheel files that installing ``reqs`` from ``house`` alone would use."""
    with tempfile.TemporaryDirectory(prefix="jupybox-resolve-") as tmp:
        stubs = Path(tmp) / "stubs"
        constraints = write_stubs(stubs, house.target, house.target.installed)
        report = Path(tmp) / "report.json"
        done = run_pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "--no-index",
                        "--find-links", str(house.path), "--find-links", str(stubs), "-c", str(constraints),
                        "--target", str(Path(tmp) / "t"), *house.target.pip_options(), *reqs])
        if done.returncode != 0:
            raise WheelhouseError(f"the requirements do not resolve from the wheelhouse: {pip_reason(done)}")
        files = set()
        for item in json.loads(report.read_text()).get("install", []):
            url = item.get("download_info", {}).get("url", "")
            files.add(url.rsplit("/", 1)[-1])
        return files


async def target_for(settings: SandboxSettings) -> SandboxTarget:
    return await asyncio.to_thread(probe_target, settings)
