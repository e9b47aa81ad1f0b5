"""Who is calling: the server's authentication, as pure ASGI middleware (``Authenticate``).

Three modes, decided on every request (so a user added with the CLI takes effect at once):

- **keys** — the user store (``store.KeyIndex``) holds users, or an API token is configured: every
  path but ``/healthz`` needs a key or the token, given as ``Authorization: Bearer KEY``,
  ``Authorization: token KEY`` (Jupyter clients), the ``jupybox_token`` cookie, or once as
  ``GET /?token=KEY``, which sets that cookie (HttpOnly, SameSite=Strict, Secure over HTTPS) and
  redirects to the URL without it, so the key stays out of the browser's history. The API token
  (``JUPYBOX_API_TOKEN`` / ``--api-token-file``) is an admin key.
- **loopback** — no users and no token: only requests addressed to a loopback name or the
  configured host are served (``LoopbackHostOnly``), as a server for one person on one machine.
- **store unreadable** — once this server has seen users, a store that cannot be read (removed,
  corrupt, unreadable) refuses every key but the API token with a 503, never opens the door.

A credential that is malformed (not printable ASCII, longer than ``KEY_MAX_CHARS``), two
Authorization headers, or two keys in one, are a 400 that says so. A revoked or replaced key is
refused on its next request, and a request of that key still running (an SSE stream, the kernels
API's channels websocket, an MCP stream) ends within ``RECHECK_S``: the app hears a disconnect, and
a websocket is closed with 1008. The caller's ``Identity`` goes into ``scope["state"]["identity"]``
(``request.state.identity``) for the routes and services that check ownership.

The audit log gets ``key.accepted`` once per client connection and identity, and ``key.refused``
with the reason for each refusal; never the key. Its lines, and the ``last_used`` time of users,
are written by one worker thread, so no request waits on a disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import KEY_MAX_CHARS, AuditEvent, AuditLog, KeyIndex, StoreError, StoreUnavailable, User
from store.keys import same_digest

from .metrics import Metrics
from .middleware import OPEN_PATHS, LoopbackHostOnly, refuse

log = logging.getLogger(__name__)

TOKEN_COOKIE = "jupybox_token"
AUTH_SCHEMES = frozenset({"bearer", "token"})  # token: what Jupyter clients send (a gateway's, VS Code's)
CONNECTION_MEMORY_S = 60.0  # a client connection idle this long is forgotten: its next request is "new"
CONNECTIONS_KEPT = 10_000
TOUCH_EVERY_S = 60.0  # a user's last_used is written at most this often
STORE_LOG_EVERY_S = 60.0
RECHECK_S = 1.0  # how often the key of a request still running (a stream, a websocket) is checked again


@dataclass(frozen=True)
class Identity:
    """Who a request comes from. ``name`` is a user's name, or a name no user can have (with
    parentheses) for the API token and the loopback mode; ``admin`` may see everyone's work."""

    name: str
    admin: bool
    via: str  # "key" | "token" | "loopback"
    user: User | None = None


ADMIN_TOKEN = Identity("(admin token)", admin=True, via="token")
LOOPBACK = Identity("(local)", admin=True, via="loopback")


class WhoAmI(BaseModel):
    name: str
    admin: bool
    via: str


router = APIRouter()


@router.get("/api/whoami", response_model=WhoAmI, summary="Who the server takes the caller for")
async def whoami(request: Request) -> WhoAmI:
    """A client's check of its key: the user's name and role (the key itself is never echoed)."""
    identity = identity_of(request.scope) or LOOPBACK
    return WhoAmI(name=identity.name, admin=identity.admin, via=identity.via)


def identity_of(scope: Scope) -> Identity | None:
    """The identity ``Authenticate`` put into the request's scope (``None`` on open paths)."""
    return scope.get("state", {}).get("identity")


class BadCredential(ValueError):
    """A credential the server will not even look up: the message says what is wrong with it."""


def check_credential(value: str, where: str) -> str:
    """``value`` if it can be a key or token, else ``BadCredential`` (never quoting the value)."""
    if not value:
        raise BadCredential(f"{where} holds no key: send 'Authorization: Bearer KEY'")
    if len(value) > KEY_MAX_CHARS:
        raise BadCredential(f"{where} holds {len(value)} characters; a key has at most {KEY_MAX_CHARS}")
    if " " in value or "," in value:
        raise BadCredential(f"{where} holds more than one key: send exactly one")
    if not all("!" <= ch <= "~" for ch in value):
        raise BadCredential(f"{where} holds characters no key has (control, non-ASCII): copy the key again")
    return value


