"""The sandbox for agents, over the Model Context Protocol: an adapter on the conversation service.

``jupybox serve`` serves it at ``/mcp`` over streamable HTTP (behind the server's token, Host and
Origin checks); ``jupybox mcp`` serves the same tools over stdio for a desktop agent. Built on the
official SDK's low-level ``Server``.

State: each MCP session (its ``Mcp-Session-Id``; a stdio process is one) gets a conversation, so a
sandbox session, per name the agent uses (``session``, "default" unless given): key
``mcp:<mcp session>:<name>``. Variables and files persist across calls; all of them are closed when
the MCP session ends (the client's DELETE, the SDK's idle timeout, a crash: ``McpSessions``) or by
the sandbox's idle TTL. Only the initialize-handshake era of the protocol is served:
its 2026-07-28 per-request era has no session to keep a kernel in, so ``server/discover`` is
refused and clients fall back to the handshake; a request carrying another era's
``MCP-Protocol-Version`` is refused with a 400 before it is read (``McpSessions``), so every
request's session is one the transport made and checked.

Results are for a model to read: text capped with head and tail kept (and a count of what was
dropped), a failing cell ``isError`` with its ANSI-free traceback, images as image content scaled
under a byte cap with the workspace path of the full-size file. A long cell sends progress; a
client's cancellation interrupts the kernel (variables stay); a timeout interrupts, then restarts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import mimetypes
import re
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import anyio
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import Receive, Scope, Send

from interpreter import ConversationService
from sandbox import Caller, Execution, JupyboxError
from sandbox.errors import QuotaExceeded
from sandbox.models import clip
from sandbox.workspace import split_name

from .mcp_tools import SCHEMAS, TOOLS, ToolArgs, ToolError
from .ownership import caller_of

log = logging.getLogger(__name__)

SOURCE = "mcp"
SCHEME = "jupybox"


@dataclass
class McpLimits:
    """What one tool result may carry, so that it fits a model's context and a client's buffers."""

    text_chars: int = 20_000  # a cell's text, head and tail kept
    image_b64_chars: int = 60_000  # one image, base64 (clients choke past ~70k characters)
    max_images: int = 4  # per result
    # read_file: text inline up to this (JSON may escape a control character in 6 bytes), binary as
    # base64 up to that; both keep a result under the 1 MiB event the official client accepts
    inline_text_bytes: int = 128 << 10
    inline_blob_bytes: int = 760_000  # base64: 1,013,336 characters
    image_pixels: int = 16_000_000  # an image is decoded (to scale it) only up to this many pixels
    progress_every_s: float = 2.0


class JupyboxMcp:
    """The MCP server's handlers, on one conversation service."""

    def __init__(self, service: ConversationService, limits: McpLimits | None = None,
                 files_url: str | None = None, handshake_only: bool = True) -> None:
        self.service = service
        self.limits = limits or McpLimits()
        self.files_url = files_url  # where a too-large file can be downloaded (the server's files API)
        self.server: Server[Any] = Server(
            "jupybox", version="0.1.0", title="jupybox sandboxed Python",
            instructions=("A stateful, sandboxed Python (Jupyter kernel with pandas, numpy, matplotlib, "
                          "scikit-learn...) with a workspace folder at /mnt/data and no network. Variables and "
                          "files persist across calls in the same `session`."),
            on_list_tools=self._list_tools, on_call_tool=self._call_tool,
            on_list_resources=self._list_resources, on_read_resource=self._read_resource)
        if handshake_only:  # over HTTP: sessions keep kernels (stdio has one client, either era does)
            self.server.add_request_handler("server/discover", types.RequestParams, _handshake_only)

    # -- clients and their conversations ----------------------------------------------------
    def _key(self, ctx: Any, name: str) -> str:
        """The conversation key of sandbox ``name`` for this request's MCP session."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
            raise ToolError(f"session names are 1-40 letters, digits, '.', '_' or '-'; got {name!r}")
        return f"{_prefix(_client_of(ctx))}{name}"

    def _sandboxes(self, client: str) -> dict[str, str]:
        """The names of an MCP session's sandboxes and their conversation keys: the service's
        conversations under the session's prefix (no list of our own to drift from it)."""
        prefix = _prefix(client)
        return {c.key[len(prefix):]: c.key for c in self.service.chats_of(prefix)}

    async def session_ended(self, client: str) -> None:
        """Close every sandbox of an MCP session that ended (idempotent)."""
        for name, key in self._sandboxes(client).items():
            try:
                await self.service.close(key)
            except Exception:  # noqa: BLE001 - one sandbox's failure must not keep the others open
                log.exception("closing the sandbox %r of MCP session %s", name, client)

    async def _workspace(self, ctx: Any, name: str):
        chat = self.service.open(self._key(ctx, name), SOURCE, caller=_caller_of(ctx))
        session, note = await self.service.session(chat)
        return session, note

    # -- tools ------------------------------------------------------------------------------
    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        with_model = self.service.llm is not None
        return types.ListToolsResult(tools=[t for t in TOOLS if with_model or t.name != "ask"])

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in SCHEMAS or (params.name == "ask" and self.service.llm is None):
            raise MCPError(types.INVALID_PARAMS, f"no tool {params.name!r}: list_tools names them")
        handler = getattr(self, f"_tool_{params.name}")
        caller = _caller_of(ctx)
        result = "ok"
        try:
            args = ToolArgs.parse(params.name, params.arguments or {})
            answer = await handler(ctx, args)
            result = "error" if answer.is_error else "ok"
            return answer
        except ToolError as exc:
            result = "refused"
            return _error(str(exc))
        except JupyboxError as exc:  # the sandbox's words: a full host, a bad path, a quota...
            result = "refused"
            return _error(str(exc))
        finally:
            session = str((params.arguments or {}).get("session"))[:40]
            self.service.record("mcp.tool", None, {"tool": params.name, "session": session}, result=result,
                                user=caller.name if caller else None, target=f"mcp:{session}")

    async def _tool_run_python(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        chat = self.service.open(self._key(ctx, args.session), SOURCE, caller=_caller_of(ctx))
        notes: list[str] = []
        execution: Execution | None = None
        outputs = 0
        started = time.monotonic()
        ticker = asyncio.ensure_future(self._progress(ctx, started, args.timeout_s, lambda: outputs))
        try:
            async with aclosing(self.service.execute(chat, args.code, args.timeout_s)) as events:
                async for event in events:  # a cancelled call closes this: the kernel is interrupted
                    if event.type == "notice":
                        notes.append(event.text or "")
                    elif event.type == "output":
                        outputs += 1
                    elif event.type == "execution":
                        execution = event.execution
        finally:
            ticker.cancel()
        assert execution is not None
        ws = await self.service.workspace(chat.key)
        content = [types.TextContent(text="\n".join([*notes, self._render(execution)]).strip() or "(no output)")]
        content += await self._images(execution, ws)
        return types.CallToolResult(content=content, is_error=not execution.ok)

    async def _progress(self, ctx: Any, started: float, timeout: float, outputs: Any) -> None:
        """Tell the client the cell still runs (clients reset their own timeouts on progress)."""
        while True:
            await asyncio.sleep(self.limits.progress_every_s)
            elapsed = time.monotonic() - started
            try:
                await ctx.session.report_progress(round(elapsed, 1), timeout,
                                                  f"running for {elapsed:.0f} s, {outputs()} output(s) so far")
            except Exception:  # noqa: BLE001 - no progress token, or the client went: the cell goes on
                return

    def _render(self, ex: Execution) -> str:
        """A cell's outputs as a model reads them: streams, results (tables as text), the error's
        traceback, the notes (timeouts, restarts, truncation), within the text cap."""
        parts = [out.plain_text() for out in ex.outputs if not out.is_image]
        parts += [f"[{note}]\n" for note in ex.notes()]
        return clip("".join(parts).strip("\n"), self.limits.text_chars)

    async def _images(self, ex: Execution, ws: Any) -> list[types.ImageContent | types.TextContent]:
        found: list[types.ImageContent | types.TextContent] = []
        for img in ex.images[:self.limits.max_images]:
            if ws is None or img.mime not in ("image/png", "image/jpeg", "image/gif"):
                continue
            try:
                raw = await asyncio.to_thread(ws.read, img.path, ws.limits.max_image_bytes)
                data, mime = await asyncio.to_thread(fit_image, raw, img.mime, self.limits.image_b64_chars,
                                                     self.limits.image_pixels)
            except (ImageRefused, JupyboxError) as exc:
                found.append(types.TextContent(text=f"[image {img.path} is not shown: {exc}]"))
                continue
            if data is None:
                found.append(types.TextContent(text=f"[image {img.path} is too large to show; read it from the workspace]"))
                continue
            found.append(types.ImageContent(data=base64.b64encode(data).decode(), mime_type=mime))
            found.append(types.TextContent(text=f"[full-size image in the workspace: {img.path}]"))
        if len(ex.images) > self.limits.max_images:
            found.append(types.TextContent(text=f"[{len(ex.images) - self.limits.max_images} more images in figures/]"))
        return found

    async def _tool_list_files(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        session, _ = await self._workspace(ctx, args.session)
        files = await asyncio.to_thread(session.workspace.list)
        lines = [f"{f.path}\t{f.size} bytes" for f in files] or ["(the workspace is empty)"]
        total = sum(f.size for f in files)
        lines.append(f"-- {len(files)} file(s), {total:,} of {session.workspace.limits.workspace_bytes:,} bytes "
                     "used; the code sees them in /mnt/data (the working directory)")
        return types.CallToolResult(content=[types.TextContent(text="\n".join(lines))])

    async def _tool_read_file(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        session, _ = await self._workspace(ctx, args.session)
        return types.CallToolResult(content=[await self._file_content(session, args.session, args.path)])

    async def _file_content(self, session: Any, name: str, path: str) -> types.TextContent | types.EmbeddedResource:
        ws = session.workspace
        split_name(path)  # WorkspacePathError for '..', an absolute path, NUL
        if not await asyncio.to_thread(ws.exists, path):
            raise ToolError(f"{path!r}: no such file in the workspace (list_files shows what is there)")
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        try:  # what is read is bounded, whatever size the listing saw: the kernel can change the file
            raw = await asyncio.to_thread(ws.read, path, self.limits.inline_blob_bytes)
        except QuotaExceeded:
            where = (f"download it from {self.files_url}/{session.id}/files/{path}" if self.files_url
                     else "process it with run_python where it is")
            listed = next((f.size for f in await asyncio.to_thread(ws.list) if f.path == path), None)
            size = f"{listed:,} bytes" if listed is not None else "larger"  # as listed: words only
            raise ToolError(f"{path!r} is {size}, more than a tool result carries "
                            f"({self.limits.inline_blob_bytes:,}): {where}") from None
        if len(raw) <= self.limits.inline_text_bytes:
            try:
                return types.TextContent(text=raw.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        return types.EmbeddedResource(resource=types.BlobResourceContents(
            uri=_uri(name, path), mime_type=mime, blob=base64.b64encode(raw).decode()))

    async def _tool_write_file(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        try:
            data = base64.b64decode(args.content, validate=True) if args.encoding == "base64" else args.content.encode()
        except ValueError:
            raise ToolError("content is not valid base64 (encoding='base64')") from None
        stored, _ = await self.service.upload(self._key(ctx, args.session), SOURCE, args.path, data,
                                              caller=_caller_of(ctx))  # announced to `ask`
        return types.CallToolResult(content=[types.TextContent(
            text=f"wrote {stored.size:,} bytes to {stored.path} (the code sees /mnt/data/{stored.path})")])

    async def _tool_restart_session(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        session, _ = await self._workspace(ctx, args.session)
        await session.restart()
        return types.CallToolResult(content=[types.TextContent(
            text=f"session {args.session!r} has a fresh kernel: variables are gone, files are kept")])

    async def _tool_close_session(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        await self.service.close(self._key(ctx, args.session))
        return types.CallToolResult(content=[types.TextContent(
            text=f"session {args.session!r} is closed: its kernel and files are gone")])

    async def _tool_ask(self, ctx: Any, args: ToolArgs) -> types.CallToolResult:
        key = self._key(ctx, args.session)
        self.service.open(key, SOURCE, caller=_caller_of(ctx))
        settings = self.service.settings
        if args.max_executions is not None:
            settings = replace(settings, max_executions=args.max_executions)
        turn = await self.service.turn(key, SOURCE, args.question, settings)
        cells: list[str] = []
        executions: list[Execution] = []
        answer, error, code = None, None, ""
        async with aclosing(turn.events()) as events:
            async for event in events:
                if event.type == "code":
                    code = event.code or ""
                elif event.type == "execution" and event.execution is not None:
                    executions.append(event.execution)
                    cells.append(f"```python\n{code}\n```\n{self._render(event.execution)}")
                elif event.type == "answer":
                    answer = event.text
                elif event.type == "error":
                    error = event.text
        text = "\n\n".join([*(f"Cell {i}:\n{c}" for i, c in enumerate(cells, 1)),
                            f"Answer: {answer}" if answer is not None else f"Stopped: {error}"])
        if turn.finish_reason == "length":
            text += "\n[the answer was cut at the model's token limit]"
        ws = await self.service.workspace(key)
        content: list[Any] = [types.TextContent(text=clip(text, self.limits.text_chars))]
        for ex in executions:
            content += await self._images(ex, ws)
        return types.CallToolResult(content=content, is_error=answer is None)

    # -- resources: the workspaces' files -------------------------------------------------
    async def _list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        client = _client_of(ctx)
        resources = []
        for name, key in sorted(self._sandboxes(client).items()):
            ws = await self.service.workspace(key)
            for f in await asyncio.to_thread(ws.list) if ws is not None else []:
                resources.append(types.Resource(uri=_uri(name, f.path), name=f.path, size=f.size,
                                                mime_type=mimetypes.guess_type(f.path)[0] or "application/octet-stream",
                                                description=f"{f.path} in the workspace of session {name!r}"))
        return types.ListResourcesResult(resources=resources)

    async def _read_resource(self, ctx: Any, params: Any) -> types.ReadResourceResult:
        uri = str(params.uri)
        m = re.fullmatch(rf"{SCHEME}://files/([A-Za-z0-9_.-]+)/(.+)", uri)
        if m is None:
            raise MCPError(types.INVALID_PARAMS, f"not a jupybox file: {uri!r} (list_resources names them)")
        try:
            session, _ = await self._workspace(ctx, m.group(1))
            content = await self._file_content(session, m.group(1), m.group(2))
        except (ToolError, JupyboxError) as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        if isinstance(content, types.TextContent):
            return types.ReadResourceResult(contents=[types.TextResourceContents(
                uri=uri, text=content.text, mime_type=mimetypes.guess_type(uri)[0] or "text/plain")])
        return types.ReadResourceResult(contents=[content.resource])

    # -- transports -------------------------------------------------------------------------
    async def run_stdio(self) -> None:
        from mcp.server.stdio import stdio_server

        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())


def _caller_of(ctx: Any) -> Caller | None:
    """Who calls: the user of the HTTP request (``None`` for the one client of a stdio server)."""
    request = getattr(ctx, "request", None)
    return caller_of(request) if request is not None else None


def _client_of(ctx: Any) -> str:
    """Which MCP session a request belongs to: its ``Mcp-Session-Id`` (the SDK's transport has
    checked it names this very session), or ``stdio`` for the one client of a stdio server. An
    HTTP request without a session (the per-request protocol era) has no state to be given."""
    request = getattr(ctx, "request", None)
    if request is None:
        return "stdio"
    sid = request.headers.get("mcp-session-id")
    if not sid:
        raise MCPError(types.INVALID_REQUEST, "jupybox keeps a kernel per MCP session: connect with the initialize "
                                              "handshake (protocol 2025-11-25), which gives the session an id")
    return sid


class McpSessions(StreamableHTTPSessionManager):
    """The SDK's streamable-HTTP session manager, telling the adapter when an MCP session ends,
    however it ends (the client's DELETE, the idle timeout, a crash), so its sandboxes close."""

    def __init__(self, adapter: JupyboxMcp, **options: Any) -> None:
        super().__init__(adapter.server, **options)
        self.adapter = adapter
        self._inner, self.asgi_app = self.asgi_app, self._handshake_era_only  # what /mcp's route calls

    async def _handshake_era_only(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Only the initialize-handshake era: there the SDK's transport checks that a request's
        ``Mcp-Session-Id`` names a session it made, which is what ``_client_of`` relies on. A request
        of another era (whose session header nothing checks) is refused before it is read."""
        version = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"mcp-protocol-version"), None)
        if scope["type"] == "http" and version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {
                "code": types.INVALID_REQUEST,
                "message": (f"protocol version {version[:40]!r} is not served: jupybox keeps a kernel per MCP session "
                            f"and serves the initialize handshake ({', '.join(HANDSHAKE_PROTOCOL_VERSIONS)})")}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        # The SDK binds an MCP session to the principal that opened it, and answers its id replayed
        # with any other credential exactly as an unknown one (404): the principal is the user.
        caller = caller_of(scope)
        scope["user"] = AuthenticatedUser(AccessToken(token="-", client_id=caller.name, scopes=[]))
        await self._inner(scope, receive, send)

    async def _discard_session(self, session_id: str, transport: Any) -> None:
        await super()._discard_session(session_id, transport)
        with anyio.CancelScope(shield=True):
            await self.adapter.session_ended(session_id)


def _prefix(client: str) -> str:
    """The start of the conversation keys of an MCP session's sandboxes: ``mcp:<client>:<name>``."""
    return f"{SOURCE}:{client}:"


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def _uri(session: str, path: str) -> str:
    return f"{SCHEME}://files/{session}/{path}"


async def _handshake_only(ctx: Any, params: Any) -> Any:
    raise MCPError(types.METHOD_NOT_FOUND, "this server speaks the initialize handshake (sessions keep kernels)")


# what the scaler decodes: the three formats kernels' plots come in, each only as what it is labelled
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF"}
_DECODING = threading.BoundedSemaphore(2)  # at most two images decoded at once, server-wide


class ImageRefused(ValueError):
    """An image from the sandbox that the server will not decode: another format than its label,
    or more pixels than allowed."""


def fit_image(data: bytes, mime: str, b64_cap: int, max_pixels: int = 16_000_000) -> tuple[bytes | None, str]:
    """``data`` as is when its base64 fits ``b64_cap``; else scaled down (PNG, then JPEG) until it
    does; None when even a small thumbnail does not. The bytes come from the sandbox: only the
    format of ``mime`` is decoded, and only up to ``max_pixels`` (checked from the header, before
    decoding), else ``ImageRefused``."""
    if len(data) * 4 // 3 + 4 <= b64_cap:
        return data, mime
    from PIL import Image, UnidentifiedImageError

    fmt = IMAGE_FORMATS.get(mime)
    if fmt is None:
        raise ImageRefused(f"{mime} images are not scaled")
    with _DECODING:
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
            if image.width * image.height > max_pixels:
                raise ImageRefused(f"{image.width}x{image.height} is more than {max_pixels:,} pixels")
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
            raise ImageRefused(f"not a readable {fmt} image ({type(exc).__name__})") from None
        budget = b64_cap * 3 // 4
        scale = min(1.0, (budget / len(data)) ** 0.5)
        for _ in range(8):
            size = (max(int(image.width * scale), 16), max(int(image.height * scale), 16))
            small = image.resize(size, Image.LANCZOS)
            for out_fmt, out_mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
                buf = io.BytesIO()
                if out_fmt == "JPEG":
                    small.convert("RGB").save(buf, out_fmt, quality=80, optimize=True)
                else:
                    small.save(buf, out_fmt, optimize=True)
                if buf.tell() <= budget:
                    return buf.getvalue(), out_mime
            scale *= 0.7
    return None, mime


__all__ = ["ImageRefused", "JupyboxMcp", "McpLimits", "McpSessions", "fit_image"]
