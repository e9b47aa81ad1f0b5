"""Multipart uploads streamed into a session's folder, for ``POST /api/sessions/{id}/files``."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

from sandbox import Session
from sandbox.workspace import split_name


class MultipartUpload:
    """Streams a multipart body into temporary files beside the workspace, never holding more
    than one chunk in memory. Names are checked as soon as a part's headers arrive. The body's
    size is bounded by the server's upload limit before it gets here (``ui.middleware.BodyLimit``)."""

    def __init__(self, request: Request, session: Session, path: str | None) -> None:
        self.request, self.path = request, path
        self.folder = session.folder / "upload-tmp" / uuid.uuid4().hex[:8]
        self.parts: list[tuple[str, Path]] = []
        self._fh = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}

    async def receive(self) -> list[tuple[str, Path]]:
        ctype, params = parse_options_header(self.request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise HTTPException(415, "upload files as multipart/form-data (e.g. curl -F file=@data.csv)")
        if self.path is not None:
            split_name(self.path)
        self.folder.mkdir(parents=True)
        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })
        try:
            async for chunk in self.request.stream():
                await asyncio.to_thread(parser.write, chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise HTTPException(400, f"the multipart body is malformed ({exc}): send multipart/form-data, "
                                "e.g. curl -F file=@data.csv") from None
        if not self.parts:
            raise HTTPException(400, "the multipart body holds no file part (a part with a filename)")
        if self.path is not None:
            if len(self.parts) > 1:
                raise HTTPException(400, "path= names one file, but the upload holds several")
            self.parts = [(self.path, self.parts[0][1])]
        return self.parts

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
            self._fh = None  # a plain form field: ignored
            return
        name = filename.decode("utf-8", "replace")
        if self.path is None:
            split_name(name)  # WorkspacePathError: '..', absolute, NUL ...
        tmp = self.folder / str(len(self.parts))
        self._fh = tmp.open("wb")
        self.parts.append((name, tmp))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None:
            self._fh.write(data[start:end])

    def _part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def cleanup(self) -> None:
        if self._fh is not None:
            self._fh.close()
        for _, tmp in self.parts:
            tmp.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
            self.folder.parent.rmdir()
        except OSError:
            pass
