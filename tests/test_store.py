"""The user store and the audit log as an admin and a server use them: the real `jupybox users`
and `jupybox audit` commands in subprocesses, the SQLite file on disk, several processes writing
at once, and the files an operator may break (missing, locked, corrupt, someone else's)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from store import (
    AuditEvent,
    AuditLog,
    InvalidUserName,
    KeyIndex,
    StoreCorrupt,
    StoreLocked,
    StoreUnavailable,
    UserExists,
    UserStore,
)

JUPYBOX = str(Path(sys.executable).parent / "jupybox")


def jupybox(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYBOX_HOME": str(home)}
    env.pop("JUPYBOX_AUDIT_LOG", None)
    return subprocess.run([JUPYBOX, *args], capture_output=True, text=True, env=env, timeout=120)


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


def files_holding(home: Path, secret: str) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# -- the commands -----------------------------------------------------------------------------------
def test_an_admin_adds_lists_rekeys_and_revokes_users(tmp_path: Path) -> None:
    added = jupybox(tmp_path, "users", "add", "alice", "--admin", "--max-sessions", "3", "--memory-mb", "2048")
    assert added.returncode == 0, added.stderr
    key = added.stdout.splitlines()[-1]
    assert added.stdout == key + "\n" and key.startswith("jbx_") and len(key) >= 40
    assert "shown this once" in added.stderr

    again = jupybox(tmp_path, "users", "add", "alice")
    assert again.returncode == 2 and "already a user 'alice'" in again.stderr and again.stdout == ""

    rekeyed = jupybox(tmp_path, "users", "key", "alice")
    assert rekeyed.returncode == 0, rekeyed.stderr
    new_key = rekeyed.stdout.strip()
    assert new_key.startswith("jbx_") and new_key != key

    index = KeyIndex(UserStore.at_home(tmp_path))
    assert index.lookup(key) is None, "the replaced key must stop working"
    user = index.lookup(new_key)
    assert user is not None and (user.name, user.admin, user.max_sessions, user.memory_mb) == ("alice", True, 3, 2048)

    assert jupybox(tmp_path, "users", "revoke", "alice").returncode == 0
    revoked = index.lookup(new_key)
    assert revoked is not None and not revoked.active

    listed = jupybox(tmp_path, "users", "list")
    assert listed.returncode == 0
    assert "alice" in listed.stdout and "admin" in listed.stdout and "revoked" in listed.stdout
    as_json = [json.loads(line) for line in jupybox(tmp_path, "users", "list", "--json").stdout.splitlines()]
    assert [(u["name"], u["admin"], u["max_sessions"]) for u in as_json] == [("alice", True, 3)]

    audit = jupybox(tmp_path, "audit", "--user", "alice", "--since", "1h")
    assert audit.returncode == 0, audit.stderr
    actions = [line.split()[4] for line in audit.stdout.splitlines()]
    assert actions == ["user.added", "user.key_replaced", "user.revoked"], audit.stdout

    for secret in (key, new_key):
        assert files_holding(tmp_path, secret) == [], "a plain key is on disk"
        assert secret not in listed.stdout + audit.stdout
    mode = (tmp_path / "jupybox.db").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


@pytest.mark.parametrize("name", ["Alice", "al ice", "../x", "a;drop", "", "-x", "x" * 65, "ålice", "a\x00b"])
def test_a_name_with_odd_characters_is_refused_with_what_is_allowed(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidUserName, match="lower-case letters, digits"):
        UserStore.at_home(tmp_path).add(name)
    if "\x00" not in name:  # a NUL cannot be passed on a command line at all
        proc = jupybox(tmp_path, "users", "add", "--", name)
        assert proc.returncode == 2 and "invalid user name" in proc.stderr and proc.stdout == ""
        assert_no_traceback(proc.stderr)
    assert UserStore.at_home(tmp_path).list() == []


def test_quotas_below_one_are_refused(tmp_path: Path) -> None:
    proc = jupybox(tmp_path, "users", "add", "bob", "--max-sessions", "0")
    assert proc.returncode == 2 and "--max-sessions must be 1 or more" in proc.stderr


# -- several writers at once ------------------------------------------------------------------------
ADDER = """
import sys
from store import UserStore
store = UserStore.at_home()
for i in range(int(sys.argv[2])):
    store.add(f"{sys.argv[1]}-{i}")
