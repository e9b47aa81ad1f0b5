"""A session: one isolated kernel, its workspace, and what happens on timeouts and deaths.

The escalation on a timeout is fixed and recorded in the ``Execution``: interrupt → wait
``interrupt_grace_s`` → restart the kernel (state lost). A kernel that died (out of memory,
``os._exit``) is reported as ``crashed`` and replaced before the next execution. Every replacement,
whoever noticed the death, goes through the session's ``KernelSupervisor``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from . import diskfs
from .backends.base import Backend, KernelHandle, KernelSpec
from .config import Limits, SandboxSettings
from .errors import ConnectionLimit, PauseFailed, SandboxError, SessionClosed, WorkspaceError
from .kernel import (
    KernelClient,
    OutputCallback,
    OutputCollector,
    RawResult,
    read_connection_file,
    sockets_ready,
    write_connection_file,
)
from .models import Execution, ExecutionStatus, ImageFile, Output
from .packages import SitePackages
from .relay import MAX_RELAYS, MAX_RELAYS_PER_SESSION, KernelRelay, open_relays
from .state import STATE_DIR, StateReport, parse_report, restore_code, save_code
from .supervisor import DIED, RESTARTED, KernelSupervisor, Replacement, Watched
from .workspace import Workspace, remove_tree

log = logging.getLogger(__name__)

IMAGE_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg", "image/gif": "gif"}
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes
STATE_OUTPUT_BYTES = 1 << 20  # what the state code may print: its report, the names it skipped
# notebook clients are told ``autorestarting``, as for a restart: they reconnect, which resumes it
PAUSED = Replacement("was paused", "the session was paused: its variables were saved and are loaded again "
                     "by the kernel that resumes it")


def _image_mime(out: Output) -> str | None:
    """The image type of a result or display output that carries one, which is saved as a file."""
    if out.kind not in ("result", "display") or not out.data:
        return None
    return next((m for m in IMAGE_EXT if m in out.data), None)


def socket_alias(name: str, target: Path) -> Path:
    """A short path to a runtime folder whose own path is too long for the kernel's Unix sockets
    (a deep ``JUPYBOX_HOME``): a symlink in a folder of this user's under the temp directory,
    refused unless that folder is private to this user, so no one else can plant or swap links."""
    base = Path(tempfile.gettempdir()) / f"jupybox-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"{base} holds short links to kernels' socket folders and must be a folder private to "
                           "this user: remove it, or set JUPYBOX_HOME to a shorter path")
    _prune_links(base)
    link = base / name
    link.unlink(missing_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return link


def _prune_links(base: Path) -> None:
    """Remove the links that processes which no longer run left behind (one that crashed cannot
    remove its own). A link is named ``<pid>-<session>`` after the process that made it, so a live
    process's links, restarting sessions included, are never touched."""
    for link in base.iterdir():
        pid, _, rest = link.name.partition("-")
        if not (pid.isdigit() and rest) or not link.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            link.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's: not ours to judge
            continue


