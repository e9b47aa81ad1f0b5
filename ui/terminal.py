"""``jupybox ask`` and ``jupybox chat``: the interpreter in a terminal, over the same conversation
service as every other front end.

Both print the model's text, each code cell, its outputs and the answer as they stream (or one JSON
event per line with ``--json``), and copy the workspace's files (images, generated files) into a
folder they name at the end; files the user uploaded come back only if the code changed them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from interpreter import ConversationService, Event, ModelSettings, get_format
from sandbox import JupyboxError, SandboxSettings, SessionManager
from sandbox.errors import QuotaExceeded
from sandbox.workspace import WorkspaceFile

from .flags import interpreter_settings

KEY, SOURCE = "terminal", "terminal"


class Printer:
    """Readable streaming output; code cells framed so they stand out from the model's text. The
    answer is printed on its own only when the streamed text did not already show it."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.step = ""  # the model's text of the step being streamed

    def __call__(self, event: Event) -> None:
        if self.as_json:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
            return
        out = sys.stdout
        if event.type == "text_delta":
            self.step += event.text or ""
            out.write(event.text or "")
        elif event.type == "code":
            self.step = ""
            out.write(f"\n\n┌── code ──\n{event.code}\n└──────────\n")
        elif event.type == "output" and event.output is not None:
            out.write("[image]\n" if event.output.is_image else event.output.plain_text())
        elif event.type == "execution" and event.execution is not None:
            for note in event.execution.notes():
                out.write(f"[{note}]\n")
        elif event.type == "answer":
            answer = (event.text or "").strip()
            out.write("\n" if answer in self.step else f"\n\n{answer}\n")
            if event.finish_reason == "length":
                out.write("[the answer was cut at the model's token limit: raise --max-new-tokens]\n")
            self.step = ""
        elif event.type in ("error", "notice"):
            out.write(f"\n[{'stopped' if event.type == 'error' else 'note'}: {event.text}]\n")
        out.flush()


async def save_outputs(service: ConversationService, out: Path, notebook: Path | None, quiet: bool,
                       uploaded: dict[str, WorkspaceFile]) -> None:
    """Copy the workspace's files under ``out/<conversation id>`` (an upload only if the code changed
    it) and write the notebook."""
    chat = service.get(KEY)
    if chat is None:
        return
    ws = await service.workspace(KEY)
    dest = out / chat.conversation.id

    def copy() -> int:
        """Each file bounded, and all of them within the workspace's quota: the sandbox can make
        sparse files that claim any size, and each copy here costs the host's disk what it holds."""
        copied, budget = 0, ws.limits.workspace_bytes if ws is not None else 0
        for f in ws.list() if ws is not None else []:
            before = uploaded.get(f.path)
            if before is not None and (before.size, before.modified) == (f.size, f.modified):
                continue
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                budget -= ws.copy_to(f.path, target, max_bytes=min(ws.limits.file_bytes, budget))
            except QuotaExceeded as exc:
                print(f"[not saved: {exc}]", file=sys.stderr)
                continue
            copied += 1
        return copied

    if await asyncio.to_thread(copy) and not quiet:
        print(f"[files saved in {dest}]", file=sys.stderr)
    if notebook is not None:
        import nbformat

        await asyncio.to_thread(nbformat.write, chat.conversation.to_notebook(), str(notebook))
        if not quiet:
            print(f"[notebook saved: {notebook}]", file=sys.stderr)


@contextlib.asynccontextmanager
async def open_service(args: argparse.Namespace, settings: SandboxSettings) -> AsyncIterator[ConversationService]:
    """The conversation service of one terminal: the format is checked against the backend first
    and the model is loaded before any container starts, so either fails fast; everything is
    closed on the way out."""
    models = ModelSettings.from_args(args)
    if models.format:
        get_format(models.format, models.backend_class())  # FormatError before minutes of loading
    service = ConversationService(SessionManager(settings), models, interpreter_settings(args))
    try:
        await service.load_model()
        await service.start(load_model=False)
        yield service
    finally:
        await service.stop()  # the sessions, and the model it made


async def upload(service: ConversationService, files: list[str]) -> dict[str, WorkspaceFile]:
    stored = {}
    for name in files:
        with open(name, "rb") as fh:
            f, _ = await service.upload(KEY, SOURCE, Path(name).name, fh)
        stored[f.path] = f
    return stored


async def run_turn(service: ConversationService, question: str, printer: Printer) -> Event | None:
    turn = await service.turn(KEY, SOURCE, question)
    last = None
    async with aclosing(turn.events()) as events:  # Ctrl-C closes it: the turn is stopped
        async for event in events:
            printer(event)
            last = event
    return last


async def ask(args: argparse.Namespace, settings: SandboxSettings) -> int:
    printer = Printer(args.json)
    async with open_service(args, settings) as service:
        service.open(KEY, SOURCE)
        uploaded = await upload(service, args.file)
        last = await run_turn(service, args.question, printer)
        await save_outputs(service, args.out, args.notebook, args.json, uploaded)
        return 0 if last is not None and last.type == "answer" else 1


async def chat(args: argparse.Namespace, settings: SandboxSettings) -> int:
    printer = Printer(args.json)
    async with open_service(args, settings) as service:
        service.open(KEY, SOURCE)
        uploaded = await upload(service, args.file)
        print("jupybox chat: ask questions; /save FILE.json, /load FILE.json, /notebook FILE.ipynb, /exit",
              file=sys.stderr)
        while True:
            line = await asyncio.to_thread(_read_line)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/save "):
                try:
                    data = await service.save(KEY)
                except JupyboxError as exc:  # e.g. files over the quota: the conversation goes on
                    print(f"[not saved: {exc}]", file=sys.stderr)
                    continue
                Path(line[6:].strip()).write_text(json.dumps(data, ensure_ascii=False))
                continue
            if line.startswith("/load "):
                await service.load(KEY, SOURCE, json.loads(Path(line[6:].strip()).read_text()))
                uploaded = {}
                continue
            if line.startswith("/notebook "):
                await save_outputs(service, args.out, Path(line[10:].strip()), False, uploaded)
                continue
            await run_turn(service, line, printer)
        await save_outputs(service, args.out, args.notebook, args.json, uploaded)
        return 0


def _read_line() -> str | None:
    try:
        return input("\nyou> ")
    except EOFError:
        return None


async def serve_mcp(args: argparse.Namespace, settings: SandboxSettings) -> int:
    """``jupybox mcp``: the MCP tools over stdin/stdout for one agent, on a sandbox manager of its
    own; every sandbox is closed when the agent hangs up (or on SIGTERM). A model is loaded only
    when one is configured (then the ``ask`` tool appears)."""
    from ui.mcp import JupyboxMcp

    models = ModelSettings.from_args(args)
    service = ConversationService(SessionManager(settings), models, interpreter_settings(args))
    try:
        await service.start(load_model=models.configured)
        await JupyboxMcp(service, handshake_only=False).run_stdio()
    finally:
        await service.stop()
    return 0