"""


def test_two_cli_processes_and_the_server_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    store.add("server-user")
    stop = threading.Event()
    touches = 0

    def server_writer() -> None:  # what the server does while the CLI works: record last use
        nonlocal touches
        while not stop.is_set():
            store.touch("server-user")
            touches += 1

    writer = threading.Thread(target=server_writer)
    writer.start()
    env = {**os.environ, "JUPYBOX_HOME": str(tmp_path)}
    try:
        adders = [subprocess.Popen([sys.executable, "-c", ADDER, prefix, "40"], env=env, stderr=subprocess.PIPE,
                                   text=True) for prefix in ("a", "b")]
        clis = [subprocess.Popen([JUPYBOX, "users", "add", f"cli-{n}"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in range(2)]
        for proc in adders + clis:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    finally:
        stop.set()
        writer.join()
    names = {u.name for u in store.list()}
    expected = {"server-user", "cli-0", "cli-1"} | {f"{p}-{i}" for p in "ab" for i in range(40)}
    assert names == expected
    assert touches > 0 and store.get("server-user").last_used is not None


# -- broken files -----------------------------------------------------------------------------------
def test_a_missing_store_means_no_users_until_one_is_added(tmp_path: Path) -> None:
    home = tmp_path / "not-yet"
    proc = jupybox(home, "users", "list")
    assert proc.returncode == 0 and "no users yet" in proc.stderr
    proc = jupybox(home, "users", "revoke", "alice")
    assert proc.returncode == 2 and "no user store" in proc.stderr and "jupybox users add" in proc.stderr
    assert_no_traceback(proc.stderr)
    assert not (home / "jupybox.db").exists()
    index = KeyIndex(UserStore.at_home(home))
    assert not index.has_users() and index.lookup("jbx_" + "a" * 43) is None


def test_a_store_removed_under_a_running_server_refuses_every_key(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    _, key = store.add("alice")
    index = KeyIndex(store)
    assert index.lookup(key) is not None
    for name in ("jupybox.db", "jupybox.db-wal", "jupybox.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(StoreUnavailable, match="was removed while the server runs"):
        index.lookup(key)
    with pytest.raises(StoreUnavailable):
        index.has_users()


@pytest.mark.parametrize("content", [b"not a database at all\n" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_corrupt_store_is_an_actionable_error_never_a_trace(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "jupybox.db").write_bytes(content)
    for args in (("users", "list"), ("users", "add", "bob"), ("users", "revoke", "bob")):
        proc = jupybox(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "damaged or not a jupybox store" in proc.stderr and "move it away" in proc.stderr
        assert_no_traceback(proc.stderr)
    with pytest.raises(StoreCorrupt):
        KeyIndex(UserStore.at_home(tmp_path)).lookup("jbx_" + "a" * 43)


def test_someone_elses_sqlite_file_is_not_taken_for_a_store(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "jupybox.db")
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    proc = jupybox(tmp_path, "users", "add", "bob")
    assert proc.returncode == 2 and "not a jupybox user store" in proc.stderr
    with pytest.raises(StoreCorrupt):
        KeyIndex(UserStore.at_home(tmp_path)).has_users()
    assert sqlite3.connect(tmp_path / "jupybox.db").execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


def test_a_locked_store_waits_then_says_who_to_blame(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    _, key = store.add("alice")
    holder = sqlite3.connect(tmp_path / "jupybox.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreLocked, match="locked by another process"):
            UserStore.at_home(tmp_path, busy_timeout_s=0.2).add("bob")
        assert KeyIndex(store).lookup(key) is not None  # readers never wait for a writer (WAL)
        # a writer with the default timeout waits for the lock to go, then succeeds
        release = threading.Timer(0.5, holder.execute, ("COMMIT",))
        release.start()
        started = time.monotonic()
        store.add("carol")
        assert time.monotonic() - started >= 0.3
        release.join()
    finally:
        if holder.in_transaction:
            holder.execute("COMMIT")
        holder.close()
    assert [u.name for u in store.list()] == ["alice", "carol"]


def test_the_server_sees_a_command_line_change_on_its_next_lookup(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    _, key = store.add("alice")
    index = KeyIndex(store)
    assert index.lookup(key).active
    assert jupybox(tmp_path, "users", "revoke", "alice").returncode == 0
    assert not index.lookup(key).active
    new_key = jupybox(tmp_path, "users", "key", "alice").stdout.strip()
    assert index.lookup(key) is None and index.lookup(new_key).active


# -- the audit log ----------------------------------------------------------------------------------
WRITER = """
import sys
from pathlib import Path
from store import AuditEvent, AuditLog
log = AuditLog(Path(sys.argv[1]), max_bytes=int(sys.argv[3]))
for i in range(int(sys.argv[2])):
    log.record(AuditEvent("test.line", user=sys.argv[4], target=str(i), detail={"pad": "x" * 300}))
