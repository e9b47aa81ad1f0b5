"""Build the sandbox image the docker backend runs: once per content, even without a registry.

``build_image()`` builds the ``sandbox`` target of the top-level ``Dockerfile`` and tags it twice:
``jupybox-sandbox:<hash>``, where the hash covers everything that goes into the image (the
Dockerfile and the files in ``sandbox/image/``), and ``jupybox-sandbox:latest``. A second call with
the same sources finds the hash tag and returns at once without running ``docker build``.

``build_image(target="app")`` builds the service image (``jupybox serve`` in a container, see
``compose.yaml``) the same way: ``jupybox-app:<hash>`` and ``jupybox-app:latest``, the hash covering
the Dockerfile, ``pyproject.toml``, the Python packages and ``deploy/entrypoint.sh``.

The base image is found in this order: ``python:3.11-slim-bookworm`` if present locally, a
``jupybox-base:bookworm`` made here earlier, ``docker pull`` (bounded in time), and last a Debian
root built with debootstrap and imported into Docker, for hosts without access to a registry.

The docker CLI does the work (its build output streams to ``on_log``); failures surface as
``BackendUnavailable`` (no daemon) or ``SandboxError`` (the build failed; the log's tail says why).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .config import SANDBOX_IMAGE  # "jupybox-sandbox:latest", what the docker backend runs
from .errors import BackendUnavailable, SandboxError

__all__ = ["APP_IMAGE", "SANDBOX_IMAGE", "TARGETS", "build_image"]

logger = logging.getLogger(__name__)

SANDBOX_REPOSITORY = "jupybox-sandbox"
APP_REPOSITORY = "jupybox-app"
APP_IMAGE = f"{APP_REPOSITORY}:latest"
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
DEBIAN_BASE_IMAGE = "jupybox-base:bookworm"
DEBIAN_SUITE = "bookworm"
# Plain HTTP is what Debian's own images use: apt checks signatures, and a minimal root has no CA
# certificates to verify HTTPS with.
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
BUILD_TARGET = "sandbox"
#: Dockerfile target -> the repository its image is tagged in.
TARGETS = {BUILD_TARGET: SANDBOX_REPOSITORY, "app": APP_REPOSITORY}
# What the app image installs, besides the Dockerfile (whole folders, caches left out).
APP_SOURCES = ("pyproject.toml", "deploy/entrypoint.sh")
APP_PACKAGES = ("sandbox", "interpreter", "ui", "bench")

PULL_TIMEOUT_S = 25.0
BUILD_TIMEOUT_S = 30 * 60.0
DEBOOTSTRAP_TIMEOUT_S = 15 * 60.0
IMPORT_TIMEOUT_S = 5 * 60.0
QUERY_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 30

# Environment variables through which a host tells HTTPS clients to trust an extra CA (a TLS
# inspecting proxy, a private index); the first one naming a file is handed to pip in the build.
CA_BUNDLE_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")

LogSink = Callable[[str], None]


def build_image(
    *,
    target: str = BUILD_TARGET,
    base_image: str | None = None,
    force: bool = False,
    on_log: LogSink | None = None,
) -> str:
    """Make sure the image of ``target`` for the current sources exists; return its content tag.

    ``target`` is ``"sandbox"`` (the default: what the docker backend runs) or ``"app"`` (the
    service, ``jupybox serve``). The returned ``<repository>:<hash>`` and ``<repository>:latest``
    (``SANDBOX_IMAGE`` or ``APP_IMAGE``) name the same image afterwards. ``base_image`` overrides
    the base search (it must be present or pullable). ``force`` rebuilds without Docker's layer
    cache, e.g. to pick up new releases of the lower-bounded requirements. ``on_log`` receives
    each line of build output.

    Raises ``BackendUnavailable`` when the Docker daemon cannot be reached and ``SandboxError``
    when the target is unknown, there is no Dockerfile (not a source checkout) or the build fails.
    """
    if target not in TARGETS:
        raise SandboxError(f"unknown image target {target!r}: choose one of {', '.join(TARGETS)}")
    repository = TARGETS[target]
    latest = f"{repository}:latest"
    root = _repository_root()
    sources = _image_sources(root) if target == BUILD_TARGET else _app_sources(root)
    digest = _content_hash(root, sources, base_image)
    tag = f"{repository}:{digest}"
    _check_daemon()

    built = None if force else _image_id(tag)
    if built is not None:
        if _image_id(latest) != built:
            _docker("tag", tag, latest)
        logger.info("%s image %s is up to date", target, tag)
        return tag

    base = _resolve_base(base_image, on_log)
    logger.info("building %s image %s from %s", target, tag, base)
    with tempfile.TemporaryDirectory(prefix="jupybox-build-") as context:
        # A context of exactly the hashed files keeps the hash honest and the upload small.
        for path in sources:
            copy = Path(context, path.relative_to(root))
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        ca_bundle = _extra_ca_bundle()
        if ca_bundle is not None:
            logger.info("passing %s to pip inside the build", ca_bundle)
            shutil.copyfile(ca_bundle, Path(context, "build-ca.pem"))
        # --force-rm: the legacy builder otherwise leaves the container of a failed step behind
        command = ["docker", "build", "--network", "host", "--force-rm", "--target", target]
        if force:
            command.append("--no-cache")
        command += [
            "--build-arg", f"BASE_IMAGE={base}",
            "--label", f"jupybox.image.content={digest}",
            "--tag", tag,
            "--tag", latest,
            context,
        ]
        rc, tail = _stream(command, on_log, timeout=BUILD_TIMEOUT_S)
    if rc != 0:
        raise SandboxError(
            f"building the {target} image failed (docker build exited with {rc}); "
            "last lines of its output:\n" + "\n".join(tail)
        )
    return tag


# --- sources and their hash ---------------------------------------------------------------------


def _repository_root() -> Path:
    """The source checkout holding the Dockerfile: the folder above the ``sandbox`` package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "Dockerfile").is_file():
        raise SandboxError(
            f"no Dockerfile next to the sandbox package (looked in {root}): the sandbox image is "
            "built from a source checkout of jupybox; run build_image() from one, or build it "
            "there with `docker build --target sandbox -t jupybox-sandbox:latest .`"
        )
    return root


