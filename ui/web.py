"""The browser UI: a Gradio chat over the interpreter, one sandbox session per browser tab.

``build_ui(services)`` returns the Blocks; the HTTP app mounts it (``mount_ui`` does that with the
theme and options the page needs: local fonts only, nothing fetched from other hosts). A tab's
session (kernel and workspace) starts on its first upload or question.

Where sessions are durable (``jupybox serve``'s default), a session outlives its tab: a tab that
closes or reloads only forgets its conversation (the manager pauses the idle session, and deletes
it after its retention), "New session" starts another one, and the page lists its user's earlier
conversations ("History"): picking one shows it again from its record and continues it in its
session; "Delete" closes it for good. A page that loads reopens the newest conversation of its
user that no other tab holds, so a reload shows what was there. Elsewhere a session is closed when
its tab closes, on "New session", or by the sandbox manager's idle TTL.

Named API endpoints (for ``gradio_client``): ``/ask``, ``/upload``, ``/stop``, ``/new_session``,
``/files``, ``/notebook``, ``/reopen``, ``/delete_session``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import nbformat  # noqa: E402

from interpreter import FORMATS, Chat, Conversation, ConversationService, InterpreterSettings  # noqa: E402
from sandbox import Caller, Execution, JupyboxError, SessionClosed, Workspace  # noqa: E402
from sandbox.errors import QuotaExceeded  # noqa: E402
from sandbox.workspace import WorkspaceFile  # noqa: E402
from store import SessionRecord  # noqa: E402

from .auth import identity_of  # noqa: E402
from .ownership import caller_for, owned_key, tab_prefix  # noqa: E402
from .services import Services  # noqa: E402
from .web_guard import UploadCache  # noqa: E402
from .web_history import ENDED, GONE, TAKEN, EarlierConversations, page_key, session_id_of  # noqa: E402
from .web_render import (  # noqa: E402
    ICON_CSS,
    TurnView,
    figure_content,
    history_label,
    notice_message,
    question_message,
    replay,
)

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).with_name("examples")
EXAMPLE_DATA = EXAMPLES_DIR / "sales.csv"
EXAMPLE_PROMPTS: list[dict[str, str]] = json.loads((EXAMPLES_DIR / "prompts.json").read_text("utf-8"))
UPLOAD_TYPES = [".csv", ".tsv", ".xlsx", ".xls", ".json", ".txt", ".md", ".parquet", "image"]
SANS = ["Noto Sans", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei",
        "Helvetica", "Arial", "sans-serif"]
MONO = ["DejaVu Sans Mono", "Menlo", "Consolas", "monospace"]
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]
CSS = """
#jb-chat .message-wrap table { font-size: 0.85em; }
#jb-chat img { max-width: 100%; }
""" + ICON_CSS
STREAM_INTERVAL_S = 0.05  # the fastest the page is repainted while text streams
UNKNOWN = Caller("(unknown)")  # a page request without an identity shares nothing with anyone


def page_caller(request: gr.Request | None) -> Caller:
    """The user of a page event: the identity the server's authentication put into the scope of
    the HTTP request behind it (a user's key, from their cookie)."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    identity = identity_of(scope) if isinstance(scope, dict) else None
    return caller_for(identity) if identity is not None else UNKNOWN


def theme() -> gr.themes.Theme:
    """The default look with fonts the browser already has (a CJK one included): no web fonts."""
    return gr.themes.Default(font=SANS, font_mono=MONO)


def mount_options(services: Services | None = None) -> dict[str, Any]:
    """Keyword arguments ``gradio.mount_gradio_app`` needs for this UI; with ``services``, uploads
    through the page are bounded by the server's upload limit (the page refuses larger files
    before sending them, the server refuses them if sent)."""
    options: dict[str, Any] = {"theme": theme(), "css": CSS, "show_error": True}
    if services is not None:
        options["max_file_size"] = services.settings.upload_limit_mb << 20
    return options


def mount_ui(app: Any, services: Services, cache: UploadCache) -> Any:
    """Mount the UI on a FastAPI ``app`` at ``/``, its files in ``cache.folder`` (private to the
    server's user). Requests must pass ``ui.web_guard.GradioGate`` (the server adds it)."""
    # Gradio reads its folder from the environment when its Blocks and its app are made
    os.environ["GRADIO_TEMP_DIR"] = str(cache.folder)
    blocks = build_ui(services, cache)
    blocks.run_history = False  # Gradio would keep every turn in the browser, or upload it to a hub bucket
    mounted = gr.mount_gradio_app(app, blocks, path="/", **mount_options(services))
    cache.recorded = blocks.upload_file_set
    return mounted


@dataclass
class Tab:
    """One browser tab: what the page shows (the chat, the copies of files it serves). Its
    conversation lives in the conversation service under ``key``."""

    key: str
    folder: Path  # below which the tab's served copies are made
    caller: Caller = field(default_factory=lambda: UNKNOWN)  # whose tab it is: its session and files are theirs
    history: list[dict] = field(default_factory=list)
    # path -> (size, mtime) the copy was made of, and the bytes it holds on the host
    copies: dict[str, tuple[int, float, int]] = field(default_factory=dict)
    refused: dict[str, tuple[int, float]] = field(default_factory=dict)  # not served: over the budget
    session_id: str | None = None  # the session whose conversation the page shows, once it has one
    # counts "New session"s: each starts a conversation under a key of its own, since the service
    # brings back the session whose record names a conversation's key
    started: int = 0
    _served: Path | None = None

    @property
    def conversation_key(self) -> str:
        return page_key(self.caller, f"{self.key}#{self.started}")

    @property
    def served(self) -> Path:
        """Where Gradio may serve this tab's files from: a temporary folder made on first use (a
        page that never shows a file leaves nothing behind)."""
        if self._served is None or not self._served.is_dir():
            self._served = Path(tempfile.mkdtemp(prefix=tab_prefix(self.caller), dir=self.folder))
        return self._served

    def forget_files(self) -> None:
        self.copies.clear()
        self.refused.clear()
        if self._served is not None:
            shutil.rmtree(self._served, ignore_errors=True)
            self._served = None

    def forget_missing(self, present: set[str]) -> None:
        """Drop the copies of files no longer in the workspace (their bytes no longer count)."""
        for name in [n for n in self.copies if n not in present]:
            del self.copies[name]
            if self._served is not None:
                (self._served / name).unlink(missing_ok=True)
        for name in [n for n in self.refused if n not in present]:
            del self.refused[name]

    def __deepcopy__(self, memo: dict) -> Tab:
        return self  # Gradio copies state values; a tab owns live resources and is never copied


class WebUI:
    """The handlers behind the page: translations between Gradio's events and the conversation
    service's calls and events."""

    def __init__(self, services: Services, cache: UploadCache) -> None:
        self.services = services
        self.cache = cache
        self.tabs: dict[str, Tab] = {}  # by Gradio session hash, to close them on unload
        self.earlier = EarlierConversations(services.service)

    @property
    def service(self) -> ConversationService:
        return self.services.service

    # -- tabs -------------------------------------------------------------------------------
    def tab(self, tab: Tab | None, request: gr.Request | None) -> Tab:
        """The page's tab, its user's own: a tab state of another user (a page session id sent
        with another key) is never handed out, a fresh tab is."""
        caller = page_caller(request)
        if tab is None or tab.caller.name != caller.name:
            key = getattr(request, "session_hash", None) or uuid.uuid4().hex
            slot = self._slot(caller, key)
            tab = self.tabs.get(slot) or Tab(key, self.cache.folder, caller)
            self.tabs[slot] = tab
        return tab

    def _slot(self, caller: Caller, key: str) -> str:
        """Where a tab is kept in ``tabs``: under its page session id, or beside another user's
        tab of the same id (a replayed id) under one that holds the user too."""
        held = self.tabs.get(key)
        return key if held is None or held.caller.name == caller.name else owned_key(caller, key)

    def banner(self) -> str:
        if self.service.llm is None:
            return ("### No language model is available\n\n"
                    f"{self.service.model_error or 'No model is configured.'}\n\n"
                    "You can still upload files and browse the workspace; questions need a model.")
        return ""

    def model_name(self) -> str:
        return self.service.model_name

    @property
    def durable(self) -> bool:
        """Whether sessions outlive their tabs (see the module's docstring)."""
        return self.services.manager.durable

    async def close_tab(self, tab: Tab) -> None:
        """A tab that goes away (or starts anew): its conversation is forgotten, and its session
        kept where sessions are durable, closed elsewhere; the copies it served are removed."""
        if self.durable:
            self.service.forget(tab.conversation_key)
        else:
            await self.service.close(tab.conversation_key)
        await asyncio.to_thread(tab.forget_files)

    def chat_of(self, tab: Tab, fmt: str) -> Chat:
        return self.service.open(tab.conversation_key, "web", fmt=fmt if fmt in FORMATS else None, caller=tab.caller)

    # -- earlier conversations --------------------------------------------------------------
    async def own_history(self, tab: Tab) -> list[SessionRecord]:
        """The tab's user's earlier conversations (none where sessions end with their tabs, or
        for a page without an identity)."""
        if not self.durable or tab.caller.name == UNKNOWN.name:
            return []
        return await self.earlier.of(tab.caller)

    async def history_update(self, tab: Tab, records: list[SessionRecord] | None = None) -> Any:
        """The history's choices (label, session id), the tab's own conversation selected."""
        if not self.durable:
            return gr.update()
        records = await self.own_history(tab) if records is None else records
        now = time.time()
        shown = tab.session_id if any(r.id == tab.session_id for r in records) else None
        return gr.update(choices=[(history_label(r, now), r.id) for r in records], value=shown)

    async def open_earlier(self, tab: Tab, session_id: str, records: list[SessionRecord]) -> bool:
        """Show an earlier conversation (``EarlierConversations.take`` says what is refused) from
        its record, its figures served from its workspace, and continue it in this tab; False
        where the tab shows that conversation already."""
        chat = await self.earlier.take(tab.conversation_key, tab.caller, session_id, records)
        tab.session_id = session_id
        if chat is None:  # the tab's own conversation already
            return False
        await asyncio.to_thread(tab.forget_files)
        ws = await self.service.workspace(tab.conversation_key)

        def figures(execution: Execution) -> list[dict]:
            return self.shown_figures(tab, ws, execution) if ws is not None else []

        tab.history = await asyncio.to_thread(replay, chat.conversation, figures)
        return True

    async def resume_newest(self, tab: Tab) -> None:
        """A new page shows the newest conversation of its user that no other tab holds."""
        records = await self.own_history(tab)
        sid = await self.earlier.newest_free(tab.conversation_key, tab.caller, records)
        if sid is None:
            return
        try:
            await self.open_earlier(tab, sid, records)
        except JupyboxError as exc:  # gone or taken meanwhile: the page starts empty
            log.info("not reopening session %s in a new page: %s", sid, exc)

    # -- files ------------------------------------------------------------------------------
    def served_copies(self, tab: Tab, ws: Workspace, files: list[WorkspaceFile]) -> list[str | None]:
        """Copies of workspace files where Gradio may serve them from (the tab's folder), in order;
        None for a file not served. Read through the workspace, so a symlink planted by the
        sandboxed code is refused, and bounded in the bytes really written (the sandbox's sparse
        files can claim any size): each file by ``file_bytes``, a tab's copies together by the
        workspace's quota, and all of the page's files by the UI cache's limit. Blocking."""
        room = self.cache.limit_bytes - self.cache.usage()
        out = []
        for info in files:
            held = sum(c[2] for n, c in tab.copies.items() if n != info.path)
            cap = min(ws.limits.file_bytes, ws.limits.workspace_bytes - held, room)
            path, written = self._served_copy(tab, ws, info, cap)
            room -= written
            out.append(path)
        return out

    def _served_copy(self, tab: Tab, ws: Workspace, info: WorkspaceFile, cap: int) -> tuple[str | None, int]:
        """One file of ``served_copies``, at most ``cap`` bytes; the bytes this call wrote."""
        name, version = info.path, (info.size, info.modified)
        dest = tab.served / name
        copied = tab.copies.get(name)
        if copied is not None and copied[:2] == version and dest.exists():
            return str(dest), 0
        if tab.refused.get(name) == version:
            return None, 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            written = ws.copy_to(name, dest, max_bytes=max(cap, 0))
        except QuotaExceeded as exc:
            log.info("not serving %s to the page: %s", name, exc)
            tab.copies.pop(name, None)
            tab.refused[name] = version
            return None, 0
        except (JupyboxError, OSError) as exc:
            log.warning("cannot serve %s: %s", name, exc)
            return None, 0
        tab.copies[name] = (*version, written)
        tab.refused.pop(name, None)
        return str(dest), written

    def shown_figures(self, tab: Tab, ws: Workspace, execution: Execution) -> list[dict]:
        """The chat's content for the images an execution wrote (``figure_content`` of each served
        copy), in order. Blocking."""
        files = {f.path: f for f in ws.list()}
        paths = self.served_copies(tab, ws, [files[i.path] for i in execution.images if i.path in files])
        return [figure_content(p) for p in paths if p]

    async def file_list(self, tab: Tab) -> list[str]:
        ws = await self.service.workspace(tab.conversation_key)
        if ws is None:
            return []

        def copies() -> list[str]:
            files = ws.list()
            tab.forget_missing({f.path for f in files})
            return [p for p in self.served_copies(tab, ws, files) if p]

        return await asyncio.to_thread(copies)

    async def save_uploads(self, tab: Tab, fmt: str, paths: list[str]) -> tuple[list[str], str | None]:
        """Copy what the browser uploaded into the workspace (announced with the next question);
        a path that is not one of this page's uploads (a host file a client named) is refused
        with ``UploadRefused``. Returns the names and the service's note, if any."""
        self.chat_of(tab, fmt)
        names, note = [], None
        for p in paths:
            fh = await asyncio.to_thread(self.cache.open, p)
            try:
                stored, said = await self.service.upload(tab.conversation_key, "web", Path(p).name, fh,
                                                                    caller=tab.caller)
            finally:
                fh.close()
            names.append(stored.path)
            note = note or said
        return names, note

    # -- handlers ---------------------------------------------------------------------------
    async def on_load(self, tab: Tab | None, request: gr.Request) -> tuple:
        tab = self.tab(tab, request)
        if self.durable and not tab.history and self.service.get(tab.conversation_key) is None:
            await self.resume_newest(tab)
        return tab, gr.update(value=self.banner(), visible=self.service.llm is None), self.model_name(), \
            snapshot(tab.history), await self.file_list(tab), await self.history_update(tab)

    async def on_unload(self, request: gr.Request) -> None:
        tab = self.tabs.pop(self._slot(page_caller(request), getattr(request, "session_hash", None) or ""), None)
        if tab is not None:
            await self.close_tab(tab)

    async def upload(self, files: list[str] | None, tab: Tab | None, fmt: str, request: gr.Request) -> tuple:
        tab = self.tab(tab, request)
        try:
            names, note = await self.save_uploads(tab, fmt, list(files or []))
            msg = (f"Uploaded {', '.join(names)}; announced to the model with your next question."
                   if names else "No file was uploaded.")
        except JupyboxError as exc:
            note, msg = None, f"Not uploaded: {exc}"
        return await self.file_list(tab), tab, " ".join(m for m in (note, msg) if m)

    async def use_example(self, index: int, tab: Tab | None, fmt: str, request: gr.Request) -> tuple:
        """Put an example prompt in the box and the bundled dataset in the workspace."""
        tab = self.tab(tab, request)
        prompt = EXAMPLE_PROMPTS[(index if isinstance(index, int) else 0) % len(EXAMPLE_PROMPTS)]["text"]
        try:
            self.chat_of(tab, fmt)
            with EXAMPLE_DATA.open("rb") as fh:  # the server's own file, not a client's path
                _, note = await self.service.upload(tab.conversation_key, "web", EXAMPLE_DATA.name, fh,
                                                        caller=tab.caller)
            notice = " ".join(m for m in (note, f"Loaded the example data {EXAMPLE_DATA.name}.") if m)
        except JupyboxError as exc:
            notice = f"Not loaded: {exc}"
        return {"text": prompt, "files": []}, await self.file_list(tab), tab, notice

    async def example_selected(self, tab: Tab | None, fmt: str, evt: gr.SelectData, request: gr.Request) -> tuple:
        return await self.use_example(evt.index if isinstance(evt.index, int) else 0, tab, fmt, request)

    def turn_settings(self, model: str, temperature: float, max_executions: float, timeout: float) -> InterpreterSettings:
        """This turn's settings: the server's, with what the page's settings panel asks (each
        bounded here: the page is a client like any other)."""
        model = (model or "").strip()
        remote = self.service.models.remote
        return dataclasses.replace(
            self.service.settings, temperature=min(max(float(temperature or 0), 0.0), 2.0),
            max_executions=int(min(max(float(max_executions or 1), 1), 20)),
            execution_timeout=float(min(max(float(timeout or 1), 1), 3600)),
            model=model if remote and model and model != self.service.model_name else None)

    async def ask(self, message: dict | str | None, tab: Tab | None, model: str, fmt: str, temperature: float,
                  max_executions: float, timeout: float, request: gr.Request):
        """One question: streams the chat as the model writes and the code runs."""
        tab = self.tab(tab, request)
        message = {"text": message, "files": []} if isinstance(message, str) else (message or {})
        question = str(message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        keep = gr.update()
        chat = self.service.get(tab.conversation_key)
        if chat is not None and chat.busy:
            gr.Warning("Still working on the previous question: wait, or press Stop.")
            yield snapshot(tab.history), keep, keep, tab
            return
        if not question and not files:
            yield snapshot(tab.history), keep, keep, tab
            return
        if chat is None and tab.session_id is not None:  # the page shows a conversation it no longer holds
            if self.service.by_session(tab.session_id) is not None:  # not sent: the box keeps the question
                tab.history += [question_message(question, [Path(f).name for f in files]),
                                notice_message("warning", TAKEN)]
                yield snapshot(tab.history), keep, keep, tab
                return
            try:  # let go of meanwhile, as the service lets go of idle ones its records bring back
                await self.earlier.take(tab.conversation_key, tab.caller, tab.session_id, await self.own_history(tab))
            except JupyboxError:
                tab.session_id = None
                tab.history.append(notice_message("info", ENDED))
        tab.history.append(question_message(question, [Path(f).name for f in files]))
        yield snapshot(tab.history), {"text": "", "files": []}, keep, tab
        try:
            _, note = await self.save_uploads(tab, fmt, files)
            if note:
                tab.history.append(notice_message("info", note))
            if not question:
                yield snapshot(tab.history), keep, await self.file_list(tab), tab
                return
            turn = await self.service.turn(tab.conversation_key, "web", question,
                                           self.turn_settings(model, temperature, max_executions, timeout),
                                           caller=tab.caller)
        except JupyboxError as exc:  # no model, busy, an upload refused, no room for a session
            tab.history.append(notice_message("warning", str(exc)))
            yield snapshot(tab.history), keep, await self.file_list(tab), tab
            return
        view = TurnView(tab.history, turn.format)
        last = 0.0
        # closed with this handler, so a page that goes away mid-turn stops the model and the kernel
        async with aclosing(turn.events()) as events:
            async for event in events:
                if event.type == "error" and turn.cancel.is_set():
                    event.text = "Stopped."
                view.apply(event)
                if event.type == "execution" and event.execution is not None and event.execution.images:
                    ws = await self.service.workspace(tab.conversation_key)
                    if ws is not None:
                        view.show_images(await asyncio.to_thread(self.shown_figures, tab, ws, event.execution))
                now = time.monotonic()
                if event.type != "text_delta" or now - last >= STREAM_INTERVAL_S:
                    last = now
                    yield snapshot(tab.history), keep, keep, tab
        yield snapshot(tab.history), keep, await self.file_list(tab), tab

    async def noted(self, tab: Tab | None, request: gr.Request) -> Any:
        """After a question, an upload or a new session: the history, showing the session the
        tab's conversation has now (its first question or upload started one)."""
        tab = self.tab(tab, request)
        chat = self.service.get(tab.conversation_key)
        if chat is not None and chat.conversation.session_id is not None:
            tab.session_id = chat.conversation.session_id
        return await self.history_update(tab)

    async def stop(self, tab: Tab | None, request: gr.Request) -> str:
        tab = self.tab(tab, request)
        return "Stopping…" if self.service.stop_turn(tab.conversation_key) else "Nothing is running."

    async def new_session(self, tab: Tab | None, request: gr.Request) -> tuple:
        tab = self.tab(tab, request)
        await self.close_tab(tab)
        tab.history, tab.session_id = [], None
        tab.started += 1
        notice = "New session: a fresh kernel and an empty workspace start with your next question."
        if self.durable:
            notice += " The earlier conversation stays in History · 历史."
        return [], [], tab, notice

    async def reopen(self, choice: str | None, tab: Tab | None, request: gr.Request) -> tuple:
        """The history's choice: show that conversation and continue it here."""
        tab = self.tab(tab, request)
        records = await self.own_history(tab)
        try:
            sid = session_id_of(choice)
            if sid is None:
                raise SessionClosed(GONE)
            if await self.open_earlier(tab, sid, records):
                notice = "Reopened: your next question continues this conversation (its variables come back on first use)."
            else:
                notice = "That conversation is the one open here already."
        except JupyboxError as exc:
            notice = str(exc)
        return snapshot(tab.history), await self.file_list(tab), tab, notice, await self.history_update(tab)

    async def delete(self, choice: str | None, tab: Tab | None, request: gr.Request) -> tuple:
        """The history's choice, closed for good: its record, files and variables go."""
        tab = self.tab(tab, request)
        sid = session_id_of(choice)
        try:
            if sid is None:
                raise SessionClosed(GONE)
            await self.earlier.delete(tab.conversation_key, tab.caller, sid, await self.own_history(tab))
            notice = "Deleted: that conversation, its files and its variables are gone."
        except JupyboxError as exc:
            notice = str(exc)
        if sid is not None and tab.session_id == sid and self.service.get(tab.conversation_key) is None:
            tab.history, tab.session_id = [], None
            await asyncio.to_thread(tab.forget_files)
        return snapshot(tab.history), await self.file_list(tab), tab, notice, await self.history_update(tab)

    async def files(self, tab: Tab | None, request: gr.Request) -> tuple:
        tab = self.tab(tab, request)
        return await self.file_list(tab), tab

    async def notebook(self, tab: Tab | None, request: gr.Request) -> tuple:
        tab = self.tab(tab, request)
        chat = self.service.get(tab.conversation_key)
        conv = chat.conversation if chat is not None else Conversation(format="")
        path = tab.served / f"jupybox-{conv.id}.ipynb"
        await asyncio.to_thread(nbformat.write, conv.to_notebook(), str(path))
        return str(path), tab


def build_ui(services: Services, cache: UploadCache) -> gr.Blocks:
    """The page, on ``services`` (which the server starts before the first request)."""
    ui = WebUI(services, cache)
    llm_is_remote = services.settings.model.remote
    with gr.Blocks(title="jupybox", analytics_enabled=False, fill_height=True,
                   delete_cache=(900, 3600)) as demo:
        state = gr.State(None, delete_callback=lambda tab: _close_soon(ui, tab))
        gr.Markdown("## jupybox · 数据分析助手\nUpload data, ask in English or Chinese; the model writes "
                    "Python and a sandboxed kernel runs it. 上传数据，用中文或英文提问。")
        banner = gr.Markdown(visible=False, elem_id="jb-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="jb-chat", height=620, label="Conversation", latex_delimiters=LATEX,
                                  buttons=["copy"], feedback_options=None, group_consecutive_messages=False,
                                  examples=[{"text": p["text"], "display_text": p["label"]} for p in EXAMPLE_PROMPTS],
                                  placeholder="Try an example below: it loads the bundled sales.csv. "
                                              "示例会自动加载自带的 sales.csv。")
                box = gr.MultimodalTextbox(placeholder="Ask about your data… 输入你的问题…", file_count="multiple",
                                           file_types=UPLOAD_TYPES, show_label=False, elem_id="jb-input")
                with gr.Row():
                    stop_btn = gr.Button("Stop · 停止", variant="stop", elem_id="jb-stop", scale=1)
                    new_btn = gr.Button("New session · 新会话", elem_id="jb-new", scale=1)
                    nb_btn = gr.Button("Export notebook · 导出 .ipynb", elem_id="jb-notebook", scale=1)
                notice = gr.Markdown(elem_id="jb-notice")
            with gr.Column(scale=1, min_width=280):
                upload_btn = gr.UploadButton("Upload files · 上传文件", file_count="multiple",
                                             file_types=UPLOAD_TYPES, elem_id="jb-upload")
                files = gr.File(label="Workspace files · 工作区文件", file_count="multiple", interactive=False,
                                elem_id="jb-files")
                refresh_btn = gr.Button("Refresh files", size="sm")
                durable = services.manager.durable
                # the choice is checked by the handlers (``ui.web_history``), not against the choices
                # Gradio keeps per page session: a client's value is refused in jupybox's own words
                history = gr.Dropdown(choices=[], value=None, label="History · 历史", interactive=True,
                                      info="Your earlier conversations, newest first: pick one to continue it.",
                                      allow_custom_value=True, elem_id="jb-history", visible=durable)
                delete_btn = gr.Button("Delete this conversation · 删除", size="sm", elem_id="jb-delete",
                                       visible=durable)
                nb_file = gr.File(label="Notebook", visible=True, interactive=False, elem_id="jb-nb-file")
                examples = gr.Dataset(label="Examples · 示例", components=[gr.Textbox(visible=False)],
                                      samples=[[p["label"]] for p in EXAMPLE_PROMPTS], type="index")
                with gr.Accordion("Settings · 设置", open=False):
                    model = gr.Textbox(label="Model", interactive=llm_is_remote,
                                       info="The model name on the OpenAI-compatible server.")
                    fmt = gr.Dropdown(["auto", *FORMATS], value=services.settings.model.format or "auto",
                                      label="Prompt format", info="Applies from the next new session.")
                    temperature = gr.Slider(0.0, 2.0, value=services.settings.interpreter.temperature, step=0.05,
                                            label="Temperature")
                    max_exec = gr.Slider(1, 20, value=services.settings.interpreter.max_executions, step=1,
                                         label="Max executions per turn")
                    timeout = gr.Number(value=services.settings.interpreter.execution_timeout, minimum=1,
                                        maximum=3600, label="Execution timeout (s)")

        run_inputs = [box, state, model, fmt, temperature, max_exec, timeout]
        run_outputs = [chat, box, files, state]

        def then_history(event: Any) -> None:
            """The history follows a question, an upload or a new session as a step of its own, so
            that the named endpoints answer as they always have."""
            if durable:
                event.then(ui.noted, [state], [history], api_visibility="private", concurrency_limit=None)

        demo.load(ui.on_load, [state], [state, banner, model, chat, files, history], api_visibility="private")
        demo.unload(ui.on_unload)
        then_history(box.submit(ui.ask, run_inputs, run_outputs, api_name="ask", concurrency_limit=None))
        stop_btn.click(ui.stop, [state], [notice], api_name="stop", concurrency_limit=None)
        then_history(new_btn.click(ui.new_session, [state], [chat, files, state, notice], api_name="new_session",
                                   concurrency_limit=None))
        history.input(ui.reopen, [history, state], [chat, files, state, notice, history], api_name="reopen",
                      concurrency_limit=None)
        delete_btn.click(ui.delete, [history, state], [chat, files, state, notice, history],
                         api_name="delete_session", concurrency_limit=None)
        then_history(upload_btn.upload(ui.upload, [upload_btn, state, fmt], [files, state, notice],
                                       api_name="upload", concurrency_limit=None))
        refresh_btn.click(ui.files, [state], [files, state], api_name="files", concurrency_limit=None)
        nb_btn.click(ui.notebook, [state], [nb_file, state], api_name="notebook", concurrency_limit=None)
        then_history(examples.click(ui.use_example, [examples, state, fmt], [box, files, state, notice],
                                    api_visibility="private").then(ui.ask, run_inputs, run_outputs,
                                                                   api_visibility="private", concurrency_limit=None))
        then_history(chat.example_select(ui.example_selected, [state, fmt], [box, files, state, notice],
                                         api_visibility="private").then(ui.ask, run_inputs, run_outputs,
                                                                        api_visibility="private",
                                                                        concurrency_limit=None))
    return demo


def snapshot(history: list[dict]) -> list[dict]:
    """A copy to hand Gradio: it diffs each streamed value against the previous one, which a
    list changed in place would defeat."""
    return copy.deepcopy(history)


def _close_soon(ui: WebUI, tab: Tab | None) -> None:
    """Gradio drops a tab's state when the tab closes or its state expires, also for a client that
    never sent ``unload``: forget the tab and its conversation (``close_tab``: its session is
    closed too where sessions are not durable) and remove its served files."""
    if tab is None:
        return
    for slot in (tab.key, owned_key(tab.caller, tab.key)):
        if ui.tabs.get(slot) is tab:
            del ui.tabs[slot]
    if ui.service.get(tab.conversation_key) is None:
        tab.forget_files()
        return
    try:
        ui.service.spawn(ui.close_tab(tab))
    except RuntimeError:  # called outside the server's loop: the manager's idle TTL closes the session
        tab.forget_files()
