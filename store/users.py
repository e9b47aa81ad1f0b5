"""The users of one server and their keys: a SQLite file, ``JUPYBOX_HOME/jupybox.db``.

SQLite because it is one file, needs no server and lets several processes write it safely: the
``jupybox users`` commands change it while ``jupybox serve`` reads it. The file is in WAL mode
(readers never wait for a writer), every change is one ``BEGIN IMMEDIATE`` transaction, and a
writer that finds the file busy waits up to ``busy_timeout_s`` before ``StoreLocked``; so two
commands and the server writing at once lose nothing.

Only the SHA-256 of each key is stored (``store.keys``). A user is never deleted: ``revoke`` marks
it, so the server knows that users exist (and keys are required) for as long as the file does.

``KeyIndex`` is the server's side: key digest -> user, kept in memory and reloaded when
``PRAGMA data_version`` says another connection committed, so a change made with the CLI is seen
on the next request without a restart.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidLimit, InvalidUserName, StoreCorrupt, StoreLocked, StoreUnavailable, UserExists, UserNotFound
from .home import default_home
from .keys import key_digest, new_key, same_digest

log = logging.getLogger(__name__)

STORE_FILE = "jupybox.db"
APPLICATION_ID = 0x6A627862  # "jbxb": tells our file from any other SQLite database
SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    admin INTEGER NOT NULL DEFAULT 0,
    max_sessions INTEGER,
    memory_mb INTEGER,
    key_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    last_used REAL,
    revoked REAL
)
"""
COLUMNS = "name, admin, max_sessions, memory_mb, created, last_used, revoked"


@dataclass(frozen=True)
class User:
    """One user as the store holds it; times are seconds since the epoch, ``revoked`` the time
    of revocation (``None`` while the user is active). The key is never part of it."""

    name: str
    admin: bool = False
    max_sessions: int | None = None  # None: the server's own limit
    memory_mb: int | None = None  # total memory of this user's sessions; None: the server's budget
    created: float = 0.0
    last_used: float | None = None
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    @classmethod
    def from_row(cls, row: tuple) -> User:
        name, admin, max_sessions, memory_mb, created, last_used, revoked = row
        return cls(name, bool(admin), max_sessions, memory_mb, created, last_used, revoked)