def _image_sources(root: Path) -> list[Path]:
    """Every file that goes into the image: the Dockerfile and the folder ``sandbox/image/``."""
    files = [root / "Dockerfile"]
    for path in sorted((root / "sandbox" / "image").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return files


def _app_sources(root: Path) -> list[Path]:
    """Every file the app image is built from: the Dockerfile, ``APP_SOURCES`` and the packages.

    The packages include ``sandbox/image/``: the legacy builder builds the sandbox stages on the
    way to the app target, so they must be in its context too.
    """
    files = [root / "Dockerfile", *(root / name for name in APP_SOURCES)]
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    missing = [str(path.relative_to(root)) for path in files if not path.is_file()]
    if missing:
        raise SandboxError(f"the app image needs {', '.join(missing)}, missing from the checkout {root}")
    return files


def _content_hash(root: Path, sources: list[Path], base_image: str | None) -> str:
    """Twelve hex digits over the files' names and bytes and the requested base."""
    digest = hashlib.sha256()
    digest.update(f"base={base_image or 'default'}\0".encode())
    for path in sources:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _extra_ca_bundle() -> Path | None:
    for name in CA_BUNDLE_VARIABLES:
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


# --- the docker CLI -----------------------------------------------------------------------------


def _docker_env() -> dict[str, str]:
    # The legacy builder: it honours `--network host` without BuildKit entitlements and works
    # where buildx is not installed. A caller's own DOCKER_BUILDKIT wins.
    env = dict(os.environ)
    env.setdefault("DOCKER_BUILDKIT", "0")
    return env


def _docker(*args: str, timeout: float = QUERY_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a short docker CLI command and return it finished (the caller reads its exit code)."""
    try:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, env=_docker_env()
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


def _check_daemon() -> None:
    result = _docker("version", "--format", "{{.Server.Version}}")
    if result.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BackendUnavailable(
            f"Docker daemon not reachable at {where} ({detail[0]}): start it with "
            "`sudo systemctl start docker` (or `sudo dockerd &`), or use the bwrap backend "
            "(--backend bwrap)"
        )


def _image_id(name: str) -> str | None:
    """The local image's id, or None when there is no image of that name."""
    result = _docker("image", "inspect", "--format", "{{.Id}}", name)
    if result.returncode == 0:
        return result.stdout.strip()
    if "no such image" in result.stderr.lower():
        return None
    raise SandboxError(f"`docker image inspect {name}` failed: {result.stderr.strip()}")


def _stream(
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
            env=_docker_env(),
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


# --- base images --------------------------------------------------------------------------------


def _resolve_base(base_image: str | None, on_log: LogSink | None) -> str:
    """Name a base image that is present locally, pulling or making one if needed."""
    if base_image is not None:
        if _image_id(base_image) is not None or _pull(base_image, on_log):
            return base_image
        raise SandboxError(
            f"base image {base_image} is not present and could not be pulled: `docker load` it, "
            "or leave base_image unset to let jupybox find or make one"
        )
    # A jupybox-base present means this host could not pull before: don't wait on a pull again.
    for candidate in (DEFAULT_BASE_IMAGE, DEBIAN_BASE_IMAGE):
        if _image_id(candidate) is not None:
            return candidate
    if _pull(DEFAULT_BASE_IMAGE, on_log):
        return DEFAULT_BASE_IMAGE
    return _make_debian_base(on_log)


def _pull(name: str, on_log: LogSink | None) -> bool:
    logger.info("pulling %s (giving up after %.0f s)", name, PULL_TIMEOUT_S)
    rc, tail = _stream(["docker", "pull", name], on_log, timeout=PULL_TIMEOUT_S)
    if rc != 0:
        logger.info("could not pull %s: %s", name, tail[-1] if tail else f"exit code {rc}")
    return rc == 0


def _make_debian_base(on_log: LogSink | None) -> str:
    """Import a minimal Debian root with python3 as ``jupybox-base:bookworm``.

    Only python3: debootstrap's resolver does not handle virtual packages, so the Dockerfile
    installs the rest with apt and pip.
    """
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise SandboxError(
            f"no base image: {DEFAULT_BASE_IMAGE} is not present and could not be pulled, and "
            f"making {DEBIAN_BASE_IMAGE} needs debootstrap run as root. `docker load` "
            f"{DEFAULT_BASE_IMAGE} from a machine that has it, or install debootstrap "
            "(`apt-get install debootstrap`) and build as root"
        )
    mirror = _debian_mirror()
    logger.info("making %s with debootstrap from %s", DEBIAN_BASE_IMAGE, mirror)
    workdir = Path(tempfile.mkdtemp(prefix="jupybox-base-", dir="/var/tmp"))
    rootfs = workdir / "rootfs"
    try:
        command = ["debootstrap", "--variant=minbase", "--include=python3", DEBIAN_SUITE]
        rc, tail = _stream([*command, str(rootfs), mirror], on_log, timeout=DEBOOTSTRAP_TIMEOUT_S)
        if rc != 0:
            raise SandboxError(
                f"debootstrap {DEBIAN_SUITE} from {mirror} failed (exit code {rc}); last lines:\n"
                + "\n".join(tail)
            )
        _slim_root(rootfs)
        _import_root(rootfs, on_log)
    finally:
        _remove_root(workdir)
    return DEBIAN_BASE_IMAGE


def _slim_root(rootfs: Path) -> None:
    """Drop what a container never reads (downloaded packages, docs, manuals, translations).

    The dpkg excludes keep later ``apt-get install`` runs in the Dockerfile from bringing them
    back, as in Debian's own slim images; copyright files stay.
    """
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / folder).glob("*"):
            if path.is_file():
                path.unlink()
    share = rootfs / "usr/share"
    doomed = [path for folder in ("man", "info", "locale") for path in (share / folder).glob("*")]
    doomed += [path for path in (share / "doc").glob("*/*") if path.name != "copyright"]
    for path in doomed:  # some doc folders are symlinks to others: entries may go twice
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/jupybox-slim").write_text(
        "path-exclude /usr/share/doc/*\n"
        "path-include /usr/share/doc/*/copyright\n"
        "path-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/info/*\n"
        "path-exclude /usr/share/locale/*\n"
    )


def _import_root(rootfs: Path, on_log: LogSink | None) -> None:
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
    )
    try:
        rc, tail = _stream(
            [
                "docker", "import",
                # An imported root has no config: give it what a Debian image would have.
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", "ENV LANG=C.UTF-8",
                "--change", "LABEL jupybox.image=base",
                "--change", 'CMD ["/bin/bash"]',
                "-", DEBIAN_BASE_IMAGE,
            ],
            on_log,
            timeout=IMPORT_TIMEOUT_S,
            stdin=tar.stdout,
        )
    finally:
        assert tar.stdout is not None
        tar.stdout.close()  # a failed import leaves tar writing to nobody: let it get SIGPIPE
        tar_rc = tar.wait()
    if rc != 0 or tar_rc != 0:
        raise SandboxError(
            f"importing the debootstrap root as {DEBIAN_BASE_IMAGE} failed (docker import exit "
            f"code {rc}, tar {tar_rc}); last lines:\n" + "\n".join(tail)
        )


