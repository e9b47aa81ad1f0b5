"""The server's sessions as records: a table beside the users, in ``JUPYBOX_HOME/jupybox.db``.

A session is a process (a kernel in a container) *and* a record: its id, its owner, its limits, when
it was made and last used, whether it runs or is paused, what its last pause saved, and its
conversation (messages and cells, as the conversation service writes them after each turn). The
processes come and go with the server; the records stay, so a server that starts again re-adopts
the kernels still running and resumes the paused ones under the same ids.

The same file and the same rules as ``UserStore`` (WAL, one short connection per call, ``BEGIN
IMMEDIATE`` for writes), so a ``jupybox sessions`` command may read it while the server writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import StoreUnavailable
from .home import default_home
from .users import STORE_FILE, UserStore, check_schema, connect, translated

RUNNING = "running"
PAUSED = "paused"

TABLE = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    owner TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    paused REAL,
    limits TEXT NOT NULL,
    isolation TEXT,
    title TEXT NOT NULL DEFAULT '',
    note TEXT,
    disk_bytes INTEGER NOT NULL DEFAULT 0,
    chat TEXT,
    conversation TEXT
)
"""
JSON_COLUMNS = ("limits", "conversation")
# columns added since the table was first made, with their definitions: a store made by an earlier
# version gets them when it is opened (SQLite adds a nullable or defaulted column in place)
ADDED_COLUMNS = {"chat": "TEXT"}


@dataclass
class SessionRecord:
    """One session as the store keeps it; times are seconds since the epoch. ``limits`` is the
    session's ``Limits`` as a dict, ``conversation`` the conversation's JSON (``None`` until one was
    written), ``note`` what the last pause saved or why it saved nothing, in words."""

    id: str
    instance: str  # the server (its ``--instance`` name) the session belongs to
    owner: str | None = None  # the user's name, where users exist
    state: str = RUNNING  # running | paused
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    paused: float | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    isolation: str | None = None
    title: str = ""  # the conversation's first question, for lists of earlier work
    note: str | None = None
    disk_bytes: int = 0  # what the session's folder took on disk when last measured
    chat: str | None = None  # the front end's name for its conversation (e.g. an OpenAI client's user)
    conversation: dict[str, Any] | None = None

    def row(self) -> tuple:
        return tuple(json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS and v is not None else v
                     for k, v in ((f.name, getattr(self, f.name)) for f in fields(self)))

    @classmethod
    def from_row(cls, names: list[str], row: tuple) -> SessionRecord:
        values = {k: (json.loads(v) if k in JSON_COLUMNS and v is not None else v) for k, v in zip(names, row)}
        return cls(**values)


COLUMNS = [f.name for f in fields(SessionRecord)]
SUMMARY = [c for c in COLUMNS if c != "conversation"]


class SessionRecords:
    """The ``sessions`` table of one store file; safe to share between threads."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._ready = False

    @classmethod
    def at_home(cls, home: Path | None = None, **kw: float) -> SessionRecords:
        return cls((home or default_home()) / STORE_FILE, **kw)

    @contextmanager
    def _open(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            # the file is made as the user store makes it (so `jupybox users` finds it theirs)
            with UserStore(self.path, self.busy_timeout_s)._open(create=True):
                pass
        with translated(self.path):
            conn = connect(self.path, self.busy_timeout_s)
            try:
                check_schema(conn, self.path)
                if not self._ready:
                    conn.execute(TABLE)
                    have = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
                    for name, kind in ADDED_COLUMNS.items():
                        if name not in have:
                            conn.execute(f"ALTER TABLE sessions ADD COLUMN {name} {kind}")
                    self._ready = True
                yield conn
            finally:
                conn.close()

    def put(self, record: SessionRecord) -> None:
        """Insert or replace the whole record."""
        marks = ", ".join("?" * len(COLUMNS))
        with self._open() as conn, translated(self.path):
            conn.execute(f"INSERT OR REPLACE INTO sessions ({', '.join(COLUMNS)}) VALUES ({marks})", record.row())

    def update(self, session_id: str, **values: Any) -> None:
        """Change some fields of a record; a record that is gone stays gone."""
        unknown = set(values) - set(COLUMNS) - {"id"}
        if unknown or "id" in values:
            raise ValueError(f"not a session record field: {sorted(unknown) or ['id']}")
        if not values:
            return
        names = list(values)
        args = [json.dumps(values[k], ensure_ascii=False) if k in JSON_COLUMNS and values[k] is not None
                else values[k] for k in names]
        with self._open() as conn, translated(self.path):
            conn.execute(f"UPDATE sessions SET {', '.join(f'{k} = ?' for k in names)} WHERE id = ?",
                         (*args, session_id))

    def get(self, session_id: str) -> SessionRecord | None:
        with self._open() as conn, translated(self.path):
            row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return SessionRecord.from_row(COLUMNS, row) if row else None

    def list(self, instance: str | None = None, owner: str | None = None, chat: str | None = None,
             with_conversation: bool = False) -> list[SessionRecord]:
        """Records newest use first, of one server, one owner and one front end's conversation name
        where given; the conversations (the large part) only when asked for."""
        if not self.path.exists():
            return []
        names = COLUMNS if with_conversation else SUMMARY
        where, args = [], []
        for column, value in (("instance", instance), ("owner", owner), ("chat", chat)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(names)} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._open() as conn, translated(self.path):
            rows = conn.execute(sql + " ORDER BY last_used DESC", args).fetchall()
        return [SessionRecord.from_row(names, r) for r in rows]

    def delete(self, session_id: str) -> None:
        with self._open() as conn, translated(self.path):
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def available(self) -> str | None:
        """Why the records cannot be kept here (in words), or None when they can."""
        try:
            with self._open():
                return None
        except StoreUnavailable as exc:
            return str(exc)
