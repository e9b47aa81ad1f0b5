"""The JSON HTTP API under ``/api``: sandbox sessions, code execution, workspace files, and chat
turns through the interpreter. The OpenAPI schema at ``/openapi.json`` documents every route.

Errors are ``{"error": "<sentence>"}`` with a 4xx/5xx status (see ``ui.app``). Streams are
server-sent events: one ``data: <json>`` line per event, the JSON being ``Event.to_dict()`` of the
interpreter's events (``text_delta``, ``code``, ``output``, ``execution``, ``usage``, ``answer``,
``error``). A client that disconnects from a stream stops what it started: the kernel is
interrupted and the model's generation cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException

from interpreter import Chat, Event
from sandbox import Execution, JupyboxError, Session, Workspace, WorkspaceFile

from .metrics import Metrics
from .middleware import check_text
from .ownership import caller_of
from .services import Services
from .uploads import MultipartUpload

log = logging.getLogger(__name__)
SOURCE = "api"  # the label the service's observers count this front end's turns and executions by

class FileNameConvertor(PathConvertor):
    """A workspace file name in a URL: like ``path``, but matching a name that holds a newline
    too (code in the sandbox can create one; it must be downloadable and deletable)."""

    regex = r"[\s\S]+"


register_url_convertor("filename", FileNameConvertor())
router = APIRouter(prefix="/api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- models at the edge ------------------------------------------------------------------------
class Edge(BaseModel):
    """A request body: every string in it valid Unicode text."""

    @model_validator(mode="after")
    def _valid_text(self) -> Edge:
        check_text(self.model_dump())
        return self


class Strict(Edge):
    model_config = ConfigDict(extra="forbid")


class LimitsRequest(Strict):
    """Resource limits of a new session; each at least what a kernel runs with and at most the server's."""

    memory_mb: int | None = None
    cpus: float | None = None
    pids: int | None = None


class CreateSessionRequest(Strict):
    limits: LimitsRequest | None = None


class SessionInfo(BaseModel):
    id: str
    created: float = Field(description="Unix time")
    idle_s: float
    executions: int
    busy: bool = Field(description="a chat turn is running")
    has_conversation: bool
    limits: dict[str, Any]
    state: str = Field("running", description="running, or paused: variables saved, no kernel; the next use resumes it")
    note: str | None = Field(None, description="what the last pause saved, or why it saved nothing")


class PauseReport(BaseModel):
    id: str
    state: str
    saved: list[str] = Field(description="variables saved, loaded again when the session resumes")
    skipped: dict[str, str] = Field(description="variables not saved, each with why (a module, too large...)")
    bytes: int = Field(description="size of the saved variables, counted in the workspace quota")
    note: str = Field(description="the same in one line")


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class ExecuteRequest(Strict):
    code: str
    timeout_s: float | None = Field(None, gt=0, le=3600, description="default: the server's execution timeout")
    stream: bool = Field(False, description="answer with server-sent events: each output, then the execution")


class ChatRequest(Strict):
    message: str = Field(min_length=1)
    stream: bool = Field(True, description="server-sent events; false collects them into one JSON object")


class FileInfo(BaseModel):
    path: str
    size: int
    modified: float


class FileList(BaseModel):
    files: list[FileInfo]
    usage: int
    quota: int


class ServerStatus(BaseModel):
    model: str
    model_available: bool
    model_loading: bool
    model_error: str | None
    backend: str
    sessions_open: int
    max_sessions: int
    upload_limit_bytes: int


# -- helpers -----------------------------------------------------------------------------------
def services_of(request: Request) -> Services:
    return request.app.state.services


def metrics_of(request: Request) -> Metrics:
    return request.app.state.metrics


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def session_info(services: Services, session: Session) -> SessionInfo:
    chat = services.service.by_session(session.id)
    return SessionInfo(id=session.id, created=session.created, idle_s=round(time.monotonic() - session.last_used, 3),
                       executions=session.executions, busy=chat is not None and chat.busy,
                       has_conversation=chat is not None, limits=asdict(session.limits),
                       state="paused" if session.paused else "running",
                       note=session.pause_note if session.paused else None)


def open_session(services: Services, session_id: str, request: Request) -> Session:
    """An open session of the caller's (any, for an admin), or ``SessionClosed`` (404): another
    user's id answers exactly as one that does not exist."""
    return services.manager.get(session_id, caller_of(request))


def api_chat(services: Services, session_id: str, request: Request) -> Chat:
    """The conversation of an API session, made on first use and bound to it: its chat turns, the
    code run through ``execute`` and the files uploaded all go through the conversation service,
    so cells land in its notebook, uploads are announced to the model, and observers count once.
    ``SessionClosed`` (404) when there is no such session."""
    open_session(services, session_id, request)
    return services.service.open(session_id, SOURCE, session_id=session_id, caller=caller_of(request))


