"""``jupybox ask`` and ``jupybox chat``: the interpreter in a terminal.

Both print the model's text, each code cell, its outputs and the answer as they stream (or one JSON
event per line with ``--json``), and copy the workspace's files (images, generated files) into a
folder they name at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from interpreter import Conversation, Event, Interpreter, InterpreterSettings
from interpreter.llm import DEFAULT_MODEL, llm_from_options
from interpreter.llm.base import LLM
from sandbox import SessionManager



def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"local checkpoint folder or hub id for the transformers backend (default {DEFAULT_MODEL})")
    p.add_argument("--openai-base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (env OPENAI_BASE_URL)")
    p.add_argument("--openai-model", help="model name on that server (env OPENAI_MODEL)")
    p.add_argument("--openai-api-key", help="API key (env OPENAI_API_KEY)")
    p.add_argument("--vision", action="store_true", help="the model accepts images: send plots as image parts")
    p.add_argument("--format", choices=["react", "fenced", "tools"], help="how code is asked for (default: per model)")
    p.add_argument("--max-executions", type=int, default=6, help="code executions per turn")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per execution")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int)


def make_llm(args: argparse.Namespace) -> LLM:
    return llm_from_options(model=args.model, openai_base_url=args.openai_base_url, openai_model=args.openai_model,
                            openai_api_key=args.openai_api_key, vision=args.vision)


def interpreter_settings(args: argparse.Namespace) -> InterpreterSettings:
    return InterpreterSettings(max_executions=args.max_executions, execution_timeout=args.timeout,
                               temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)


class Printer:
    """Readable streaming output; code cells framed so they stand out from the model's text."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(self, event: Event) -> None:
        if self.as_json:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
            return
        out = sys.stdout
        if event.type == "text_delta":
            out.write(event.text or "")
        elif event.type == "code":
            out.write(f"\n\n┌── code ──\n{event.code}\n└──────────\n")
        elif event.type == "output" and event.output is not None:
            out.write("[image]\n" if event.output.is_image else event.output.plain_text())
        elif event.type == "execution" and event.execution is not None:
            ex = event.execution
            for img in ex.images:
                out.write(f"[image: {img.path}]\n")
            if ex.reason:
                out.write(f"[{ex.status.value}: {ex.reason}]\n")
        elif event.type == "answer":
            out.write(f"\n\n{event.text}\n")
        elif event.type == "error":
            out.write(f"\n[stopped: {event.text}]\n")
        out.flush()


def save_outputs(interp: Interpreter, conv: Conversation, out: Path, notebook: Path | None, quiet: bool) -> None:
    session = interp.manager.get(conv.session_id) if conv.session_id else None
    dest = out / conv.id
    if session is not None:
        files = session.workspace.list()
        for f in files:
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with session.workspace.open(f.path) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        if files and not quiet:
            print(f"[files saved in {dest}]", file=sys.stderr)
    if notebook is not None:
        import nbformat

        nbformat.write(conv.to_notebook(), str(notebook))
        if not quiet:
            print(f"[notebook saved: {notebook}]", file=sys.stderr)


@contextlib.asynccontextmanager
async def open_conversation(args: argparse.Namespace, settings) -> AsyncIterator[tuple[Interpreter, Conversation]]:
    """The model (a local one is loaded first, so a missing checkpoint fails fast before any container
    starts), a sandbox manager and a fresh conversation; everything is closed on the way out."""
    llm = make_llm(args)
    try:
        load = getattr(llm, "load", None)
        if load is not None:
            await load()
        async with SessionManager(settings) as manager:
            interp = Interpreter(llm, manager, args.format, interpreter_settings(args))
            yield interp, await interp.new_conversation()
    finally:
        await llm.close()


async def ask(args: argparse.Namespace, settings) -> int:
    printer = Printer(args.json)
    async with open_conversation(args, settings) as (interp, conv):
        last = None
        async for event in interp.run(conv, args.question, [Path(f) for f in args.file]):
            printer(event)
            last = event
        save_outputs(interp, conv, args.out, args.notebook, args.json)
        return 0 if last is not None and last.type == "answer" else 1


async def chat(args: argparse.Namespace, settings) -> int:
    printer = Printer(args.json)
    async with open_conversation(args, settings) as (interp, conv):
        files = [Path(f) for f in args.file]
        print("jupybox chat: ask questions; /save FILE.json, /notebook FILE.ipynb, /exit", file=sys.stderr)
        while True:
            line = await asyncio.to_thread(_read_line)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/save "):
                conv.save(Path(line[6:].strip()))
                continue
            if line.startswith("/notebook "):
                save_outputs(interp, conv, args.out, Path(line[10:].strip()), False)
                continue
            async for event in interp.run(conv, line, files):
                printer(event)
            files = []
        save_outputs(interp, conv, args.out, args.notebook, args.json)
        return 0


def _read_line() -> str | None:
    try:
        return input("\nyou> ")
    except EOFError:
        return None
