"""What the browser UI takes from a client: checked here, by jupybox, not left to Gradio.

Gradio copies any file a request names (a JSON object with a ``"path"``) into its cache before a
handler runs, and serves the copy; its own check of such paths is skipped for an app mounted with
``mount_gradio_app``, which never counts as launched. A client could so read any host file the
server can. Two checks close that, both ours:

- ``GradioGate`` (ASGI): only the Gradio routes the page and ``gradio_client`` use are served
  (Gradio's run history, its URL proxy, its monitoring and editor routes are not); a file a request
  body names must be one the upload route stored (``UploadCache.check``) for the same user; ``file=``
  serves only files in the UI's own folder, never a URL, and a tab's files only to its user. A refusal is a 400/404 before Gradio sees the request.
- ``UploadCache.open`` is how the handlers read what they are given: the same check, then the
  file is opened with ``O_NOFOLLOW``.

The UI's folder (uploads, and the copies of workspace files the page shows) is private to the
server's user: ``<home>/ui``, mode 0700, set as Gradio's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox import JupyboxError

from .metrics import Metrics
from .middleware import InvalidText, check_text, refuse
from .ownership import caller_of, tab_prefix

log = logging.getLogger(__name__)

PREFIX = "/gradio_api"
# (methods, path after the prefix): what the page and gradio_client call; everything else is refused
ROUTES = [
    ({"GET", "HEAD"}, re.compile(r"/(info|app_id|login_check|user|startup-events|upload_progress|queue/data)/?")),
    ({"GET", "HEAD"}, re.compile(r"/heartbeat/[\w-]+")),
    ({"GET", "HEAD"}, re.compile(r"/call/[\w-]+/[\w-]+")),
    ({"GET", "HEAD"}, re.compile(r"/file=.+")),
    ({"POST"}, re.compile(r"/(queue/join|upload|cancel|reset)/?")),
    ({"POST"}, re.compile(r"/(call|run|api)/[\w-]+/?")),
]
OTHER_REFUSED = ("/monitoring",)  # Gradio's analytics pages, outside the prefix
UPLOAD_ANSWER_BYTES = 1 << 20  # the upload route's answer read at most (a list of paths)
UPLOADERS_KEPT = 100_000


class UploadRefused(JupyboxError):
    """A client named a file it did not upload through the page."""


@dataclass
class UploadCache:
    """The UI's private folder and the uploads Gradio's upload route recorded in it."""

    folder: Path
    limit_bytes: int = 2 << 30  # what uploads and shown copies may take in all (Gradio prunes after an hour)
    recorded: set[str] = field(default_factory=set)  # Gradio's ``Blocks.upload_file_set``, once mounted

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self.folder = self.folder.resolve()

    def usage(self) -> int:
        """Bytes of the regular files below the folder (walked without following symlinks). Uploads
        whose files are gone (Gradio removes them after an hour) are forgotten on the way, so the
        record of a long-running server stays the size of what is actually there."""
        for path in list(self.recorded):  # one C-level copy: safe while Gradio's threads add to it
            if not os.path.lexists(path):
                self.recorded.discard(path)
        total, stack = 0, [str(self.folder)]
        while stack:
            try:
                with os.scandir(stack.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
        return total

    def inside(self, path: str) -> bool:
        """``path`` is a regular file below the folder, reached without a symlink or ``..``."""
        if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path) or os.path.normpath(path) != path:
            return False
        try:
            rest = Path(path).relative_to(self.folder)
        except ValueError:
            return False
        current = self.folder
        for part in rest.parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except OSError:
                return False
            if stat.S_ISLNK(mode):
                return False
        return stat.S_ISREG(mode) if rest.parts else False

    def check(self, path: str) -> None:
        """Raise ``UploadRefused`` unless ``path`` is a file this server's upload route stored."""
        if not (isinstance(path, str) and path in self.recorded and self.inside(path)):
            raise UploadRefused("only files uploaded through this page can be added: upload the file again")

    def open(self, path: str) -> BinaryIO:
        """An upload, checked, opened without following a symlink."""
        self.check(path)
        try:
            return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
        except OSError:
            raise UploadRefused("the uploaded file is gone: upload it again") from None