class Session:
    """Stateful: a variable set in one execution is there in the next, until a restart."""

    def __init__(self, backend: Backend, settings: SandboxSettings, owner: str, folder: Path,
                 session_id: str | None = None, limits: Limits | None = None, own_filesystem: bool = False,
                 isolation: str | None = None) -> None:
        self.id = session_id or uuid.uuid4().hex[:12]
        self.backend = backend
        self.settings = settings
        self.owner = owner
        self.folder = folder
        self.runtime_dir = folder / "run"
        self._socket_dir = self.runtime_dir  # where this host connects: a short alias if that path is too long
        owner_ids = (settings.sandbox_uid, settings.sandbox_gid) if os.geteuid() == 0 else None
        self.limits = limits or settings.limits
        self.workspace = Workspace(folder / "data", self.limits, owner_ids)
        self.site = SitePackages(folder / "site", settings, self.workspace)  # what %pip installed
        self.created = time.time()
        self.last_used = time.monotonic()
        self.executions = 0
        self._owner_ids = owner_ids
        self._handle: KernelHandle | None = None
        self._client: KernelClient | None = None
        self._lock = asyncio.Lock()
        self._running: asyncio.Task | None = None  # the task whose execution holds the kernel
        self._closed = False
        self._figures = 0
        self._own_filesystem = own_filesystem  # the workspace is a mounted image sized to its quota
        self._connection_info: dict | None = None  # the host side of the running kernel's connection
        self._relays: set[KernelRelay] = set()  # notebook clients attached to the running kernel
        self.supervisor = KernelSupervisor(backend, settings.kernel_watch, self._lock, self.id, self._replace,
                                           self._end_relays, self._watched)
        self.isolation = isolation  # one of the backend's isolations(), or None for its default
        self.paused = False  # no kernel: variables saved (``pause``), loaded again on the next use
        self.pause_report: StateReport | None = None  # what the last pause saved
        self.pause_note: str | None = None  # the same in words, also for a pause an earlier process made
        self._restore = False  # the next kernel loads the saved variables
        self._resumed: str | None = None  # what the last resume brought back, for the next execution
        # told before a paused session starts a kernel again (the manager checks there is room), and after
        self.before_resume: Callable[[Session], None] | None = None
        self.after_resume: Callable[[Session], Awaitable[None]] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """An execution is running or waiting, or a notebook client's request runs (``attach``);
        callers doing longer work (a chat turn) call ``touch()`` so the idle reaper leaves the
        session alone."""
        return self._lock.locked() or any(r.running for r in self._relays)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the kernel and wait until it answers; on failure nothing is left running."""
        try:
            if self._own_filesystem:
                await asyncio.to_thread(diskfs.create, self.workspace.root, self.folder / diskfs.IMAGE_NAME,
                                        self.limits.workspace_bytes, self._owner_ids)
            await self._start_kernel()
        except BaseException:
            await self.close()
            raise

    async def reopen(self, handle: KernelHandle | None) -> None:
        """Take up a session an earlier server process left: its workspace is remounted where it
        has its own filesystem, and ``handle``, its kernel still running (the server was killed),
        is connected to again as it is, variables and all. Without a handle, or when the kernel
        does not answer, the session is paused: its next use starts a kernel and loads what the
        last pause saved."""
        if self._own_filesystem:
            await asyncio.to_thread(diskfs.remount, self.workspace.root, self.folder / diskfs.IMAGE_NAME)
        if handle is not None:
            try:
                rt = self.runtime_dir
                if len(str(rt)) + 12 > MAX_SOCKET_PATH:
                    self._socket_dir = await asyncio.to_thread(socket_alias, f"{os.getpid()}-{self.id}", rt)
                info = await asyncio.to_thread(read_connection_file, rt, self._socket_dir)
                self._handle = handle
                self._client = KernelClient(info)
                await self._client.connect(self.settings.start_timeout_s / 4)
                self._connection_info = info
                self.supervisor.started(handle)
                return
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot be reached is replaced
                log.warning("session %s: its running kernel could not be reached again (%s): it is paused", self.id, exc)
                await self._stop_kernel()
                if handle.ref is not None:
                    await self.backend.stop(handle)
        self.paused = True
        self._restore = await asyncio.to_thread(self.workspace.root.joinpath(STATE_DIR).is_dir)

    async def _start_kernel(self) -> None:
        rt = self.runtime_dir
        if len(str(rt)) + 12 > MAX_SOCKET_PATH and self._socket_dir == rt:
            self._socket_dir = await asyncio.to_thread(socket_alias, f"{os.getpid()}-{self.id}", rt)
        if len(str(self._socket_dir)) + 12 > MAX_SOCKET_PATH:
            raise SandboxError(f"the runtime folder {rt} is too long for Unix sockets: set JUPYBOX_HOME to a shorter path")
        kernel_rt, _ = self.backend.kernel_paths(self._spec_base())
        if kernel_rt == str(rt):  # a kernel on this host's filesystem binds where this host connects
            kernel_rt = str(self._socket_dir)
        info = await asyncio.to_thread(self._fresh_runtime_dir, kernel_rt)
        await asyncio.to_thread(self.site.prepare)
        spec = self._spec_base()
        spec.boot_args = ["-f", f"{kernel_rt}/kernel.json", "--HistoryManager.enabled=False"]
        self._handle = await self.backend.start(spec)
        deadline = time.monotonic() + self.settings.start_timeout_s
        alive_checked = time.monotonic()
        while not sockets_ready(rt):
            if time.monotonic() > deadline:
                raise SandboxError(f"the kernel did not start within {self.settings.start_timeout_s:.0f} s")
            # asking the daemon is costly: many sessions starting at once would keep it (and the
            # CPUs) busy answering, so the socket files are polled often and the process rarely
            if time.monotonic() - alive_checked > self.settings.kernel_watch.start_check_s:
                if not await self.backend.is_alive(self._handle):
                    reason = await self.backend.exit_reason(self._handle)
                    raise SandboxError(f"the kernel failed to start: {reason}")
                alive_checked = time.monotonic()
            await asyncio.sleep(0.01)
        self._client = KernelClient(info)
        await self._client.connect(max(deadline - time.monotonic(), 5.0))
        await asyncio.to_thread(self._lock_runtime_dir)
        self._connection_info = info
        self.supervisor.started(self._handle)
        was_paused, self.paused = self.paused, False
        if self._restore:
            self._restore = False
            self._resumed = (await self._load_state()).words()
        elif was_paused:
            self._resumed = "nothing was saved when it was paused: a fresh kernel, no variables"
            if self.pause_report is not None and self.pause_report.error:
                self._resumed = f"nothing was restored: {self.pause_report.error}"
        if was_paused and self.after_resume is not None:
            await self.after_resume(self)

    def _fresh_runtime_dir(self, kernel_rt: str) -> dict:
        """An empty runtime folder with a new connection file, writable by the kernel while it
        starts. Whatever the previous kernel left there (a planted folder, a symlink in place of
        a socket) is removed without following it."""
        rt = self.runtime_dir
        remove_tree(rt)
        if rt.exists() or rt.is_symlink():
            raise SandboxError(f"the runtime folder {rt} could not be cleared for a new kernel")
        rt.mkdir(parents=True, mode=0o700)
        info = write_connection_file(rt, kernel_rt, self._socket_dir)
        if self._owner_ids:
            os.chown(rt, *self._owner_ids)
            os.chown(rt / "kernel.json", *self._owner_ids)
        return info

    def _lock_runtime_dir(self) -> None:
        """Once the kernel has bound its sockets and written its connection file, take the folder
        back: it is a folder on the host's disk, and code in the sandbox must not be able to fill
        it or plant anything in it. Only possible when jupybox runs as root (the kernel then runs as
        another uid); otherwise the kernel is the folder's owner and the README says so."""
        if not self._owner_ids:
            return
        rt = self.runtime_dir
        os.chown(rt / "kernel.json", 0, 0)
        os.chmod(rt / "kernel.json", 0o400)
        os.chown(rt, 0, 0)
        os.chmod(rt, 0o711)

    @property
    def connection(self) -> dict | None:
        """The running kernel's connection info on this host (its channels and signing key), or
        None while it has no kernel: what a relay on this host connects to."""
        return self._connection_info

    @property
    def will_restore(self) -> bool:
        """The next kernel loads variables that a pause saved."""
        return self._restore

    def kernel_spec(self) -> KernelSpec:
        """What the backend is asked for to run this session's kernel (its labels, folders, limits)."""
        return self._spec_base()

    def _spec_base(self) -> KernelSpec:
        lim = self.limits
        return KernelSpec(limits=lim, isolation=self.isolation,
            session_id=self.id, owner=self.owner, runtime_dir=self.runtime_dir,
            workspace_dir=self.workspace.root, site_dir=self.site.folder,
            env={"JUPYBOX_OUTPUT_LIMIT": str(lim.output_bytes), "JUPYBOX_IMAGE_LIMIT": str(lim.max_image_bytes),
                 "JUPYBOX_SESSION": self.id, "JUPYBOX_SITE": self.backend.site_mount or str(self.site.folder)},
        )

    async def _stop_kernel(self, why: Replacement = RESTARTED) -> None:
        self._end_relays(why)  # they were attached to this kernel: their clients reconnect
        self._connection_info = None
        self.supervisor.stopped()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await self.backend.stop(handle)

    def _end_relays(self, why: Replacement) -> None:
        for relay in list(self._relays):
            if self._closed:
                relay.end("the session was closed", "close")
            elif why.autorestart:
                relay.kernel_replaced(why.reason)
            else:
                relay.end(why.reason, "restart")

    def _watched(self) -> Watched:
        return Watched(clients=bool(self._relays), busy=any(r.running for r in self._relays))

    async def _replace(self, why: Replacement) -> None:
        """The supervisor's one way to replace the kernel (it holds the lock): stop it, start a fresh one."""
        self._check_open()
        if self.paused and self.before_resume is not None:
            self.before_resume(self)
        await self._stop_kernel(why)
        await self._start_kernel()

    async def restart(self) -> None:
        """A fresh kernel; the workspace stays (a paused session's saved variables do not)."""
        async with self._lock:
            self._check_open()
            if self._restore:
                self._restore = False
                await asyncio.to_thread(remove_tree, self.workspace.root / STATE_DIR)
            await self.supervisor.replace_locked(self.supervisor.generation)

    # -- pause and resume --------------------------------------------------------------------
    async def pause(self, force: bool = False) -> StateReport:
        """Save the kernel's variables into the workspace (``sandbox.state``), then stop the kernel
        and remove its container; the workspace stays. The next use (an execution, a notebook
        client) starts a fresh kernel that loads them. A running cell is interrupted first, and the
        report says so. ``PauseFailed`` when nothing could be saved (the workspace is full, the
        kernel does not answer): the session then runs on as it was, unless ``force`` (the server
        is stopping), which stops the kernel all the same."""
        self._check_open()
        interrupted = self._lock.locked()
        if interrupted:
            self.interrupt()
        try:
            await asyncio.wait_for(self._lock.acquire(), self.settings.interrupt_grace_s + 2)
        except asyncio.TimeoutError:
            if not force:
                raise PauseFailed("a cell is running and did not stop when interrupted: stop it (or wait), "
                                  "then pause again") from None
            locked = False
        else:
            locked = True
        try:
            self._check_open()
            if self.paused:
                return self.pause_report or StateReport()
            saving = False
            if self._client is None or self.supervisor.needs_replacement or not await self.supervisor.alive():
                report = StateReport(error="the kernel was not running: no variables to save")
            elif not locked:
                report = StateReport(error="a running cell did not stop: the variables could not be saved")
            else:
                saving = True
                try:
                    report = await self._save_state()
                except SandboxError as exc:  # the kernel died or did not answer in time
                    report = StateReport(error=str(exc))
            report.interrupted = interrupted
            if report.error and saving and not force:
                raise PauseFailed(f"the session was not paused, its kernel runs on: {report.error}")
            if report.error:  # an older state would be stale now: the next kernel starts empty
                await asyncio.to_thread(remove_tree, self.workspace.root / STATE_DIR)
            await self._stop_kernel(PAUSED)
            self.paused, self._restore, self.pause_report = True, not report.error, report
            self.pause_note = report.words()
            log.info("session %s paused: %s", self.id, report.words())
            return report
        finally:
            if locked:
                self._lock.release()

    def take_resumed(self) -> str | None:
        """What the last resume restored, in words, once (the next execution reports it)."""
        words, self._resumed = self._resumed, None
        return words

    async def _save_state(self) -> StateReport:
        kernel_ws = self.backend.kernel_paths(self._spec_base())[1]
        code = save_code(kernel_ws, max_var_bytes=max(self.limits.workspace_bytes // 2, 1 << 20))
        stdout = await self._run_quietly(code, self.settings.pause_timeout_s)
        return parse_report(stdout)

    async def _load_state(self) -> StateReport:
        """In the fresh kernel (the lock is held): load what the last pause saved, then remove it,
        so that the quota is free again and a later crash never brings back stale variables."""
        kernel_ws = self.backend.kernel_paths(self._spec_base())[1]
        try:
            report = parse_report(await self._run_quietly(restore_code(kernel_ws), self.settings.pause_timeout_s))
        except SandboxError as exc:
            report = StateReport(error=f"the saved variables could not be loaded ({exc}): a fresh kernel")
        await asyncio.to_thread(remove_tree, self.workspace.root / STATE_DIR)
        return report

    async def _run_quietly(self, code: str, timeout: float) -> str:
        """Run the server's own ``code`` (the lock is held) and return what it printed; it leaves
        no history and no execution count. ``SandboxError`` when the kernel died or timed out."""
        assert self._client is not None and self._handle is not None
        raw = RawResult()
        collector = OutputCollector(raw, STATE_OUTPUT_BYTES, 0, 0, None)
        handle = self._handle
        msg_id = self._client.send_execute(code, store_history=False)
        await self._client.collect(msg_id, collector, time.monotonic() + timeout,
                                   lambda: self.backend.is_alive(handle))
        if raw.died:
            raise SandboxError("the kernel died while its variables were being saved or loaded "
                               f"({await self.backend.exit_reason(handle)})")
        if not raw.done:
            self._client.interrupt()
            raise SandboxError(f"saving or loading the variables took longer than {timeout:g} s")
        return "".join(o.text or "" for o in raw.outputs if o.kind == "stream")

    def interrupt(self, task: asyncio.Task | None = None) -> None:
        """Interrupt what the kernel is running now (from another task than the one executing);
        the running ``execute`` then returns with the KeyboardInterrupt as its error. With ``task``,
        only if that task's execution is the one running (not one still waiting for its turn)."""
        if task is not None and task is not self._running:
            return
        if self._client is not None:
            self._client.interrupt()

    async def close(self, keep_workspace: bool = False) -> None:
        """Stop the kernel and remove the session's folders. Idempotent. A running execution is
        interrupted first and given the grace period to return (it then raises ``SessionClosed``)."""
        self._closed = True
        await self.supervisor.close()
        if self._lock.locked():
            self.interrupt()
            try:
                await asyncio.wait_for(self._lock.acquire(), self.settings.interrupt_grace_s + 2)
                self._lock.release()
            except asyncio.TimeoutError:
                pass
        await self._stop_kernel()
        await asyncio.to_thread(remove_tree, self.runtime_dir)
        if self._socket_dir != self.runtime_dir:
            self._socket_dir.unlink(missing_ok=True)
        if not keep_workspace:
            await asyncio.to_thread(diskfs.release, self.folder)
            await asyncio.to_thread(remove_tree, self.folder)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed: create a new session")

    # -- raw kernel messages (notebook front ends) -------------------------------------------
    async def attach(self, allow_stdin: bool = True) -> KernelRelay:
        """A relay of raw kernel messages for one outside client, on sockets of its own; it ends
        when this kernel is replaced or the session closes. ``allow_stdin``: ``input()`` asks the
        client (a person is there) instead of failing."""
        self._check_open()
        sup = self.supervisor
        if sup.needs_replacement or self._connection_info is None or not await sup.alive():
            async with self._lock:  # behind a running execution, which may restart the kernel itself
                self._check_open()
                if sup.needs_replacement or self._connection_info is None or not await sup.alive():
                    await sup.replace_locked(sup.generation)
        assert self._connection_info is not None
        if len(self._relays) >= MAX_RELAYS_PER_SESSION:
            raise ConnectionLimit(f"this session already has {MAX_RELAYS_PER_SESSION} notebook connections: "
                                  "close one first")
        if open_relays() >= MAX_RELAYS:
            raise ConnectionLimit(f"the server holds {MAX_RELAYS} notebook connections: try again later")
        relay = KernelRelay(self, self._connection_info, sup.generation, self.limits, self.settings.kernel_watch,
                            allow_stdin=allow_stdin)
        self._relays.add(relay)  # before it opens: a restart meanwhile ends it, and open() says so
        await relay.open(self.settings.start_timeout_s)
        sup.ensure_watching()
        self.touch()
        return relay

    # -- what a relay may ask of its session (``RelayOwner``) ---------------------------------
    def detach(self, relay: KernelRelay) -> None:
        self._relays.discard(relay)

    def replace_kernel(self, generation: int, what: str, reason: str) -> None:
        self.supervisor.replace_soon(generation, Replacement(what, reason))

    def pip_request(self, request: object) -> None:
        self.site.submit(request)

    # -- execution --------------------------------------------------------------------------
    async def execute(self, code: str, timeout: float | None = None,
                      on_output: OutputCallback | None = None, cancel: asyncio.Event | None = None) -> Execution:
        """Run ``code`` and return its ``Execution``; ``on_output`` sees each output as it arrives.
        What the code does is data (status error / timeout / crashed); only infrastructure
        failures raise ``SandboxError``. A ``cancel`` already set when its turn comes (it waited
        behind another caller's run) means the code is not run at all."""
        timeout = self.settings.default_timeout_s if timeout is None else timeout
        async with self._lock:
            self._check_open()
            self.last_used = time.monotonic()
            self.executions += 1
            self._running = asyncio.current_task()
            try:
                return await self._execute(code, timeout, on_output, cancel)
            except SessionClosed:
                raise
            except Exception:
                if self._closed:  # closed under our feet: the kernel's channels went away
                    raise SessionClosed(f"session {self.id} was closed during the execution") from None
                raise
            finally:
                self._running = None
                self.last_used = time.monotonic()

    async def stream(self, code: str, timeout: float | None = None,
                     cancel: asyncio.Event | None = None) -> AsyncIterator[Output | Execution]:
        """``execute`` as an async iterator: each ``Output`` as it arrives, then the ``Execution``.
        Setting ``cancel`` interrupts this execution (never another caller's); a consumer that stops
        iterating early interrupts it too, or drops it if it is still waiting for its turn."""
        queue: asyncio.Queue[Output] = asyncio.Queue()
        task = asyncio.ensure_future(self.execute(code, timeout, queue.put_nowait, cancel))
        task.add_done_callback(_retrieve)
        stop = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
        interrupted = False
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                waiting = {getter, task} if stop is None or interrupted else {getter, task, stop}
                # a cancel that came while the run waited for its turn is acted on once it runs
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=0.1 if stop is not None and stop.done() and not interrupted else None)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
                if stop is not None and stop.done() and not interrupted and task is self._running:
                    self.interrupt(task)  # once: the kernel stops, the execution returns its error
                    interrupted = True
            yield task.result()  # an infrastructure failure raises here
        finally:
            if stop is not None:
                stop.cancel()
            if not task.done() and task is self._running:  # the consumer left mid-execution
                self.interrupt(task)  # the run ends on its own (its timeout handling included)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=self.settings.interrupt_grace_s + 2)
            elif not task.done():  # still waiting for its turn: dropped
                task.cancel()

    async def _execute(self, code: str, timeout: float, on_output: OutputCallback | None,
                       cancel: asyncio.Event | None = None) -> Execution:
        sup = self.supervisor
        if sup.needs_replacement or self._client is None:  # notebook clients still attached hear why
            await sup.replace_locked(sup.generation, RESTARTED if sup.handle is None else DIED)
        assert self._client is not None and self._handle is not None
        resumed = self.take_resumed()
        generation = sup.generation
        if cancel is not None and cancel.is_set():  # no await from here to the request: it is sent or not at all
            return Execution(status=ExecutionStatus.ERROR, reason="Stopped before it ran: nothing was executed.",
                             resumed=resumed)
        lim = self.limits
        raw = RawResult()
        collector = OutputCollector(raw, lim.output_bytes + 1024, lim.max_images, lim.max_image_bytes, on_output,
                                    self.site.submit)
        handle = self._handle
        is_alive = lambda: self.backend.is_alive(handle)  # noqa: E731
        t0 = time.monotonic()
        msg_id = self._client.send_execute(code)
        await self._client.collect(msg_id, collector, t0 + timeout, is_alive)
        if raw.aborted and not raw.outputs:  # dropped unrun by the kernel: it is idle now, so once more
            raw.done = raw.aborted = False
            msg_id = self._client.send_execute(code)
            await self._client.collect(msg_id, collector, t0 + timeout, is_alive)
        await self.site.settle()  # an install the code stopped waiting for still finishes
        status, reason, state_lost = ExecutionStatus.OK, None, False
        if not raw.done and not raw.died:
            self._client.interrupt()
            await self._client.collect(msg_id, collector, time.monotonic() + self.settings.interrupt_grace_s, is_alive)
            status = ExecutionStatus.TIMEOUT
            if raw.done:
                reason = f"Execution timed out after {timeout:g} s and was interrupted; variables are kept. Pass a larger timeout= for longer work."
            elif not raw.died:
                state_lost = True
                reason = (f"Execution timed out after {timeout:g} s and did not stop when interrupted; "
                          "the kernel was restarted, so earlier variables are lost.")
                await sup.replace_locked(generation)
        if raw.died:
            status, state_lost = ExecutionStatus.CRASHED, True
            reason = f"The kernel died: {await self.backend.exit_reason(handle)}. A fresh kernel will run the next execution; earlier variables are lost."
            sup.mark_dead(generation)
        elif raw.ask_exit:
            status, state_lost = ExecutionStatus.CRASHED, True
            reason = "The code exited the kernel; a fresh kernel will run the next execution, earlier variables are lost."
            sup.mark_dead(generation)
        elif status is ExecutionStatus.OK and any(o.kind == "error" for o in raw.outputs):
            status = ExecutionStatus.ERROR
        elif status is ExecutionStatus.OK and raw.aborted:
            status, reason = ExecutionStatus.ERROR, "The kernel did not run the code (it aborted the request); run it again."
        execution = Execution(
            status=status, outputs=raw.outputs, execution_count=raw.execution_count,
            duration_s=round(time.monotonic() - t0, 4), truncated=raw.dropped,
            state_lost=state_lost, reason=reason, resumed=resumed,
        )
        if any(_image_mime(out) for out in raw.outputs):  # most runs have none: no thread hop for them
            execution.images = await asyncio.to_thread(self.save_images, raw.outputs)  # file IO off the loop
        return execution

    def save_images(self, outputs: list[Output]) -> list[ImageFile]:
        """Write the images among ``outputs`` into the workspace (``figures/``); blocking."""
        saved: list[ImageFile] = []
        for out in outputs:
            mime = _image_mime(out)
            if mime is None:
                continue
            raw = out.data[mime]
            try:
                data = raw.encode() if mime == "image/svg+xml" else base64.b64decode(raw)
            except (ValueError, TypeError, AttributeError):  # the kernel sent garbage
                continue
            try:  # the code may have made figures/ a symlink, a file or a FIFO: then the image is dropped
                name = self._next_figure_name(IMAGE_EXT[mime])
                f = self.workspace.write(name, data)
            except (WorkspaceError, OSError) as exc:
                log.warning("image not saved in session %s: %s", self.id, exc)
                continue
            saved.append(ImageFile(path=f.path, mime=mime, size=f.size))
        return saved

    def _next_figure_name(self, ext: str) -> str:
        while True:
            self._figures += 1
            name = f"figures/fig-{self._figures:03d}.{ext}"
            if not self.workspace.exists(name):
                return name


def _retrieve(task: asyncio.Future) -> None:
    """A run left to finish on its own: its outcome is not anyone's any more, but is read so that
    asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()

