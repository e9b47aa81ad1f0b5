"""The ``jupybox`` command line.

Subcommands: ``exec`` (run code in a fresh sandbox session), ``serve`` (the browser UI and HTTP API),
``mcp`` (the sandbox as MCP tools over stdio),
``demo``, ``sandbox build-image`` / ``sandbox cleanup``, ``packages`` (the wheelhouse), ``bench sandbox``,
``bench model``, ``users``
(the server's users and keys) and ``audit`` (its audit log). Errors are printed as one
sentence with a next step; no traceback reaches the user (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from interpreter.events import Event
from sandbox import Execution, JupyboxError, SandboxSettings, Session, SessionManager
from sandbox.models import Output
from ui.flags import add_model_flags
from ui.packages_cli import add_package_commands, run_package_command
from ui.sessions_cli import add_session_commands, run_session_command
from ui.users_cli import add_user_commands, run_user_command

log = logging.getLogger("jupybox")

DEMO_CODE = """\
import numpy as np, pandas as pd, matplotlib.pyplot as plt
df = pd.DataFrame({"month": range(1, 13), "sales": np.round(100 + 15 * np.sin(np.arange(12) / 2), 1)})
print(df.describe().loc[["mean", "max"]])
df.plot(x="month", y="sales", title="Monthly sales / 月度销售额")
plt.show()
df["sales"].sum()
"""


def _add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["docker", "bwrap", "local", "ray"],
                   help="how the kernel is isolated (default: docker); ray: docker sandboxes on the nodes of a Ray cluster")
    p.add_argument("--ray-address", help="with --backend ray: the cluster's head, host:port (env RAY_ADDRESS); "
                                         "without it a one-node Ray starts on this host, bound to loopback")
    p.add_argument("--runtime", dest="docker_runtime", help="Docker runtime, e.g. runsc for gVisor")
    p.add_argument("--image", help="sandbox image (default: jupybox-sandbox:latest)")
    p.add_argument("--unsafe-local", action="store_true", help="allow the local backend, which has NO isolation")


def _settings(args: argparse.Namespace, **extra: Any) -> SandboxSettings:
    return SandboxSettings.from_env(
        backend=args.backend, docker_runtime=args.docker_runtime, image=args.image, ray_address=args.ray_address,
        allow_unsafe_local=args.unsafe_local or None, **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupybox", description="A sandboxed code interpreter.")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("exec", help="run Python code in a fresh sandbox session")
    p.add_argument("code", nargs="?", default="-", help="the code, or - to read it from stdin (default)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before the execution is interrupted")
    p.add_argument("--json", action="store_true", help="print the whole Execution as one JSON object")
    p.add_argument("--out", type=Path, default=Path("jupybox-output"), help="folder for images the code produced")
    _add_sandbox_flags(p)

    for name, helptext in (("ask", "answer one question with the model and the sandbox"),
                           ("chat", "an interactive, multi-turn conversation in the terminal")):
        p = sub.add_parser(name, help=helptext)
        if name == "ask":
            p.add_argument("question")
        p.add_argument("--file", action="append", default=[], help="upload a file into the workspace (repeatable)")
        p.add_argument("--json", action="store_true", help="one JSON event per line")
        p.add_argument("--notebook", type=Path, help="also save the conversation as a Jupyter notebook")
        p.add_argument("--out", type=Path, default=Path("jupybox-output"), help="folder for generated files")
        add_model_flags(p)
        _add_sandbox_flags(p)

    p = sub.add_parser("serve", help="the browser UI, the HTTP API and an OpenAI-compatible endpoint in one server")
    from ui.serve import add_serve_flags

    add_serve_flags(p)
    _add_sandbox_flags(p)

    p = sub.add_parser("mcp", help="the sandbox as MCP tools over stdio, for a desktop or IDE agent")
    add_model_flags(p)
    _add_sandbox_flags(p)

    p = sub.add_parser("eval", help="the Qwen code-interpreter benchmark: executable rate, GSM8K and plot accuracy")
    from bench.eval import add_eval_flags

    add_eval_flags(p)
    add_model_flags(p)
    _add_sandbox_flags(p)

    p = sub.add_parser("demo", help="run a small data analysis in the sandbox")
    p.add_argument("--out", type=Path, default=Path("jupybox-output"))
    _add_sandbox_flags(p)

    p = sub.add_parser("sandbox", help="manage the sandbox")
    ssub = p.add_subparsers(dest="action", required=True)
    b = ssub.add_parser("build-image", help="build the sandbox image (from Debian packages if no base image can be pulled)")
    b.add_argument("--base-image", help="base image (default python:3.11-slim-bookworm)")
    b.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    b.add_argument("--target", choices=("sandbox", "app"), default="sandbox",
                   help="sandbox: the kernel image (default); app: the service image, `jupybox serve` (compose.yaml)")
    c = ssub.add_parser("cleanup", help="remove sandbox containers and folders left by dead jupybox processes")
    _add_sandbox_flags(c)

    p = sub.add_parser("bench", help="benchmarks (figures, never pass/fail)")
    bsub = p.add_subparsers(dest="target", required=True)
    b = bsub.add_parser("sandbox", help="cold start, warm acquire, round-trip vs a bare kernel, memory, capacity")
    b.add_argument("--json", action="store_true")
    b.add_argument("--runs", type=int, default=10, help="samples per figure")
    b.add_argument("--max-sessions", type=int, default=40, help="stop the capacity probe here")
    _add_sandbox_flags(b)
    m = bsub.add_parser("model", help="decode speed, time to first token and peak GPU memory of the local model backend")
    from bench.model import add_model_flags as add_bench_model_flags
    add_bench_model_flags(m)
    add_user_commands(sub)
    add_session_commands(sub)
    add_package_commands(sub)
    return parser


def print_output(out: Output) -> None:
    """Readable streaming output for a terminal."""
    to_stderr = out.kind == "error" or (out.kind == "stream" and out.name == "stderr")
    (sys.stderr if to_stderr else sys.stdout).write(out.plain_text())
    sys.stdout.flush()


async def run_code(args: argparse.Namespace, code: str, as_json: bool, timeout: float) -> int:
    async with SessionManager(_settings(args)) as manager:
        session = await manager.create()
        execution: Execution = await session.execute(code, timeout=timeout, on_output=None if as_json else print_output)
        saved = _copy_images(session, execution, args.out / session.id)
        if as_json:
            d = execution.to_dict()
            d["saved_images"] = saved
            print(json.dumps(d))
        else:
            for path in saved:
                print(f"[image saved: {path}]")
            for note in execution.notes(images=False):
                print(f"[{note}]", file=sys.stderr)
        return 0 if execution.ok else 1


def _copy_images(session: Session, execution: Execution, dest: Path) -> list[str]:
    """Copy through the workspace's path-safe reader: the kernel may still be changing its files."""
    saved = []
    for img in execution.images:
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(img.path).name
        try:
            session.workspace.copy_to(img.path, target)
        except JupyboxError as exc:
            log.warning("image %s not copied: %s", img.path, exc)
            continue
        saved.append(str(target))
    return saved


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "exec":
        code = sys.stdin.read() if args.code == "-" else args.code
        return await run_code(args, code, args.json, args.timeout)
    if args.command in ("ask", "chat"):
        from ui import terminal

        return await getattr(terminal, args.command)(args, _settings(args))
    if args.command == "mcp":
        from ui.terminal import serve_mcp

        return await serve_mcp(args, _settings(args))
    if args.command == "serve":
        from ui.serve import sandbox_overrides, serve

        return await serve(args, _settings(args, **sandbox_overrides(args)))
    if args.command == "demo":
        print(DEMO_CODE)
        return await run_code(args, DEMO_CODE, False, 60.0)
    if args.command == "sandbox" and args.action == "build-image":
        from sandbox.build import build_image

        tag = await asyncio.to_thread(build_image, target=args.target, base_image=args.base_image, force=args.force,
                                      on_log=lambda line: print(line, file=sys.stderr))
        print(tag)
        return 0
    if args.command == "sandbox" and args.action == "cleanup":
        manager = SessionManager(_settings(args))
        await manager.backend.check()
        print(f"removed {await manager.cleanup_orphans()} orphaned container(s)")
        await manager.backend.close()
        return 0
    if args.command == "bench" and args.target == "sandbox":
        from bench.sandbox import run_sandbox_bench

        return await run_sandbox_bench(_settings(args), runs=args.runs, max_sessions=args.max_sessions, as_json=args.json)
    if args.command == "bench" and args.target == "model":
        from bench.model import run_model_bench

        return await asyncio.to_thread(run_model_bench, args)
    if args.command in ("users", "audit"):
        return run_user_command(args)
    if args.command == "packages":
        return await asyncio.to_thread(run_package_command, args)
    if args.command == "sessions":
        return run_session_command(args)
    if args.command == "eval":
        from bench.eval import run_eval_command

        return await run_eval_command(args, _settings(args))
    raise AssertionError(args)