async def execution_events(services: Services, chat: Chat, code: str,
                           timeout: float | None) -> AsyncIterator[dict[str, Any]]:
    """Outputs as they arrive, then the execution; a consumer that leaves interrupts the kernel."""
    try:
        # closed, so interrupted, when we are; the service records the cell and its observers count it
        async with aclosing(services.service.execute(chat, code, timeout)) as events:
            async for event in events:
                yield event.to_dict()
    except JupyboxError as exc:
        yield Event("error", text=str(exc)).to_dict()


# -- routes ------------------------------------------------------------------------------------
@router.get("/status", response_model=ServerStatus, summary="What the server runs on; whether the model works")
async def status(request: Request) -> ServerStatus:
    s = services_of(request)
    m = s.service
    return ServerStatus(model=m.model_name, model_available=m.llm is not None,
                        model_loading=m.model_loading, model_error=m.model_error,
                        backend=s.manager.settings.backend, sessions_open=len(s.manager.list()),
                        max_sessions=s.manager.settings.max_sessions,
                        upload_limit_bytes=s.settings.upload_limit_mb << 20)


@router.post("/sessions", status_code=201, response_model=SessionInfo, summary="Create a sandbox session")
async def create_session(request: Request, body: CreateSessionRequest | None = None) -> SessionInfo:
    s = services_of(request)
    limits = None
    if body is not None and body.limits is not None:  # checked by the sandbox: LimitsError is a 400
        limits = replace(s.manager.settings.limits, **body.limits.model_dump(exclude_none=True))
    session = await s.manager.create(limits=limits, caller=caller_of(request))
    metrics_of(request).sessions_created.inc()
    return session_info(s, session)


@router.get("/sessions", response_model=SessionList, summary="List open sessions")
async def list_sessions(request: Request) -> SessionList:
    s = services_of(request)
    return SessionList(sessions=[session_info(s, x) for x in s.manager.list(caller_of(request))])


@router.get("/sessions/{session_id}", response_model=SessionInfo, summary="One session")
async def get_session(request: Request, session_id: str) -> SessionInfo:
    s = services_of(request)
    return session_info(s, open_session(s, session_id, request))


@router.delete("/sessions/{session_id}", status_code=204, summary="Close a session: its kernel and files are removed")
async def delete_session(request: Request, session_id: str) -> Response:
    s = services_of(request)
    open_session(s, session_id, request)  # someone else's: a 404 before anything is forgotten
    s.service.forget(session_id)
    await s.manager.close(session_id, caller_of(request))
    return Response(status_code=204)


@router.post("/sessions/{session_id}/pause", response_model=PauseReport,
             summary="Pause a session: variables saved, kernel stopped, files kept; its next use resumes it")
async def pause_session(request: Request, session_id: str) -> PauseReport:
    s = services_of(request)
    open_session(s, session_id, request)
    report = await s.manager.pause(session_id, caller_of(request))  # PauseFailed: 409, it runs on
    return PauseReport(id=session_id, state="paused", saved=report.saved, skipped=report.skipped,
                       bytes=report.bytes, note=report.words())


@router.post("/sessions/{session_id}/restart", response_model=SessionInfo,
             summary="A fresh kernel (variables are lost, files stay)")
async def restart_session(request: Request, session_id: str) -> SessionInfo:
    s = services_of(request)
    session = open_session(s, session_id, request)
    await session.restart()
    return session_info(s, session)


@router.post("/sessions/{session_id}/interrupt", status_code=204, summary="Interrupt the running code")
async def interrupt_session(request: Request, session_id: str) -> Response:
    open_session(services_of(request), session_id, request).interrupt()
    return Response(status_code=204)


@router.post("/sessions/{session_id}/execute", summary="Run code in the session's kernel",
             responses={200: {"description": "The Execution as JSON, or with stream=true server-sent events: "
                              "`output` events, then one `execution` event",
                              "content": {"application/json": {}, "text/event-stream": {}}}})
async def execute(request: Request, session_id: str, body: ExecuteRequest,
                  stream: bool = Query(False, description="same as the body's stream")) -> Response:
    s = services_of(request)
    chat = api_chat(s, session_id, request)
    if body.stream or stream:
        async def events() -> AsyncIterator[bytes]:
            async for event in execution_events(s, chat, body.code, body.timeout_s):
                yield sse(event)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
    execution: Execution | None = None
    async with aclosing(s.service.execute(chat, body.code, body.timeout_s)) as events:
        async for event in events:
            execution = event.execution if event.type == "execution" else execution
    assert execution is not None  # the service's execute ends with the execution, or raises
    return JSONResponse(execution.to_dict())


@router.post("/sessions/{session_id}/chat", summary="One user turn through the interpreter",
             responses={200: {"description": "Server-sent events, one per interpreter Event, ending with "
                              "`answer` or `error`", "content": {"text/event-stream": {}}},
                        503: {"description": "no model is configured; the message says how to configure one"},
                        409: {"description": "a turn is already running in this session"}})