def _debian_mirror() -> str:
    """The host's own Debian mirror for the suite (it may be the only one reachable), else the CDN.

    Reads both apt formats: one-line ``deb [opts] URI SUITE ...`` and deb822 ``.sources`` stanzas.
    """
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*"))]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(re.findall(r"(?mi)^(types|uris|suites):[ \t]*(.*)$", stanza))
                fields = {key.lower(): value.split() for key, value in fields.items()}
                if "deb" in fields.get("types", []) and DEBIAN_SUITE in fields.get("suites", []):
                    if fields.get("uris"):
                        return fields["uris"][0].rstrip("/")
        elif path.name == "sources.list" or path.suffix == ".list":
            lines = re.findall(r"(?m)^[ \t]*deb[ \t]+(?:\[[^\]]*\][ \t]+)?(\S+)[ \t]+(\S+)", text)
            for uri, suite in lines:
                if suite == DEBIAN_SUITE:
                    return uri.rstrip("/")
    return DEFAULT_DEBIAN_MIRROR


def _remove_root(workdir: Path) -> None:
    """Delete the debootstrap folder, first detaching anything still mounted inside it.

    debootstrap mounts /proc and /sys (and may bind /dev) into the root; if it stopped halfway
    they are still there, and deleting through a bind mount would delete the host's files.
    """
    def mounted() -> list[str]:
        try:
            lines = Path("/proc/mounts").read_text().splitlines()
        except OSError:
            return []
        points = [line.split()[1].replace("\\040", " ") for line in lines if len(line.split()) > 1]
        prefix = str(workdir) + "/"
        return [p for p in points if p == str(workdir) or p.startswith(prefix)]

    for point in sorted(mounted(), reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True)
    if mounted():
        logger.warning("left %s in place: something is still mounted inside it", workdir)
        return
    shutil.rmtree(workdir, ignore_errors=True)