def file_references(value: Any) -> list[Any]:
    """Every ``path`` in a JSON document's objects: how Gradio's requests name files."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                found.append(item["path"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


class GradioGate:
    """Pure ASGI, around the whole app: see the module docstring."""

    def __init__(self, app: ASGIApp, cache: UploadCache, metrics: Metrics) -> None:
        self.app = app
        self.cache = cache
        self.metrics = metrics
        # who uploaded each file the upload route stored: a request may name only its user's own
        self.uploaders: OrderedDict[str, str] = OrderedDict()

    async def _recording_uploader(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The upload route, its answer (a JSON list of the stored paths) read to note their user."""
        user = caller_of(scope).name
        status, body = 0, b""

        async def noting_send(message: Message) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200 and len(body) < UPLOAD_ANSWER_BYTES:
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    self._note_uploads(body, user)
            await send(message)

        await self.app(scope, receive, noting_send)

    def _note_uploads(self, body: bytes, user: str) -> None:
        try:
            paths = json.loads(body)
        except ValueError:
            return
        for path in paths if isinstance(paths, list) else []:
            if isinstance(path, str):
                self.uploaders[path] = user
        while len(self.uploaders) > UPLOADERS_KEPT:  # Gradio removes uploads after an hour anyway
            self.uploaders.popitem(last=False)

    def _theirs(self, scope: Scope, path: str) -> bool:
        """A tab's served copy goes only to the tab's user (another's answers as a missing file)."""
        top = Path(path).relative_to(self.cache.folder).parts[0]
        return not top.startswith("tab-") or top.startswith(tab_prefix(caller_of(scope)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(PREFIX + "/") or path.startswith(OTHER_REFUSED)):
            await self.app(scope, receive, send)
            return
        method, rest = scope["method"], path[len(PREFIX):]
        if not path.startswith(PREFIX) or not any(method in m and r.fullmatch(rest) for m, r in ROUTES):
            log.info("refused %s %s: not a route of this UI", method, path)
            await refuse(scope, receive, send, self.metrics, 404, f"no route {method} {path}")
            return
        if rest.startswith("/file="):
            named = rest[len("/file="):]  # the ASGI path is decoded already
            if not self.cache.inside(named) or not self._theirs(scope, named):
                await refuse(scope, receive, send, self.metrics, 404, "no such file")
                return
        if rest.startswith("/upload") and method == "POST":
            used = await asyncio.to_thread(self.cache.usage)
            announced = int(Headers(scope=scope).get("content-length", "0") or 0)
            if used + announced > self.cache.limit_bytes:
                await refuse(scope, receive, send, self.metrics, 507,
                             f"the page's upload space is full ({used >> 20} of {self.cache.limit_bytes >> 20} MiB): "
                             "try again later (old uploads are removed after an hour), or raise JUPYBOX_UI_CACHE_MB")
                return
        if method == "POST" and rest.startswith("/upload"):
            await self._recording_uploader(scope, receive, send)
            return
        if method != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if body:
            try:
                document = json.loads(body)
                check_text(document)
            except InvalidText as exc:
                await refuse(scope, receive, send, self.metrics, 400, str(exc))
                return
            except ValueError:
                await refuse(scope, receive, send, self.metrics, 400, "the request body is not valid JSON")
                return
            user = caller_of(scope).name
            for reference in file_references(document):
                try:
                    self.cache.check(reference)
                    if self.uploaders.get(reference) != user:  # another user's upload, named as its path
                        raise UploadRefused("only files uploaded through this page can be added: upload the file "
                                            "again")
                except UploadRefused as exc:
                    log.warning("refused %s %s: it names %r, not an upload of this page", method, path,
                                str(reference)[:200])
                    await refuse(scope, receive, send, self.metrics, 400, str(exc))
                    return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