async def _main_async(args: argparse.Namespace) -> int:
    """Run the command; SIGTERM and SIGINT cancel it, so managers close their sessions on the way out."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await _dispatch(args)


def quiet_libraries() -> None:
    """Model libraries talk on stderr while loading (progress bars, deprecation and tracing
    warnings from transformers, torchao, torch's pytree): off unless --debug."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch sets its loggers' levels from this when imported
    logging.getLogger("torchao").setLevel(logging.ERROR)  # kernels it cannot load on this machine
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchao|transformers|accelerate|optimum)")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers() -> None:
    """Serve allocations of 1 MiB and more from their own mappings, given back to the system when
    freed. Kernels send messages of up to 16 MiB; glibc's default threshold rises after each large
    free, after which such buffers come from the heap, whose freed memory the process keeps (in
    the soak, about 240 MB of resident memory that was no longer used). glibc only; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    return_large_buffers()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        quiet_libraries()
    try:
        return asyncio.run(_main_async(args))
    except JupyboxError as exc:
        if args.debug:
            raise
        if args.command in ("ask", "chat") and args.json:  # their event stream ends with an event, whatever happened
            print(json.dumps(Event("error", text=str(exc)).to_dict(), ensure_ascii=False), flush=True)
        print(f"jupybox: {exc}", file=sys.stderr)
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("jupybox: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
