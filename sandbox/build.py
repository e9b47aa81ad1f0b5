"""Build the sandbox image the docker backend runs (what goes into it is in ``sandbox/image/``):
once per content, even without a registry.

``build_image()`` builds the ``sandbox`` target of the top-level ``Dockerfile`` and tags it twice:
``jupybox-sandbox:<hash>``, where the hash covers everything that goes into the image (the
Dockerfile and the files in ``sandbox/image/``), and ``jupybox-sandbox:latest``. A second call with
the same sources finds the hash tag and returns at once without running ``docker build``.

``build_image(target="app")`` builds the service image (``jupybox serve`` in a container, see
``compose.yaml``) the same way: ``jupybox-app:<hash>`` and ``jupybox-app:latest``, the hash covering
the Dockerfile, ``pyproject.toml``, the Python packages and ``deploy/entrypoint.sh``.

The base image is found or made by ``base_image.resolve_base`` (a local image, a pull, or a Debian
root built with debootstrap, for hosts without access to a registry).

The docker CLI does the work (its build output streams to ``on_log``); failures surface as
``BackendUnavailable`` (no daemon) or ``SandboxError`` (the build failed; the log's tail says why).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .base_image import resolve_base
from .config import SANDBOX_IMAGE  # "jupybox-sandbox:latest", what the docker backend runs
from .docker_cli import LogSink, check_daemon, docker, image_id, stream
from .errors import SandboxError

__all__ = ["APP_IMAGE", "SANDBOX_IMAGE", "TARGETS", "build_image"]

logger = logging.getLogger(__name__)

SANDBOX_REPOSITORY = "jupybox-sandbox"
APP_REPOSITORY = "jupybox-app"
APP_IMAGE = f"{APP_REPOSITORY}:latest"
BUILD_TARGET = "sandbox"
#: Dockerfile target -> the repository its image is tagged in.
TARGETS = {BUILD_TARGET: SANDBOX_REPOSITORY, "app": APP_REPOSITORY}
# What the app image installs, besides the Dockerfile (whole folders, caches left out).
APP_SOURCES = ("pyproject.toml", "deploy/entrypoint.sh")
APP_PACKAGES = ("store", "sandbox", "interpreter", "ui", "bench")

BUILD_TIMEOUT_S = 30 * 60.0

# Environment variables through which a host tells HTTPS clients to trust an extra CA (a TLS
# inspecting proxy, a private index); the first one naming a file is handed to pip in the build.
CA_BUNDLE_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


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
    check_daemon()

    built = None if force else image_id(tag)
    if built is not None:
        if image_id(latest) != built:
            docker("tag", tag, latest)
        logger.info("%s image %s is up to date", target, tag)
        return tag

    base = resolve_base(base_image, on_log)
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
        rc, tail = stream(command, on_log, timeout=BUILD_TIMEOUT_S)
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
