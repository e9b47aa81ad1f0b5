"""``jupybox users`` (add, revoke, key, list) and ``jupybox audit``: the admin's side of the user
store and the audit log of ``store/``, run against ``JUPYBOX_HOME`` (the server's folder; a
running server sees every change on its next request).

A new key is printed once, alone on stdout, so ``KEY=$(jupybox users add alice)`` captures it;
everything else goes to stderr. Store errors end the command with status 2 and one sentence.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from store import AuditEvent, AuditLog, StoreError, User, UserStore, audit_path

SINCE_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_user_commands(sub: argparse._SubParsersAction) -> None:
    """The ``users`` and ``audit`` subcommands, on the CLI's subparsers."""
    p = sub.add_parser("users", help="the server's users and their keys (JUPYBOX_HOME/jupybox.db)")
    usub = p.add_subparsers(dest="action", required=True)
    a = usub.add_parser("add", help="add a user; prints their new key, once, on the last line of stdout")
    a.add_argument("name")
    a.add_argument("--admin", action="store_true", help="may see and close everyone's sessions, and /metrics")
    a.add_argument("--max-sessions", type=int, help="open sessions at most for this user (default: the server's)")
    a.add_argument("--memory-mb", type=int, help="total memory of this user's sessions (default: the server's)")
    usub.add_parser("revoke", help="refuse the user's key from the server's next request on").add_argument("name")
    usub.add_parser("key", help="give the user a new key (the old one stops working)").add_argument("name")
    ls = usub.add_parser("list", help="names, roles, quotas and last use (never keys)")
    ls.add_argument("--json", action="store_true", help="one JSON object per user")
    p = sub.add_parser("audit", help="a readable view of the audit log")
    p.add_argument("--user", help="only what this user did, or what was done to them")
    p.add_argument("--since", help="only events this recent: 30m, 1h, 2d, or a time such as 2026-01-31T09:00")
    p.add_argument("--json", action="store_true", help="the log's own JSON lines")
    for parser in (p, *usub.choices.values()):
        parser.add_argument("--audit-log", help="the audit log file (default JUPYBOX_HOME/audit.jsonl; "
                                                "env JUPYBOX_AUDIT_LOG)")


def run_user_command(args: argparse.Namespace) -> int:
    """``jupybox users ...`` or ``jupybox audit``; store errors as one line and status 2."""
    try:
        if args.command == "audit":
            return show_audit(args)
        return users(args)
    except StoreError as exc:
        print(f"jupybox: {exc}", file=sys.stderr)
        return 2


def users(args: argparse.Namespace) -> int:
    store = UserStore.at_home()
    audit = AuditLog(audit_path(args.audit_log))
    actor = f"cli:{getpass.getuser()}"
    if args.action == "list":
        return list_users(store.list(), args.json)
    if args.action == "add":
        user, key = store.add(args.name, admin=args.admin, max_sessions=args.max_sessions, memory_mb=args.memory_mb)
        audit.record(AuditEvent("user.added", user=actor, client="local", target=user.name,
                                detail={"admin": user.admin, "max_sessions": user.max_sessions,
                                        "memory_mb": user.memory_mb}))
        print(f"added {describe(user)}. Their key follows, shown this once: hand it to them "
              f"(`jupybox users key {user.name}` makes a new one).", file=sys.stderr)
        print(key, flush=True)
        return 0
    if args.action == "revoke":
        user = store.revoke(args.name)
        audit.record(AuditEvent("user.revoked", user=actor, client="local", target=user.name))
        print(f"revoked {user.name}: the server refuses their key from its next request on", file=sys.stderr)
        return 0
    if args.action == "key":
        before = store.get(args.name)
        user, key = store.replace_key(args.name)
        audit.record(AuditEvent("user.key_replaced", user=actor, client="local", target=user.name,
                                result="reinstated" if not before.active else "ok"))
        again = " and reinstated (they were revoked)" if not before.active else ""
        print(f"new key for {user.name}{again}; the old one no longer works. Shown this once:", file=sys.stderr)
        print(key, flush=True)
        return 0
    raise AssertionError(args.action)


def describe(user: User) -> str:
    role = "admin" if user.admin else "user"
    quotas = [f"at most {user.max_sessions} sessions" if user.max_sessions else "",
              f"{user.memory_mb} MB of session memory" if user.memory_mb else ""]
    return f"{user.name} ({', '.join([role, *filter(None, quotas)])})"


def when(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def list_users(found: list[User], as_json: bool) -> int:
    if as_json:
        for u in found:
            print(json.dumps({"name": u.name, "admin": u.admin, "max_sessions": u.max_sessions,
                              "memory_mb": u.memory_mb, "created": u.created, "last_used": u.last_used,
                              "revoked": u.revoked}))
        return 0
    if not found:
        print("no users yet: the server runs without keys (loopback only, or its API token). "
              "Add one with `jupybox users add NAME`.", file=sys.stderr)
        return 0
    rows = [("NAME", "ROLE", "SESSIONS", "MEMORY_MB", "LAST USED", "STATUS")]
    rows += [(u.name, "admin" if u.admin else "user", str(u.max_sessions or "server's"),
              str(u.memory_mb or "server's"), when(u.last_used), "active" if u.active else f"revoked {when(u.revoked)}")
             for u in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``, ``1h``, ``2d`` (ago) or an ISO time (UTC unless it says otherwise) -> epoch seconds."""
    match = SINCE_PATTERN.fullmatch(text.strip().lower())
    if match:
        return (now or time.time()) - float(match[1]) * SINCE_UNITS[match[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise StoreError(f"--since {text!r} is neither a span (30m, 1h, 2d) nor a time (2026-01-31T09:00)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def show_audit(args: argparse.Namespace) -> int:
    log = AuditLog(audit_path(args.audit_log))
    since = parse_since(args.since) if args.since else None
    if not log.files():
        print(f"no audit log at {log.path} yet", file=sys.stderr)
        return 0
    for event in log.read(since=since, user=args.user):
        if args.json:
            print(json.dumps(event.to_dict(), ensure_ascii=False))
            continue
        target = f" {event.target}" if event.target else ""
        why = f" ({event.reason})" if event.reason else ""
        print(f"{when(event.time)}  {event.user or '-'}  {event.client or '-'}  {event.action}{target}  "
              f"{event.result}{why}")
    return 0