async def chat(request: Request, session_id: str, body: ChatRequest) -> Response:
    service = services_of(request).service
    api_chat(services_of(request), session_id, request)
    turn = await service.turn(session_id, SOURCE, body.message)
    if not body.stream:
        events = [e.to_dict() async for e in turn.events()]
        last = events[-1] if events else {"type": "error", "text": "no events"}
        return JSONResponse({"answer": last.get("text") if last["type"] == "answer" else None,
                             "error": last.get("text") if last["type"] == "error" else None,
                             "finish_reason": turn.finish_reason, "usage": asdict(turn.usage), "events": events})

    async def stream() -> AsyncIterator[bytes]:
        async with aclosing(turn.events()) as events:  # a client that leaves stops the turn
            async for event in events:
                yield sse(event.to_dict())

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/sessions/{session_id}/notebook", summary="The session's conversation as a Jupyter notebook")
async def notebook(request: Request, session_id: str) -> Response:
    s = services_of(request)
    open_session(s, session_id, request)
    chat = s.service.by_session(session_id)
    if chat is None:
        raise HTTPException(404, f"session {session_id!r} has no conversation yet: POST a chat turn first")
    import nbformat

    return Response(nbformat.writes(chat.conversation.to_notebook()), media_type="application/x-ipynb+json",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.ipynb"'})


# -- files -------------------------------------------------------------------------------------
@router.get("/sessions/{session_id}/files", response_model=FileList, summary="Files in the session's workspace")
async def list_files(request: Request, session_id: str) -> FileList:
    ws = open_session(services_of(request), session_id, request).workspace
    files = await asyncio.to_thread(ws.list)
    return FileList(files=[FileInfo(**asdict(f)) for f in files], usage=sum(f.size for f in files),
                    quota=ws.limits.workspace_bytes)


@router.post("/sessions/{session_id}/files", status_code=201, response_model=FileList,
             summary="Upload files (multipart/form-data; every part with a filename is stored)",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def upload_files(request: Request, session_id: str,
                       path: str | None = Query(None, description="store the (single) file under this name"),
                       ) -> FileList:
    s = services_of(request)

    async def receive(ws: Workspace) -> list[WorkspaceFile]:
        upload = MultipartUpload(request, ws, path)
        try:
            return await upload.receive()
        finally:
            await asyncio.to_thread(upload.cleanup)

    stored, _ = await s.service.receive(api_chat(s, session_id, request), receive)  # announced with the next turn
    workspace = open_session(s, session_id, request).workspace
    usage = await asyncio.to_thread(workspace.usage)
    return FileList(files=[FileInfo(**asdict(f)) for f in stored], usage=usage, quota=workspace.limits.workspace_bytes)


@router.get("/sessions/{session_id}/files/{name:filename}", summary="Download a file",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def download_file(request: Request, session_id: str, name: str) -> Response:
    ws = open_session(services_of(request), session_id, request).workspace
    if not await asyncio.to_thread(ws.exists, name):  # refuses unsafe names with WorkspacePathError (400)
        raise HTTPException(404, f"{name!r}: no such file in the workspace")
    fh = await asyncio.to_thread(ws.open, name)
    # the length is decided once; the sandbox may grow the file meanwhile, so no more is sent
    size = os.fstat(fh.fileno()).st_size
    if size > ws.limits.file_bytes:  # where no file-size limit binds the kernel (a plain local folder)
        fh.close()
        raise HTTPException(409, f"{name!r} is larger than a workspace file may be ({ws.limits.file_bytes:,} bytes)")

    def chunks() -> Iterator[bytes]:  # a plain iterator: Starlette reads it in a worker thread
        left = size
        try:
            while left and (chunk := fh.read(min(1 << 20, left))):
                left -= len(chunk)
                yield chunk
        finally:
            fh.close()

    services_of(request).service.record("file.download", None, {"name": name, "size": size},
                                        user=caller_of(request).name, target=session_id)
    filename = name.rsplit("/", 1)[-1]
    return StreamingResponse(chunks(), media_type=mimetypes.guess_type(filename)[0] or "application/octet-stream",
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
                                      "Content-Length": str(size)})


@router.delete("/sessions/{session_id}/files/{name:filename}", status_code=204, summary="Delete a file")
async def delete_file(request: Request, session_id: str, name: str) -> Response:
    ws = open_session(services_of(request), session_id, request).workspace
    if not await asyncio.to_thread(ws.exists, name):
        raise HTTPException(404, f"{name!r}: no such file in the workspace")
    size = next((f.size for f in await asyncio.to_thread(ws.list) if f.path == name), None)
    await asyncio.to_thread(ws.delete, name)
    services_of(request).service.record("file.delete", None, {"name": name, "size": size},
                                        user=caller_of(request).name, target=session_id)
    return Response(status_code=204)


__all__ = ["Edge", "router", "services_of", "sse"]