"""


def test_audit_lines_from_concurrent_writers_stay_whole_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "300", str(64 << 10), f"w{n}"])
               for n in range(3)]
    for proc in writers:
        assert proc.wait(timeout=120) == 0
    log = AuditLog(path, max_bytes=64 << 10)
    assert len(log.files()) == 6, log.files()  # the current file and five rotated ones
    assert all(p.stat().st_size <= (64 << 10) + 1024 for p in log.files())
    lines = [line for p in log.files() for line in p.read_text().splitlines()]
    events = [json.loads(line) for line in lines]  # every line parses: none was torn or interleaved
    assert {e["action"] for e in events} == {"test.line"}
    # 900 lines of about 400 bytes, 6 files of 64 KiB kept: the newest lines survive, in order per writer
    for w in ("w0", "w1", "w2"):
        targets = [int(e["target"]) for e in events if e["user"] == w]
        assert targets == sorted(targets) and targets[-1] == 299


def test_no_key_or_admin_token_reaches_an_audit_line(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    _, key = store.add("alice")
    log = AuditLog(tmp_path / "audit.jsonl", secrets=["admin-token-123"])
    log.record(AuditEvent("key.refused", client="127.0.0.1", reason=f"sent {key} and admin-token-123",
                          detail={key: [key, "admin-token-123"]}))
    text = (tmp_path / "audit.jsonl").read_text()
    assert key not in text and "admin-token-123" not in text and "jbx_[redacted]" in text
    assert [e.reason for e in log.read()] == ["sent jbx_[redacted] and [redacted]"]
    assert files_holding(tmp_path, key) == []


def test_add_twice_from_the_api_is_a_typed_error(tmp_path: Path) -> None:
    store = UserStore.at_home(tmp_path)
    store.add("alice")
    with pytest.raises(UserExists, match="jupybox users key alice"):
        store.add("alice")


def test_the_audit_log_can_live_elsewhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "logs" / "team-audit.jsonl"
    key = jupybox(tmp_path / "home", "users", "add", "alice", "--audit-log", str(elsewhere)).stdout.strip()
    assert not (tmp_path / "home" / "audit.jsonl").exists()
    view = jupybox(tmp_path / "home", "audit", "--audit-log", str(elsewhere))
    assert view.returncode == 0 and "user.added alice" in view.stdout
    assert key not in elsewhere.read_text() and (elsewhere.stat().st_mode & 0o777) == 0o600
    empty = jupybox(tmp_path / "home", "audit")
    assert empty.returncode == 0 and empty.stdout == "" and "no audit log" in empty.stderr
