"""A session's files: uploads in, generated files out, every path checked.

The sandboxed code can write anything into its workspace, symlinks included, so every host-side
operation walks the path one component at a time with ``O_NOFOLLOW`` relative to the workspace's
directory descriptor. A name is refused when it is empty, absolute, contains NUL or ``..``, or
crosses a symlink.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .config import Limits
from .errors import QuotaExceeded, WorkspaceError, WorkspacePathError
from .state import STATE_DIR

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_LISTED = 20_000  # entries a listing reads, so a tree the sandbox floods cannot stall the host
MAX_DEPTH = 64
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class WorkspaceFile:
    path: str  # relative to the workspace root, with forward slashes
    size: int
    modified: float


def remove_tree(path: Path) -> None:
    """Delete a folder the sandbox wrote into: never follows symlinks, and works iteratively, so
    a tree deeper than Python's recursion limit (``shutil.rmtree`` fails there) is removed too.
    Best effort: what cannot be removed is left and logged."""
    try:
        stack: list[tuple[int, str]] = [(os.open(path, DIR_FLAGS), "")]
    except OSError:
        return
    stuck: set[tuple[int, int]] = set()  # folders that could not be emptied: do not descend again
    while stack:
        fd, name = stack[-1]
        descend = None
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if (st.st_dev, st.st_ino) not in stuck:
                            descend = entry.name
                            break
                    else:
                        os.unlink(entry.name, dir_fd=fd)
                except OSError:
                    continue
        if descend is not None:
            try:
                stack.append((os.open(descend, DIR_FLAGS, dir_fd=fd), descend))
                continue
            except OSError:
                st = os.stat(descend, dir_fd=fd, follow_symlinks=False)
                stuck.add((st.st_dev, st.st_ino))
                continue
        own = os.fstat(fd)
        os.close(fd)
        stack.pop()
        try:
            if stack:
                os.rmdir(name, dir_fd=stack[-1][0])
            else:
                os.rmdir(path)
        except OSError:
            stuck.add((own.st_dev, own.st_ino))
            log.warning("could not remove everything under %s", path)


def split_name(name: str) -> list[str]:
    """Validate a workspace-relative name and return its components. Names are taken as Linux
    has them, since code in the sandbox can create any: a backslash, a colon, spaces or a newline
    are part of a name, only ``/`` separates."""
    if not isinstance(name, str) or not name:
        raise WorkspacePathError("a file name is required")
    if "\x00" in name:
        raise WorkspacePathError(f"{name!r}: file names cannot contain NUL bytes")
    if name.startswith("/"):
        raise WorkspacePathError(f"{name!r}: use a path relative to the workspace, not an absolute one")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise WorkspacePathError(f"{name!r}: '..' is not allowed in workspace paths")
    if not parts:
        raise WorkspacePathError(f"{name!r}: not a file name")
    if any(len(p.encode()) > 255 for p in parts):
        raise WorkspacePathError(f"{name!r}: a path component is longer than 255 bytes")
    return parts


COPY_CHUNK = 1 << 20


def read_bounded(fh: BinaryIO, name: str, cap: int) -> bytes:
    """At most ``cap`` bytes of an open workspace file; a file with more raises ``QuotaExceeded``.
    The sandbox owns the file and can grow it, shrink it or make it sparse at any moment, so the
    bound is on what is read, never on a size it reported."""
    data = fh.read(cap + 1)
    if len(data) > cap:
        raise QuotaExceeded(f"{name!r} is larger than {cap:,} bytes, more than the server reads of one file")
    return data


def copy_bounded(fh: BinaryIO, name: str, dest: Path, cap: int) -> int:
    """Copy an open workspace file to the host path ``dest`` (replaced), writing at most ``cap``
    bytes; a file with more raises ``QuotaExceeded`` and leaves no partial copy. Returns the bytes
    written (what the copy really costs the host's disk, whatever size the file claims)."""
    written = 0
    try:
        with open(dest, "wb") as out:
            while chunk := fh.read(min(COPY_CHUNK, cap + 1 - written)):
                written += len(chunk)
                if written > cap:
                    raise QuotaExceeded(f"{name!r} is larger than {cap:,} bytes: not copied")
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return written


def read_files(ws: Workspace, budget: int) -> dict[str, bytes]:
    """Every file of ``ws`` (a local or remote workspace) by path, at most ``budget`` bytes in all,
    each read bounded; more raises ``QuotaExceeded`` (sparse files can claim any size)."""
    files: dict[str, bytes] = {}
    for f in ws.list():
        data = ws.read(f.path, max_bytes=min(ws.limits.file_bytes, budget))
        budget -= len(data)
        files[f.path] = data
    return files


class Workspace:
    """Path-safe file operations on one folder, within the size quotas of ``limits``."""

    def __init__(self, root: Path, limits: Limits, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.limits = limits
        self.owner = owner  # (uid, gid) files should belong to, so the kernel's user can edit them
        root.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(root, *owner)

    @contextmanager
    def _parent_fd(self, parts: list[str], create: bool) -> Iterator[int]:
        fd = self._open_parent(parts, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_parent(self, parts: list[str], create: bool) -> int:
        """A descriptor of the folder holding ``parts[-1]``, reached one component at a time with
        ``O_NOFOLLOW``; the caller closes it."""
        fd = os.open(self.root, DIR_FLAGS)
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    if self.owner:
                        os.fchown(nfd, *self.owner)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise WorkspacePathError(
                            f"{'/'.join(parts[: i + 1])!r} is a symlink or not a folder; refusing to follow it"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open(self, name: str, flags: int, create_dirs: bool = False) -> int:
        parts = split_name(name)
        try:
            with self._parent_fd(parts, create_dirs) as dfd:
                # O_NONBLOCK: a FIFO the sandbox planted must not hang the host (regular files ignore it)
                fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=dfd)
        except FileNotFoundError:
            raise WorkspaceError(f"{name!r}: no such file in the workspace") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise WorkspacePathError(f"{name!r} is a symlink; refusing to follow it") from None
            if exc.errno == errno.EISDIR:
                raise WorkspaceError(f"{name!r} is a folder, not a file") from None
            raise WorkspaceError(f"{name!r}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WorkspaceError(f"{name!r} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def write(self, name: str, data: bytes | BinaryIO) -> WorkspaceFile:
        """Create or replace a file from bytes or a binary file object (read in chunks). Quotas are
        checked before and while writing; see ``writer`` for what a failure leaves."""
        size_hint = len(data) if isinstance(data, (bytes, bytearray)) else None
        with self.writer(name, size_hint) as out:
            chunks = [bytes(data)] if size_hint is not None else iter(lambda: data.read(CHUNK), b"")
            for chunk in chunks:
                out.write(chunk)
            return out.commit()

    def writer(self, name: str, size_hint: int | None = None) -> WorkspaceWriter:
        """A file written piece by piece (an upload as it arrives): the bytes go to a temporary name
        beside it and are renamed into place by ``commit``, so a refused or failed write leaves the
        previous file (if any) untouched and no partial file behind. Use it as a context manager:
        leaving it without ``commit`` removes what was written."""
        return WorkspaceWriter(self, name, size_hint)

    @staticmethod
    def _is_dir(entry: str, dfd: int) -> bool:
        try:
            return stat.S_ISDIR(os.stat(entry, dir_fd=dfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def upload(self, source: Path | str, name: str | None = None) -> WorkspaceFile:
        """Copy a host file into the workspace (under its own name unless ``name`` is given)."""
        source = Path(source)
        with source.open("rb") as fh:
            return self.write(name or source.name, fh)

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes, at most ``max_bytes`` (default: ``limits.file_bytes``); see ``read_bounded``."""
        with self.open(name) as fh:
            return read_bounded(fh, name, self.limits.file_bytes if max_bytes is None else max_bytes)

    def copy_to(self, name: str, dest: Path, max_bytes: int | None = None) -> int:
        """Copy the file to the host path ``dest``, at most ``max_bytes`` (default:
        ``limits.file_bytes``); see ``copy_bounded``. Blocking."""
        with self.open(name) as fh:
            return copy_bounded(fh, name, dest, self.limits.file_bytes if max_bytes is None else max_bytes)

    def open(self, name: str) -> BinaryIO:
        """A file object for streaming a download; the caller closes it and bounds what it reads
        (the sandbox can grow the file while it is read)."""
        return os.fdopen(self._open(name, os.O_RDONLY), "rb")

    def delete(self, name: str, missing_ok: bool = False) -> None:
        parts = split_name(name)
        try:
            with self._parent_fd(parts, create=False) as dfd:
                os.unlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            if not missing_ok:
                raise WorkspaceError(f"{name!r}: no such file in the workspace") from None
        except IsADirectoryError:
            raise WorkspaceError(f"{name!r} is a folder; only files can be deleted") from None

    def exists(self, name: str) -> bool:
        return self._size_of(name) is not None

    def list(self) -> list[WorkspaceFile]:
        """Regular files, recursively, sorted by path. The sandbox controls this tree, so the walk
        never follows a symlink (each folder is opened relative to its parent's descriptor with
        ``O_NOFOLLOW``), is iterative (no recursion limit), and stops after ``MAX_LISTED`` entries
        or ``MAX_DEPTH`` levels."""
        files: list[WorkspaceFile] = []
        seen = 0
        stack: list[tuple[int, str, int]] = [(os.open(self.root, DIR_FLAGS), "", 0)]
        try:
            while stack and seen < MAX_LISTED:
                fd, prefix, depth = stack.pop()
                try:
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            seen += 1
                            if seen > MAX_LISTED:
                                break
                            if depth == 0 and entry.name == STATE_DIR:  # a paused session's variables
                                continue
                            try:
                                st = entry.stat(follow_symlinks=False)
                                if stat.S_ISREG(st.st_mode):
                                    files.append(WorkspaceFile(prefix + entry.name, st.st_size, st.st_mtime))
                                elif stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                                    sub = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
                                    stack.append((sub, f"{prefix}{entry.name}/", depth + 1))
                            except OSError:  # removed or swapped for a symlink meanwhile
                                continue
                finally:
                    os.close(fd)
        finally:
            for fd, _, _ in stack:
                os.close(fd)
        if seen > MAX_LISTED:
            log.warning("workspace %s has more than %d entries; listed the first ones", self.root, MAX_LISTED)
        return sorted(files, key=lambda f: f.path)

    def usage(self) -> int:
        return sum(f.size for f in self.list())

    def _size_of(self, name: str) -> int | None:
        try:
            fd = self._open(name, os.O_RDONLY)
        except WorkspacePathError:
            raise
        except WorkspaceError:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _check_quota(self, name: str, size: int, others: int) -> None:
        if size > self.limits.file_bytes:
            raise QuotaExceeded(
                f"{name!r} is {size:,} bytes; a workspace file may be at most {self.limits.file_bytes:,} bytes"
            )
        if others + size > self.limits.workspace_bytes:
            raise QuotaExceeded(
                f"writing {name!r} would bring the workspace to {others + size:,} bytes; "
                f"the quota is {self.limits.workspace_bytes:,} bytes: delete files first"
            )


class WorkspaceWriter:
    """See ``Workspace.writer``."""

    def __init__(self, workspace: Workspace, name: str, size_hint: int | None = None) -> None:
        self.workspace, self.name = workspace, name
        self._parts = split_name(name)
        self._others = workspace.usage() - (workspace._size_of(name) or 0)  # what the rest holds
        if size_hint is not None:
            workspace._check_quota(name, size_hint, self._others)
        self.written = 0
        self._temp = f".{self._parts[-1][:200]}.{secrets.token_hex(4)}.partial"
        self._dfd = workspace._open_parent(self._parts, create=True)
        self._fd = -1
        try:
            self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o644, dir_fd=self._dfd)
            if workspace.owner:
                os.fchown(self._fd, *workspace.owner)
        except BaseException:
            self.abort()
            raise

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        self.workspace._check_quota(self.name, self.written, self._others)
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise QuotaExceeded(f"no room for {self.name!r}: the workspace's disk is full; "
                                    "delete files first") from None

    def commit(self) -> WorkspaceFile:
        """Put the file in place (replacing a symlink there, never following it)."""
        mtime = os.fstat(self._fd).st_mtime
        os.close(self._fd)
        self._fd = -1
        if Workspace._is_dir(self._parts[-1], self._dfd):
            raise WorkspaceError(f"{self.name!r} is a folder, not a file")
        os.rename(self._temp, self._parts[-1], src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        self._temp = ""
        self._close_dir()
        return WorkspaceFile("/".join(self._parts), self.written, mtime)

    def abort(self) -> None:
        """Remove what was written; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._temp and self._dfd >= 0:
            try:
                os.unlink(self._temp, dir_fd=self._dfd)
            except FileNotFoundError:
                pass
        self._temp = ""
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    def __enter__(self) -> WorkspaceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