def credential_of(scope: Scope, query: list[tuple[str, str]] | None) -> str | None:
    """The key a request carries, from the ``?token=`` login, the Authorization header or the
    cookie, in that order; ``None`` if it carries none."""
    if query is not None:
        tokens = [v for k, v in query if k == "token"]
        if len(tokens) > 1:
            raise BadCredential("the address holds more than one token=: send exactly one")
        return check_credential(tokens[0].strip(), "the token= parameter")
    headers = Headers(scope=scope)
    values = headers.getlist("authorization")
    if len(values) > 1:
        raise BadCredential("the request has more than one Authorization header: send exactly one")
    if values:
        scheme, _, credentials = values[0].strip().partition(" ")
        if scheme.lower() in AUTH_SCHEMES:
            return check_credential(credentials.strip(), "the Authorization header")
    cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
    return check_credential(cookie, f"the {TOKEN_COOKIE} cookie") if cookie is not None else None


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


# The address of the client whose request is running, for the audit lines that the layers below
# write on its behalf (session create and close, execute, uploads...): set per request by
# ``Authenticate``, so tasks the request starts carry it; unset (None) in the server's own tasks.
request_client: ContextVar[str | None] = ContextVar("jupybox_request_client", default=None)


class Auditor:
    """The server's audit hook: lines go to the ``AuditLog`` by one worker thread, so no request
    waits on the disk, and a log that cannot be written is said in the server's log, not to users."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jupybox-audit-events")

    def __call__(self, action: str, user: str | None, target: str | None, detail: dict[str, Any]) -> None:
        detail = dict(detail)
        result = str(detail.pop("result", "ok"))
        self.record(AuditEvent(action, user=user, client=request_client.get(), target=target, result=result,
                               detail=detail))

    def record(self, event: AuditEvent) -> None:
        try:
            self._worker.submit(self._write, event)
        except RuntimeError:  # closed: the server is stopping, and a last request still ran
            log.error("audit line %s not written: the server is stopping", event.action)

    def _write(self, event: AuditEvent) -> None:
        try:
            self.audit.record(event)
        except StoreError as exc:
            log.error("audit line %s not written: %s", event.action, exc)

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class Authenticate:
    """Pure ASGI (streams and disconnects pass through untouched): see the module docstring."""

    def __init__(self, app: ASGIApp, token: str | None, keys: KeyIndex, auditor: Auditor | None, host: str,
                 metrics: Metrics) -> None:
        self.app = app
        self.token = token
        self.keys = keys
        self.auditor = auditor
        self.metrics = metrics
        self.loopback = LoopbackHostOnly(app, host, metrics)
        self._connections: OrderedDict[tuple[object, str], float] = OrderedDict()
        self._touched: dict[str, float] = {}
        self._store_logged = 0.0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jupybox-last-use")  # the store's last-use notes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request_client.set(client_of(scope))
        store_error: StoreUnavailable | None = None
        try:
            keys_needed = self.token is not None or self.keys.has_users()
        except StoreUnavailable as exc:
            keys_needed, store_error = True, exc
            self._log_store_error(exc)
        if not keys_needed:
            scope.setdefault("state", {})["identity"] = LOOPBACK
            await self.loopback(scope, receive, send)
            return
        login = None
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/":
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            login = query if any(k == "token" for k, _ in query) else None
        try:
            credential = credential_of(scope, login)
        except BadCredential as exc:
            self._record(AuditEvent("key.refused", client=client_of(scope), result="refused", reason=str(exc)))
            await refuse(scope, receive, send, self.metrics, 400, str(exc), {"WWW-Authenticate": "Bearer"})
            return
        if credential is None:
            self._record(AuditEvent("key.refused", client=client_of(scope), result="refused", reason="no key"))
            await refuse(scope, receive, send, self.metrics, 401, self._missing_message(),
                         {"WWW-Authenticate": "Bearer"})
            return
        identity, reason = self._identify(credential, store_error)
        if identity is None:
            self._record(AuditEvent("key.refused", client=client_of(scope), result="refused", reason=reason))
            if store_error is not None:
                await refuse(scope, receive, send, self.metrics, 503,
                             "this server's user store cannot be read, so no key can be checked: tell the "
                             "server's admin (its log says what is wrong)", {"Retry-After": "30"})
            else:
                await refuse(scope, receive, send, self.metrics, 401, self._wrong_message(),
                             {"WWW-Authenticate": "Bearer"})
            return
        scope.setdefault("state", {})["identity"] = identity
        self._accepted(scope, identity)
        if login is not None:
            await self._redeem(scope, receive, send, login, credential)
            return
        if identity.via != "key":  # the API token cannot be revoked while the server runs
            await self.app(scope, receive, send)
            return
        await self._guarded(scope, receive, send, credential)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, credential: str) -> None:
        """Run the request while its key is checked again every ``RECHECK_S``: once it is revoked
        or replaced, the app hears that its client left (its streams and websockets end as on a
        disconnect) and an open websocket is closed with 1008."""
        revoked = asyncio.Event()
        state = {"accepted": False, "closed": False}
        disconnect = {"type": "websocket.disconnect", "code": 1008} if scope["type"] == "websocket" \
            else {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            if revoked.is_set():
                return disconnect
            message = asyncio.ensure_future(receive())
            gone = asyncio.ensure_future(revoked.wait())
            await asyncio.wait({message, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if message.done():
                return message.result()
            message.cancel()
            return disconnect

        async def tracked_send(message: Message) -> None:
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        watcher = asyncio.ensure_future(self._watch(scope, credential, revoked))
        try:
            await self.app(scope, guarded_receive, tracked_send)
        finally:
            watcher.cancel()
        if revoked.is_set() and state["accepted"] and not state["closed"]:
            try:
                await send({"type": "websocket.close", "code": 1008, "reason": "the key was revoked or replaced"})
            except (OSError, RuntimeError):  # the client is gone already
                pass

    async def _watch(self, scope: Scope, credential: str, revoked: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            identity, reason = self._identify(credential, None)
            if identity is None:
                self._record(AuditEvent("key.refused", client=client_of(scope), result="closed",
                                        reason=f"{reason}; its open request was ended",
                                        detail={"path": scope["path"]}))
                revoked.set()
                return

    def _identify(self, credential: str, store_error: StoreUnavailable | None) -> tuple[Identity | None, str]:
        """The identity a credential stands for, or ``None`` and why (for the audit log)."""
        if self.token is not None and same_digest(credential, self.token):
            return ADMIN_TOKEN, ""
        if store_error is not None:
            return None, f"the user store cannot be read: {store_error}"
        try:
            user = self.keys.lookup(credential)
        except StoreUnavailable as exc:
            self._log_store_error(exc)
            return None, f"the user store cannot be read: {exc}"
        if user is None:
            return None, "unknown key (replaced, mistyped or never issued)"
        if not user.active:
            return None, f"the key of revoked user {user.name}"
        return Identity(user.name, user.admin, "key", user), ""

    def _users_exist(self) -> bool:
        try:
            return self.keys.has_users()
        except StoreError:
            return True

    def _missing_message(self) -> str:
        if self._users_exist():
            return ("this server needs a key: send 'Authorization: Bearer KEY' (its admin makes one with "
                    "`jupybox users add NAME`)")
        return "this server needs an API token: send 'Authorization: Bearer <token>'"

    def _wrong_message(self) -> str:
        if self._users_exist():
            return ("this key is not valid (revoked, replaced or mistyped): ask the server's admin for a new one "
                    "(`jupybox users key NAME`)")
        return "the API token is wrong"

    def _accepted(self, scope: Scope, identity: Identity) -> None:
        """Audit ``key.accepted`` for a connection not seen lately with this identity; note the
        user's last use now and then."""
        now = time.monotonic()
        conn = (tuple(scope.get("client") or ()), identity.name)
        last = self._connections.pop(conn, None)
        self._connections[conn] = now
        while len(self._connections) > CONNECTIONS_KEPT:
            self._connections.popitem(last=False)
        if last is not None and now - last < CONNECTION_MEMORY_S:
            return
        self._record(AuditEvent("key.accepted", user=identity.name, client=client_of(scope),
                                       detail={"via": identity.via, "path": scope["path"]}))
        if identity.user is not None and now - self._touched.get(identity.name, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[identity.name] = now
            self._submit(self._touch, identity.name)

    def _record(self, event: AuditEvent) -> None:
        if self.auditor is not None:
            self.auditor.record(event)

    def _submit(self, fn: object, arg: object) -> None:
        asyncio.get_running_loop().run_in_executor(self._worker, fn, arg)  # type: ignore[arg-type]

    def _touch(self, name: str) -> None:
        try:
            self.keys.store.touch(name)
        except StoreError as exc:
            log.warning("last use of %s not recorded: %s", name, exc)

    def _log_store_error(self, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._store_logged >= STORE_LOG_EVERY_S:
            self._store_logged = now
            log.error("%s; until it is fixed every key but the API token is refused", exc)

    async def _redeem(self, scope: Scope, receive: Receive, send: Send, query: list[tuple[str, str]],
                      credential: str) -> None:
        """``GET /?token=``: the cookie, and a redirect to the URL without the key."""
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        response = RedirectResponse(scope.get("root_path", "") + "/" + (f"?{rest}" if rest else ""), status_code=303)
        response.set_cookie(TOKEN_COOKIE, credential, path="/", httponly=True, samesite="strict",
                            secure=scope.get("scheme") == "https")
        await response(scope, receive, send)
