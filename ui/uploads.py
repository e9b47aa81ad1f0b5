"""Multipart uploads streamed into a session's workspace, for ``POST /api/sessions/{id}/files``."""

from __future__ import annotations

import asyncio

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

from sandbox import Workspace, WorkspaceFile
from sandbox.workspace import WorkspaceWriter, split_name


class MultipartUpload:
    """Streams each file part of a multipart body straight into the workspace, never holding more
    than one chunk in memory: the bytes land beside their final names within the workspace's
    quota (on its own filesystem where it has one), not on the host's disk. Names are checked as
    soon as a part's headers arrive. Every file is put in place once the whole body has arrived,
    or none is. The body's size is bounded by the server's upload limit before it gets here
    (``ui.middleware.BodyLimit``). The parser and the writes run off the event loop."""

    def __init__(self, request: Request, workspace: Workspace, path: str | None) -> None:
        self.request, self.workspace, self.path = request, workspace, path
        self.writers: list[WorkspaceWriter] = []
        self._current: WorkspaceWriter | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}

    async def receive(self) -> list[WorkspaceFile]:
        ctype, params = parse_options_header(self.request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise HTTPException(415, "upload files as multipart/form-data (e.g. curl -F file=@data.csv)")
        if self.path is not None:
            split_name(self.path)
        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })
        try:
            async for chunk in self.request.stream():
                await asyncio.to_thread(parser.write, chunk)
            await asyncio.to_thread(parser.finalize)
        except MultipartParseError as exc:
            raise HTTPException(400, f"the multipart body is malformed ({exc}): send multipart/form-data, "
                                "e.g. curl -F file=@data.csv") from None
        if not self.writers:
            raise HTTPException(400, "the multipart body holds no file part (a part with a filename)")
        return await asyncio.to_thread(self._commit)

    def _commit(self) -> list[WorkspaceFile]:
        stored = []
        while self.writers:
            stored.append(self.writers[0].commit())
            self.writers.pop(0)
        return stored

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            self._current = None  # a plain form field: ignored
            return
        if self.path is not None and self.writers:
            raise HTTPException(400, "path= names one file, but the upload holds several")
        name = self.path if self.path is not None else filename.decode("utf-8", "replace")
        self._current = self.workspace.writer(name)  # WorkspacePathError: '..', absolute, NUL ...
        self.writers.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])  # QuotaExceeded as soon as a quota is passed

    def _part_end(self) -> None:
        self._current = None

    def cleanup(self) -> None:
        """Remove what an upload that failed half-way wrote (blocking: call it off the loop)."""
        for writer in self.writers:
            writer.abort()
        self.writers.clear()
