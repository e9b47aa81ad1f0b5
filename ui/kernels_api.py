"""The kernel half of the Jupyter Server API, so notebook front ends run their cells in jupybox:
JupyterLab or Notebook started with ``--gateway-url`` pointing here, VS Code through such a server.

Routes, all behind the server's token (Jupyter clients send ``Authorization: token <token>``):
``GET /api/kernelspecs[/{name}]``, ``GET|POST /api/kernels``, ``GET|DELETE /api/kernels/{id}``,
``POST /api/kernels/{id}/interrupt|restart``, and the websocket ``/api/kernels/{id}/channels`` in
both of Jupyter Server's wire formats (``sandbox/kernel_wire.py``).

Each kernel is a sandbox session: the same container, limits, workspace, idle expiry and cleanup,
listed in ``/api/sessions`` with its files under ``/api/sessions/{session}/files``. Its kernel id
is a UUID of its own (Jupyter Server routes only UUID-shaped ids), and only sessions started here
are kernels: another session's id reaches nothing. Messages go through the session's
``KernelRelay`` (``sandbox/relay.py``), which trusts neither side.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

from interpreter.service import Audit
from sandbox import Caller, JupyboxError, KernelMessageRefused, KernelRelay, Session, SessionClosed, SessionManager
from sandbox.errors import KernelMessageTooLarge
from sandbox.kernel_wire import V1_PROTOCOL, WireError, WireFormat, encode

from .metrics import Metrics
from .ownership import caller_of

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")
KERNEL_NAME = "python3"  # the server's default sandbox: the name notebooks carry, so they open on it unchanged
ISOLATION_KERNELS = {"runsc": ("python3-gvisor", "gVisor")}  # a backend's other isolations -> (name, label)
STATES = frozenset({"starting", "idle", "busy", "restarting", "autorestarting", "dead"})
CLOSE_TOO_BIG, CLOSE_POLICY, CLOSE_BAD_DATA, CLOSE_GOING_AWAY, CLOSE_RESTART = 1009, 1008, 1007, 1001, 1012


class StartKernelRequest(BaseModel):
    """What Jupyter clients send; ``env`` and ``path`` are accepted and not passed to the sandbox
    (its environment and working folder, the workspace, are the server's)."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, max_length=200)
    env: dict[str, str] | None = None
    path: str | None = Field(None, max_length=4096)


@dataclass
class KernelRecord:
    id: str
    session_id: str
    name: str = KERNEL_NAME
    state: str = "idle"  # the last execution_state the kernel published to a client
    connections: int = 0


class Kernels:
    """The kernels started through this API, on the server's session manager. This is the one
    place the module touches the server's services: the manager, its settings and the metrics."""

    def __init__(self, manager: SessionManager, metrics: Metrics, audit: Audit | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.audit = audit  # kernel.start / kernel.shutdown lines, with the user
        self._records: dict[str, KernelRecord] = {}
        self._isolations: dict[str, str | None] | None = None  # kernel name -> isolation, once asked

    async def flavours(self) -> dict[str, str | None]:
        """Kernel name -> the isolation its sessions ask for: the server's default sandbox, and each
        stronger one the backend offers besides (gVisor where the Docker daemon has it)."""
        if self._isolations is not None:
            return self._isolations
        try:
            extra = await self.manager.backend.isolations()
        except JupyboxError as exc:  # the daemon is unwell: offer the default, ask again next time
            log.warning("could not list the sandbox's isolations: %s", exc)
            extra = []
        found = {KERNEL_NAME: None, **{ISOLATION_KERNELS[i][0]: i for i in extra if i in ISOLATION_KERNELS}}
        if len(found) > 1:  # kept once found; until then asked again (gVisor may be registered later)
            self._isolations = found
        return found

    def spec(self, name: str, isolation: str | None) -> dict[str, Any]:
        settings = self.manager.settings
        runtime = isolation or settings.docker_runtime
        label = ISOLATION_KERNELS.get(runtime or "", (None, runtime))[1]
        return {"name": name, "resources": {}, "spec": {
            "argv": [], "env": {}, "language": "python", "interrupt_mode": "signal",
            "display_name": f"Python 3 (jupybox sandbox, {settings.backend}{', ' + label if label else ''})",
            "metadata": {"jupybox": {"backend": settings.backend, "runtime": runtime,
                                     "memory_mb": settings.limits.memory_mb, "cpus": settings.limits.cpus}}}}

    async def specs(self) -> dict[str, dict[str, Any]]:
        return {name: self.spec(name, isolation) for name, isolation in (await self.flavours()).items()}

    async def start(self, name: str | None, caller: Caller) -> tuple[KernelRecord, Session]:
        flavours = await self.flavours()
        name = name or KERNEL_NAME
        if name not in flavours:
            raise HTTPException(404, f"no kernel spec {name!r}: this server offers {', '.join(flavours)} "
                                     "(see /api/kernelspecs)")
        session = await self.manager.create(isolation=flavours[name], caller=caller)
        self.metrics.sessions_created.inc()
        record = KernelRecord(str(uuid.uuid4()), session.id, name)
        self._records[record.id] = record
        self._audit("kernel.start", caller, record)
        return record, session

    def _audit(self, action: str, caller: Caller, record: KernelRecord) -> None:
        if self.audit is not None:
            self.audit(action, caller.name, record.id, {"session": record.session_id, "kernel_name": record.name})

    def get(self, kernel_id: str, caller: Caller) -> tuple[KernelRecord, Session]:
        """The kernel and its session; a 404 for ids that are not (or no longer) kernels, and for
        another user's, worded the same (the session registry decides whose it is)."""
        record = self._records.get(kernel_id)
        if record is not None:
            try:
                session = self.manager.get(record.session_id)
            except SessionClosed:  # closed elsewhere, or expired
                del self._records[kernel_id]
            else:
                if self.manager.may_use(record.session_id, caller):
                    return record, session
        raise HTTPException(404, f"no kernel {kernel_id!r}: it was shut down, expired after being idle, "
                                 "or was never started through /api/kernels")

    def list(self, caller: Caller) -> list[tuple[KernelRecord, Session]]:
        found = []
        for kernel_id in list(self._records):
            try:
                found.append(self.get(kernel_id, caller))
            except HTTPException:
                pass
        return found

    async def shutdown(self, kernel_id: str, caller: Caller) -> None:
        record, _ = self.get(kernel_id, caller)
        del self._records[kernel_id]
        await self.manager.close(record.session_id, caller)
        self._audit("kernel.shutdown", caller, record)


def model(record: KernelRecord, session: Session) -> dict[str, Any]:
    """The kernel model of Jupyter Server's REST API (``last_activity`` in the exact format its
    gateway client parses)."""
    last = time.time() - (time.monotonic() - session.last_used)
    stamp = datetime.datetime.fromtimestamp(last, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"id": record.id, "name": record.name, "last_activity": stamp,
            "execution_state": record.state,
            "connections": record.connections, "jupybox": {"session": session.id}}


def kernels_of(conn: HTTPConnection) -> Kernels:
    return conn.app.state.kernels


def install(app: FastAPI, manager: SessionManager, metrics: Metrics, audit: Audit | None = None) -> None:
    """Add the routes to ``app``; call before any catch-all route under ``/api``."""
    app.state.kernels = Kernels(manager, metrics, audit)
    app.include_router(router, tags=["jupyter kernels"])


# -- REST --------------------------------------------------------------------------------------
@router.get("/kernelspecs", summary="Kernel specs (Jupyter Server API)")
async def list_kernelspecs(request: Request) -> dict[str, Any]:
    return {"default": KERNEL_NAME, "kernelspecs": await kernels_of(request).specs()}


@router.get("/kernelspecs/{name}", summary="One kernel spec (Jupyter Server API)")
async def get_kernelspec(request: Request, name: str) -> dict[str, Any]:
    specs = await kernels_of(request).specs()
    if name not in specs:
        raise HTTPException(404, f"no kernel spec {name!r}: this server offers {', '.join(specs)}")
    return specs[name]


@router.get("/kernels", summary="Running kernels (Jupyter Server API)")
async def list_kernels(request: Request) -> list[dict[str, Any]]:
    return [model(r, s) for r, s in kernels_of(request).list(caller_of(request))]


@router.post("/kernels", status_code=201, summary="Start a kernel: a new sandbox session (Jupyter Server API)")
async def start_kernel(request: Request) -> JSONResponse:
    # Read whatever the Content-Type says: Jupyter clients do not all send application/json.
    raw = await request.body()
    try:
        body = StartKernelRequest.model_validate_json(raw) if raw.strip() else StartKernelRequest()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise HTTPException(400, f"invalid kernel start request: {problems}") from None
    kernels = kernels_of(request)
    record, session = await kernels.start(body.name, caller_of(request))
    return JSONResponse(model(record, session), status_code=201, headers={"Location": f"/api/kernels/{record.id}"})


@router.get("/kernels/{kernel_id}", summary="One kernel (Jupyter Server API)")
async def get_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
    return model(*kernels_of(request).get(kernel_id, caller_of(request)))


@router.delete("/kernels/{kernel_id}", status_code=204, summary="Shut a kernel down: its session and container go")
async def shutdown_kernel(request: Request, kernel_id: str) -> Response:
    await kernels_of(request).shutdown(kernel_id, caller_of(request))
    return Response(status_code=204)


@router.post("/kernels/{kernel_id}/interrupt", status_code=204, summary="Interrupt the running cell")
async def interrupt_kernel(request: Request, kernel_id: str) -> Response:
    _, session = kernels_of(request).get(kernel_id, caller_of(request))
    session.interrupt()
    return Response(status_code=204)


@router.post("/kernels/{kernel_id}/restart", summary="A fresh kernel in the same session (variables lost, files kept)")
async def restart_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
    record, session = kernels_of(request).get(kernel_id, caller_of(request))
    await session.restart()
    record.state = "idle"
    return model(record, session)


# -- the channels websocket --------------------------------------------------------------------
@router.websocket("/kernels/{kernel_id}/channels")
async def channels(ws: WebSocket, kernel_id: str) -> None:
    kernels = kernels_of(ws)
    try:
        record, session = kernels.get(kernel_id, caller_of(ws))
        relay = await session.attach()
    except HTTPException as exc:
        await _deny(ws, exc.status_code, str(exc.detail))
        return
    except JupyboxError as exc:
        await _deny(ws, 503, str(exc))
        return
    v1 = V1_PROTOCOL in ws.scope.get("subprotocols", [])
    record.connections += 1
    try:
        await ws.accept(subprotocol=V1_PROTOCOL if v1 else None)
        await _pass_messages(ws, relay, record, kernels.metrics, v1)
    finally:
        record.connections -= 1
        if not relay.running and record.state == "busy":  # the idle that ends its last request went unread
            record.state = "idle"
        relay.end("the client left")


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP status and a JSON sentence where the server can send one."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:
        await ws.close(CLOSE_POLICY, message[:120])


async def _pass_messages(ws: WebSocket, relay: KernelRelay, record: KernelRecord, metrics: Metrics, v1: bool) -> None:
    """Both directions at once until either side ends; then the websocket is closed with a code
    and a reason that say why."""
    to_kernel = asyncio.create_task(_client_to_kernel(ws, relay, metrics, v1))
    to_client = asyncio.create_task(_kernel_to_client(ws, relay, record, metrics, v1))
    done, pending = await asyncio.wait({to_kernel, to_client}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    code, reason = next(iter(done)).result()
    if code is not None:
        try:
            await ws.close(code, reason.encode()[:120].decode(errors="ignore"))
        except RuntimeError:  # the client closed meanwhile
            pass


async def _client_to_kernel(ws: WebSocket, relay: KernelRelay, metrics: Metrics, v1: bool) -> tuple[int | None, str]:
    wire: WireFormat = "v1" if v1 else "legacy"
    while True:
        frame = await ws.receive()
        if frame["type"] == "websocket.disconnect":
            return None, ""
        data = frame.get("bytes")
        try:  # the relay checks the frame's size, decodes it and checks the message, once
            await relay.send_frame(data if data is not None else frame.get("text") or "", wire)
        except KernelMessageTooLarge as exc:
            metrics.kernel_messages_refused.inc()
            return CLOSE_TOO_BIG, str(exc)
        except WireError as exc:
            metrics.kernel_messages_refused.inc()
            return CLOSE_BAD_DATA, f"message refused: {exc}"
        except KernelMessageRefused as exc:
            metrics.kernel_messages_refused.inc()
            return CLOSE_POLICY, f"message refused: {exc}"
        except JupyboxError as exc:  # the relay ended under us
            return CLOSE_RESTART, str(exc)
        metrics.kernel_messages.labels("to_kernel").inc()


async def _kernel_to_client(ws: WebSocket, relay: KernelRelay, record: KernelRecord, metrics: Metrics,
                            v1: bool) -> tuple[int | None, str]:
    while (msg := await relay.receive()) is not None:
        if msg.channel == "iopub" and msg.msg_type == "status" and msg.content.get("execution_state") in STATES:
            record.state = msg.content["execution_state"]
        wire = encode(msg, "v1" if v1 else "legacy")
        try:
            if isinstance(wire, bytes):
                await ws.send_bytes(wire)
            else:
                await ws.send_text(wire)
        except (WebSocketDisconnect, RuntimeError):
            return None, ""
        metrics.kernel_messages.labels("to_client").inc()
    return (CLOSE_GOING_AWAY if relay.ended_by == "close" else CLOSE_RESTART), relay.end_reason or "ended"
