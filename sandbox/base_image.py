"""The base image the sandbox and app images build on, found or made without a registry:
``python:3.11-slim-bookworm`` if present locally, a ``jupybox-base:bookworm`` made here earlier,
``docker pull`` (bounded in time), and last a minimal Debian root built with debootstrap and
imported into Docker."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .docker_cli import LogSink, image_id, stream
from .errors import SandboxError

logger = logging.getLogger(__name__)

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
DEBIAN_BASE_IMAGE = "jupybox-base:bookworm"
DEBIAN_SUITE = "bookworm"
# Plain HTTP is what Debian's own images use: apt checks signatures, and a minimal root has no CA
# certificates to verify HTTPS with.
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"

PULL_TIMEOUT_S = 25.0
DEBOOTSTRAP_TIMEOUT_S = 15 * 60.0
IMPORT_TIMEOUT_S = 5 * 60.0


def resolve_base(base_image: str | None, on_log: LogSink | None) -> str:
    """Name a base image that is present locally, pulling or making one if needed."""
    if base_image is not None:
        if image_id(base_image) is not None or _pull(base_image, on_log):
            return base_image
        raise SandboxError(
            f"base image {base_image} is not present and could not be pulled: `docker load` it, "
            "or leave base_image unset to let jupybox find or make one"
        )
    # A jupybox-base present means this host could not pull before: don't wait on a pull again.
    for candidate in (DEFAULT_BASE_IMAGE, DEBIAN_BASE_IMAGE):
        if image_id(candidate) is not None:
            return candidate
    if _pull(DEFAULT_BASE_IMAGE, on_log):
        return DEFAULT_BASE_IMAGE
    return _make_debian_base(on_log)


def _pull(name: str, on_log: LogSink | None) -> bool:
    logger.info("pulling %s (giving up after %.0f s)", name, PULL_TIMEOUT_S)
    rc, tail = stream(["docker", "pull", name], on_log, timeout=PULL_TIMEOUT_S)
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
        rc, tail = stream([*command, str(rootfs), mirror], on_log, timeout=DEBOOTSTRAP_TIMEOUT_S)
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
        rc, tail = stream(
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
