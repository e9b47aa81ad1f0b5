"""The audit log: one JSON object per line in ``JUPYBOX_HOME/audit.jsonl`` (or a path of the
operator's choosing), appended by the server and by the ``jupybox users`` commands alike.

Each line is written whole by one ``write`` on a descriptor opened with ``O_APPEND``, so lines of
concurrent writers never interleave and a crash leaves no half line behind a complete one. Past
``max_bytes`` the file is renamed ``audit.jsonl.1`` (older ones shift up to ``backups``) and a new
one begun; a writer that still holds the old file finishes its line there, where readers find it.

No key reaches a line: every string is scrubbed of key-shaped text (``store.keys.KEY_PATTERN``) and
of the secrets the log is given (the server's admin token).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import StoreUnavailable
from .home import default_home
from .keys import redact_keys

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
MAX_BYTES = 64 << 20
BACKUPS = 5
FIELD_CHARS = 2000  # a longer string in a line is cut here (a line stays one small write)


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened: who (``user``, from ``client``), did what (``action``, e.g.
    ``key.accepted``, ``user.added``), to what (``target``: a session, kernel or user name), with
    which ``result`` (``ok``, ``refused``...), and why (``reason``) where there is one."""

    action: str
    user: str | None = None
    client: str | None = None
    target: str | None = None
    result: str = "ok"
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = {"time": datetime.fromtimestamp(self.time, timezone.utc).isoformat(timespec="milliseconds")}
        d |= {k: v for k, v in asdict(self).items() if k != "time" and v not in (None, {})}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEvent:
        when = datetime.fromisoformat(str(d["time"]).replace("Z", "+00:00")).timestamp()
        return cls(action=str(d["action"]), user=d.get("user"), client=d.get("client"), target=d.get("target"),
                   result=str(d.get("result", "ok")), reason=d.get("reason"), detail=dict(d.get("detail") or {}),
                   time=when)


def scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` with keys and the given secrets hidden in every string, long strings cut."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[redacted]")
        value = redact_keys(value)
        return value if len(value) <= FIELD_CHARS else value[:FIELD_CHARS] + "..."
    if isinstance(value, dict):
        return {scrub(str(k), secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def audit_path(explicit: str | Path | None = None, home: Path | None = None) -> Path:
    """Where the audit log goes: ``explicit`` (``--audit-log``), else ``JUPYBOX_AUDIT_LOG``, else
    ``audit.jsonl`` in ``home`` (default ``JUPYBOX_HOME``)."""
    chosen = explicit or os.environ.get("JUPYBOX_AUDIT_LOG")
    return Path(chosen) if chosen else (home or default_home()) / AUDIT_FILE


class AuditLog:
    """Appends ``AuditEvent`` lines to ``path``; safe to share between threads and processes."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 secrets: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.secrets = tuple(s for s in secrets if s)

    @classmethod
    def at_home(cls, home: Path | None = None, **kw: Any) -> AuditLog:
        return cls((home or default_home()) / AUDIT_FILE, **kw)

    def record(self, event: AuditEvent) -> None:
        """Append one line. ``StoreUnavailable`` when the file cannot be written."""
        line = (json.dumps(scrub(event.to_dict(), self.secrets), ensure_ascii=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = self._open_for(len(line))
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreUnavailable(f"the audit log {self.path} cannot be written ({exc.strerror}): check the "
                                   "folder's permissions and free space, or pass --audit-log PATH") from None
        if written != len(line):
            raise StoreUnavailable(f"the audit log {self.path} took {written} of {len(line)} bytes (disk full?)")

    def _open_for(self, size: int) -> int:
        """A descriptor to append ``size`` bytes to, rotating first when the file would pass its limit.
        Rotations take a lock file of their own and look at the size again under it, so that writers
        in several processes rotate a full file once, and none of them finds the log missing between
        a rotation's rename and the next line's ``O_CREAT``."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        held = os.fstat(fd).st_size
        if held == 0 or held + size <= self.max_bytes:
            return fd
        os.close(fd)
        lock = os.open(self.path.with_name(f"{self.path.name}.lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                full = os.stat(self.path).st_size + size > self.max_bytes
            except FileNotFoundError:  # rotated a moment ago; the open below starts the new file
                full = False
            if full:
                for n in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if older.exists():
                        older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
                self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        finally:
            os.close(lock)  # closing the descriptor lets the lock go
        return os.open(self.path, flags, 0o600)

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        older = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.backups, 0, -1)]
        return [p for p in (*older, self.path) if p.exists()]

    def read(self, since: float | None = None, user: str | None = None) -> Iterator[AuditEvent]:
        """The events, oldest first; ``user`` keeps those the user did or that were done to them.
        A line that does not parse (written by something else) is skipped and logged."""
        for path in self.files():
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    lines = list(fh)
            except OSError as exc:
                raise StoreUnavailable(f"the audit log {path} cannot be read ({exc.strerror})") from None
            for number, line in enumerate(lines, 1):
                try:
                    event = AuditEvent.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s line %d is not an audit event; skipped", path, number)
                    continue
                if since is not None and event.time < since:
                    continue
                if user is not None and user not in (event.user, event.target):
                    continue
                yield event