def check_name(name: str) -> str:
    """``name`` if the store accepts it, else ``InvalidUserName`` saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidUserName(f"invalid user name {shown!r}: use 1 to 64 lower-case letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit (e.g. alice or data-team.bob)")
    return name


def check_limit(what: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise InvalidLimit(f"{what} must be 1 or more, not {value}: leave it out for the server's own limit")
    return value


@contextmanager
def translated(path: Path) -> Iterator[None]:
    """SQLite's exceptions as the store's own, each saying what to do."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise StoreLocked(f"the user store {path} is locked by another process (a running `jupybox users` "
                              "command, a backup?): try again in a moment") from None
        if "no such table" in text or "no such column" in text:
            raise StoreCorrupt(f"{path} is not a jupybox user store: move it away and add the users again, "
                               "or set JUPYBOX_HOME to the right folder") from None
        raise StoreUnavailable(f"the user store {path} cannot be used ({text}): check that the folder exists "
                               "and this user may read and write it") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise StoreCorrupt(f"the user store {path} is damaged or not a jupybox store ({exc}): restore it from a "
                           "backup, or move it away and add the users again") from None
    except OSError as exc:
        raise StoreUnavailable(f"the user store {path} cannot be used ({exc.strerror}): check the folder's "
                               "permissions and free space") from None


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to an existing store file (never creates one), in autocommit mode: each
    change is an explicit transaction."""
    uri = path.resolve().as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    return conn


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a SQLite file that is not ours (``StoreCorrupt``)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreCorrupt(f"{path} is a SQLite file but not a jupybox user store: move it away and add the "
                           "users again, or set JUPYBOX_HOME to the right folder")


class UserStore:
    """Users and key digests in one SQLite file; every method opens its own short connection, so
    a store object may be shared by threads and used from several processes at once."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    def at_home(cls, home: Path | None = None, **kw: float) -> UserStore:
        """The store of ``home`` (default: ``JUPYBOX_HOME``, else ``~/.cache/jupybox``)."""
        return cls((home or default_home()) / STORE_FILE, **kw)

    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def _open(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        with translated(self.path):
            if create and not self.path.exists():
                self._create()
            if not self.path.exists():
                raise StoreUnavailable(f"there is no user store at {self.path} yet: add a user with "
                                       "`jupybox users add NAME` (or set JUPYBOX_HOME to the server's folder)")
            conn = connect(self.path, self.busy_timeout_s)
            try:
                check_schema(conn, self.path)
                yield conn
            finally:
                conn.close()

    def _create(self) -> None:
        """A new, empty store, readable by this user only. Two processes may race here: the file
        is made with O_CREAT (no O_EXCL) and the schema inside one transaction that checks first."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = connect(self.path, self.busy_timeout_s)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("PRAGMA application_id").fetchone()[0] == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    conn.execute("ROLLBACK")
                    return  # someone else's database: check_schema says so
                conn.execute(SCHEMA)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()

    def add(self, name: str, admin: bool = False, max_sessions: int | None = None,
            memory_mb: int | None = None) -> tuple[User, str]:
        """A new user and its key; the key is returned here once and never stored."""
        check_name(name)
        check_limit("--max-sessions", max_sessions)
        check_limit("--memory-mb", memory_mb)
        key = new_key()
        user = User(name, admin, max_sessions, memory_mb, created=time.time())
        with self._open(create=True) as conn, translated(self.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"INSERT INTO users ({COLUMNS}, key_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (name, int(admin), max_sessions, memory_mb, user.created, None, None, key_digest(key)))
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                raise UserExists(f"there is already a user {name!r}: give them a new key with "
                                 f"`jupybox users key {name}`, or pick another name") from None
            conn.execute("COMMIT")
        return user, key

    def revoke(self, name: str) -> User:
        """Mark the user revoked: their key is refused from the server's next request on."""
        with self._open() as conn, translated(self.path):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE users SET revoked = coalesce(revoked, ?) WHERE name = ?", (time.time(), name))
            user = self._get(conn, name)
            conn.execute("COMMIT")
        return user

    def replace_key(self, name: str) -> tuple[User, str]:
        """A new key for the user (the old one stops working); a revoked user is reinstated."""
        key = new_key()
        with self._open() as conn, translated(self.path):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE users SET key_sha256 = ?, revoked = NULL WHERE name = ?", (key_digest(key), name))
            user = self._get(conn, name)
            conn.execute("COMMIT")
        return user, key

    def get(self, name: str) -> User:
        with self._open() as conn, translated(self.path):
            return self._get(conn, name)

    def _get(self, conn: sqlite3.Connection, name: str) -> User:
        row = conn.execute(f"SELECT {COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise UserNotFound(f"there is no user {name!r}: see `jupybox users list`")
        return User.from_row(row)

    def list(self) -> list[User]:
        """Every user, revoked ones included, by name; no store yet is no users."""
        if not self.exists():
            return []
        with self._open() as conn, translated(self.path):
            return [User.from_row(r) for r in conn.execute(f"SELECT {COLUMNS} FROM users ORDER BY name")]

    def touch(self, name: str, when: float | None = None) -> None:
        """Record that the user's key was just used (``last_used``)."""
        with self._open() as conn, translated(self.path):
            conn.execute("UPDATE users SET last_used = ? WHERE name = ?", (when or time.time(), name))


class KeyIndex:
    """What the server asks on each request: are there users, and whose key is this? Held in
    memory and reloaded only when the file changed: a ``stat`` and ``PRAGMA data_version`` (which
    a WAL reader answers without waiting for writers) per request, microseconds.

    Once this server has seen users, a store that disappears or cannot be read raises
    ``StoreUnavailable``: the caller refuses every key but the admin token, never falls back to
    the open mode of a server without users."""

    def __init__(self, store: UserStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None
        self._version: int | None = None
        self._users: dict[str, tuple[str, User]] = {}  # digest -> (digest, user)
        self._seen_users = False

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._file, self._version, self._users = None, None, None, {}

    def refresh(self) -> None:
        """Reload if another process changed the store; ``StoreUnavailable`` if it cannot be read."""
        path = self.store.path
        with self._lock:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._reset()
                if self._seen_users:
                    raise StoreUnavailable(f"the user store {path} was removed while the server runs: restore "
                                           "it (keys stay refused until then), or restart the server") from None
                return
            except OSError as exc:
                self._reset()
                raise StoreUnavailable(f"the user store {path} cannot be read ({exc.strerror})") from None
            try:
                with translated(path):
                    if self._conn is None or self._file != (st.st_dev, st.st_ino):
                        self._reset()
                        self._conn = connect(path, busy_timeout_s=0.5)
                        self._file = (st.st_dev, st.st_ino)
                    version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != self._version:
                        check_schema(self._conn, path)
                        rows = self._conn.execute(f"SELECT {COLUMNS}, key_sha256 FROM users").fetchall()
                        self._users = {r[-1]: (r[-1], User.from_row(r[:-1])) for r in rows}
                        self._version = version
                        self._seen_users = self._seen_users or bool(rows)
            except StoreUnavailable:
                self._reset()
                raise

    def has_users(self) -> bool:
        """Whether keys are required (any user, revoked ones included); refreshes first."""
        self.refresh()
        return bool(self._users)

    def lookup(self, key: str) -> User | None:
        """The user whose current key this is (revoked or not: the caller says why it refuses),
        or ``None``. The dictionary is keyed by the digest, which tells nothing about the key;
        the final comparison is constant-time."""
        self.refresh()
        digest = key_digest(key)
        entry = self._users.get(digest)
        if entry is None or not same_digest(entry[0], digest):
            return None
        return entry[1]

    def close(self) -> None:
        with self._lock:
            self._reset()
