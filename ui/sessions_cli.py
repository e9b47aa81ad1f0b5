"""``jupybox sessions list``: the server's sessions as its records keep them, running and paused,
with their size on disk and age; read from ``JUPYBOX_HOME/jupybox.db`` while the server runs."""

from __future__ import annotations

import argparse
import json
import sys
import time

from store import SessionRecord, SessionRecords, StoreError

from .users_cli import when


def add_session_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sessions", help="the server's sessions, running and paused (JUPYBOX_HOME/jupybox.db)")
    ssub = p.add_subparsers(dest="action", required=True)
    ls = ssub.add_parser("list", help="id, owner, state, size on disk, age and last use, newest use first")
    ls.add_argument("--user", help="only this user's sessions")
    ls.add_argument("--json", action="store_true", help="one JSON object per session")


def run_session_command(args: argparse.Namespace) -> int:
    try:
        found = SessionRecords.at_home().list(owner=args.user)
    except StoreError as exc:
        print(f"jupybox: {exc}", file=sys.stderr)
        return 2
    return list_sessions(found, args.json)


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


def list_sessions(found: list[SessionRecord], as_json: bool, now: float | None = None) -> int:
    now = now or time.time()
    if as_json:
        for r in found:
            print(json.dumps({"id": r.id, "instance": r.instance, "owner": r.owner, "state": r.state,
                              "created": r.created, "last_used": r.last_used, "paused": r.paused,
                              "disk_bytes": r.disk_bytes, "title": r.title, "note": r.note}, ensure_ascii=False))
        return 0
    if not found:
        print("no sessions are kept (the server keeps them with --durable, its default)", file=sys.stderr)
        return 0
    rows = [("ID", "OWNER", "STATE", "SIZE", "AGE", "LAST USED", "TITLE")]
    rows += [(r.id, r.owner or "-", r.state, size(r.disk_bytes) if r.state == "paused" else "-",
              age(now - r.created), when(r.last_used), (r.title or "")[:40]) for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
