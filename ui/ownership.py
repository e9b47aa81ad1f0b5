"""Who owns what, as the front ends see it: the caller's identity (put into the request's scope
by ``ui.auth.Authenticate``) as the ``sandbox.Caller`` the session registry and the conversation
service check ownership and per-user limits against.

Ownership is enforced in one place, the session registry (``SessionManager.get/list/close`` with a
caller): front ends only pass the caller along, and a key of their own choosing (a ``/v1`` user
field, an MCP session name) is prefixed with the user's name so that two users never share one.
"""

from __future__ import annotations

import hashlib

from starlette.requests import HTTPConnection
from starlette.types import Scope

from sandbox import Caller

from .auth import LOOPBACK, Identity, identity_of


def caller_for(identity: Identity) -> Caller:
    """The sandbox's view of an identity: its name, role and the user's own limits."""
    user = identity.user
    return Caller(identity.name, identity.admin, user.max_sessions if user else None, user.memory_mb if user else None)


def caller_of(conn: HTTPConnection | Scope) -> Caller:
    """The caller of a request or websocket (the loopback mode's one local admin on open paths)."""
    scope = conn.scope if isinstance(conn, HTTPConnection) else conn
    return caller_for(identity_of(scope) or LOOPBACK)


def owned_key(caller: Caller, name: str) -> str:
    """A conversation key that only this caller reaches: the name they chose, under their own."""
    return f"{caller.name}\x00{name}"


def tab_prefix(caller: Caller) -> str:
    """The start of the names of a user's tab folders in the UI's folder: the page serves a file
    below one only to that user (the name is a digest: user names stay out of paths)."""
    return f"tab-{hashlib.sha256(caller.name.encode()).hexdigest()[:16]}-"
