"""Kernels in bubblewrap namespaces, for hosts without a Docker daemon.

The docker backend's promises, kept with namespaces and rlimits: no network (a new network namespace
holds only ``lo``), new pid/ipc/uts/cgroup namespaces, an empty root of read-only binds (``/usr``, a
few ``/etc`` files, the kernel's Python: ``sys.prefix`` and the real ``sys.base_prefix`` at their own
paths, since Python finds its stdlib from them), a size-limited tmpfs ``/tmp``, the runtime folder at
``/run/jupybox``, the workspace at ``/mnt/data``, and a cleared environment. The project checkout,
``/root``, ``/home`` and the host's ``/tmp`` are simply not there.

Dropping root. As root, bwrap runs as root *without* a user namespace and the kernel goes through
``setpriv`` to ``sandbox_uid``, a real host uid, then ``unshare --user`` into a namespace mapping only
that uid, where a second ``setpriv`` empties every capability set (bounding included); no_new_privs
holds throughout. Rejected: bwrap's ``--uid`` (bwrap run by root maps it onto host uid 0, so files
written would be root's and ``RLIMIT_NPROC`` would not apply: uid 0 is exempt), and starting bwrap as
the sandbox uid (it must read the bind sources, and the Python install or the session folders often
sit under root's 0700 folders). The extra user namespace is there for ``RLIMIT_NPROC``: the kernel
counts it per (user namespace, uid), so each session gets its own ``limits.pids`` instead of all of
them sharing ``sandbox_uid``'s. When jupybox is not root, bwrap itself runs unprivileged in a user
namespace (``--disable-userns`` then forbids nested ones) and the kernel keeps jupybox's uid.

Memory: ``RLIMIT_AS`` of ``memory_mb`` plus ``AS_HEADROOM_MB``, not a cgroup. A cgroup needs a
writable, delegated cgroup tree, which a service in a container or under a supervisor rarely has,
and writing into someone else's hierarchy is not a backend's business. Address space is not RSS: the
headroom covers what a kernel maps without using, with glibc arenas and thread pools capped so that
stays small. A bomb meets a ``MemoryError`` (status error, kernel alive) rather than a kill; the
kernel may use somewhat more than ``memory_mb`` when it imported little. CPU time is not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import shutil
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Limits, SandboxSettings
from ..errors import BackendUnavailable, SandboxError
from .base import Backend, KernelHandle, KernelSpec, sandbox_words

log = logging.getLogger(__name__)

BOOT = Path(__file__).resolve().parent.parent / "image" / "kernel_boot.py"
BOOT_MOUNT = "/opt/jupybox/kernel_boot.py"
PIPSHIM = BOOT.parent / "pipshim"  # pip that asks jupybox to install from the wheelhouse
PIPSHIM_MOUNT = "/opt/jupybox/pipshim"
AS_HEADROOM_MB = 512  # address space a kernel maps without using: ~200 MiB bare, ~400 with numpy/pandas/matplotlib
ETC = ("ssl", "fonts", "ld.so.cache", "mime.types")  # what the kernel's Python may read from /etc
OOM_MARKS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


@dataclass
class _Kernel:
    proc: asyncio.subprocess.Process
    stderr: deque[bytes] = field(default_factory=lambda: deque(maxlen=16))  # last chunks of stderr
    reader: asyncio.Task[None] | None = None


class BwrapBackend(Backend):
    name = "bwrap"

    def __init__(self, settings: SandboxSettings) -> None:
        super().__init__(settings)
        self.as_root = os.geteuid() == 0
        self.uid, self.gid = ((settings.sandbox_uid, settings.sandbox_gid) if self.as_root
                              else (os.getuid(), os.getgid()))
        self.python = sys.executable

    async def check(self) -> None:
        """Run ``python -c pass`` in the very sandbox a kernel gets, once, and report bwrap's words."""
        tools = ["bwrap", "prlimit", *(["setpriv", "unshare"] if self.as_root else [])]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise BackendUnavailable(
                f"{', '.join(missing)} not found: install them (`apt-get install bubblewrap util-linux`) "
                "or choose another backend (--backend docker)")
        proc = await self._spawn(None, [self.python, "-I", "-c", "pass"])
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise BackendUnavailable("bubblewrap did not start a trivial sandbox within 30 s") from None
        if proc.returncode != 0:
            said = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
            raise BackendUnavailable(
                f"bubblewrap could not start a sandbox here: {said}. If user namespaces are off, enable them "
                "(`sysctl -w kernel.unprivileged_userns_clone=1`, `sysctl -w user.max_user_namespaces=10000`);"
                " otherwise use --backend docker")

    async def start(self, spec: KernelSpec) -> KernelHandle:
        try:
            proc = await self._spawn(spec, [self.python, BOOT_MOUNT, *spec.boot_args])
        except OSError as exc:
            raise SandboxError(f"could not start bwrap: {exc}") from None
        kernel = _Kernel(proc)
        kernel.reader = asyncio.create_task(_drain(proc.stderr, kernel.stderr))
        log.debug("session %s: kernel started under bwrap pid %d", spec.session_id, proc.pid)
        return KernelHandle(spec=spec, ref=kernel)

    async def is_alive(self, handle: KernelHandle) -> bool:
        return handle.ref.proc.returncode is None

    async def exit_reason(self, handle: KernelHandle) -> str:
        kernel: _Kernel = handle.ref
        if kernel.reader is not None:  # let the last words arrive
            await asyncio.wait({kernel.reader}, timeout=1)
        tail = b"".join(kernel.stderr).decode(errors="replace").strip()
        last = sandbox_words(" ".join(tail.splitlines()[-3:]))
        code = kernel.proc.returncode
        sig = code - 128 if code is not None and code > 128 else None  # bwrap exits 128+N on signal N
        if any(mark in tail for mark in OOM_MARKS):
            return f"out of memory (the session's limit is {handle.spec.limits.memory_mb} MiB)"
        if sig == signal.SIGKILL:  # the rlimit never kills; the host's OOM killer (or the code itself) does
            return "killed (SIGKILL), perhaps by the host's out-of-memory killer"
        if sig is not None and sig in signal.valid_signals():
            return f"the kernel was killed by signal {signal.Signals(sig).name}{last}"
        return f"the kernel process exited with code {code}{last}"

    async def stop(self, handle: KernelHandle) -> None:
        """SIGKILL what runs under bwrap (its pid 1 and the kernel sit in a session of their own; the
        pid namespace dies with its init), let bwrap reap them and exit, then kill bwrap's process
        group should it linger. Idempotent."""
        kernel: _Kernel = handle.ref
        proc = kernel.proc
        for pid in _descendants(proc.pid) if proc.returncode is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 2)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if kernel.reader is not None:
            kernel.reader.cancel()

    # -- the sandbox -------------------------------------------------------------------------
    async def _spawn(self, spec: KernelSpec | None, command: list[str]) -> asyncio.subprocess.Process:
        """bwrap in a process group of its own, stderr piped for ``exit_reason``."""
        fds: list[int] = []
        try:
            argv = ["bwrap", *self._sandbox_args(spec, fds), "--", *self._launcher(spec.limits if spec else self.settings.limits), *command]
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, pass_fds=fds, start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)

    def _launcher(self, lim: Limits) -> list[str]:
        """Between bwrap and the kernel: drop root (see the module docstring), then the rlimits, last,
        so they bind the kernel only and ``RLIMIT_NPROC`` counts in the kernel's own user namespace."""
        drop: list[str] = []
        if self.as_root:
            drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--no-new-privs", "--",
                    "unshare", "--user", f"--map-user={self.uid}", f"--map-group={self.gid}", "--keep-caps", "--",
                    "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"]
        address_space = _capped(resource.RLIMIT_AS, (lim.memory_mb + AS_HEADROOM_MB) * 2**20)
        return [*drop, "prlimit", f"--as={address_space}", f"--nproc={_capped(resource.RLIMIT_NPROC, lim.pids)}",
                f"--fsize={_capped(resource.RLIMIT_FSIZE, lim.file_bytes)}", "--"]

    def _sandbox_args(self, spec: KernelSpec | None, fds: list[int]) -> list[str]:
        lim = spec.limits if spec else self.settings.limits
        threads = str(max(1, math.ceil(lim.cpus)))
        env = {"PATH": f"{PIPSHIM_MOUNT}/bin:{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "LANG": "C.UTF-8", "PYTHONPATH": PIPSHIM_MOUNT, "JUPYBOX_SITE": str(self.site_mount),
               "MPLCONFIGDIR": "/tmp/matplotlib", "IPYTHONDIR": "/tmp/.ipython", "OMP_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MALLOC_ARENA_MAX": "2",
               **(spec.env if spec else {})}
        if self.as_root:  # no user namespace here (see the module docstring); setpriv needs these three
            args = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                    "--cap-add", "CAP_SETPCAP"]
        else:
            args = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += ["--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(lim.tmp_mb * 2**20), "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(64 * 2**20), "--tmpfs", "/dev/shm"]
        made: set[str] = set()

        def bind(src: str, dest: str, how: str = "--ro-bind") -> None:
            args.extend([*_parents(dest, made), how, src, dest])

        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = Path("/", top)
            if path.is_symlink():  # merged /usr: keep the link
                args.extend(["--symlink", os.readlink(path), str(path)])
            elif path.is_dir():
                bind(str(path), str(path))
        for name in ETC:
            if Path("/etc", name).exists():
                bind(f"/etc/{name}", f"/etc/{name}")
        if Path("/etc/localtime").is_symlink():
            bind(os.readlink("/etc/localtime"), "/etc/localtime", "--symlink")
        bind(_data(fds, f"root:x:0:0::/root:/usr/sbin/nologin\n"
                        f"sandbox:x:{self.uid}:{self.gid}::/tmp:/usr/sbin/nologin\n"), "/etc/passwd", "--ro-bind-data")
        bind(_data(fds, f"root:x:0:\nsandbox:x:{self.gid}:\n"), "/etc/group", "--ro-bind-data")
        bind(_data(fds, "127.0.0.1 localhost sandbox\n::1 localhost\n"), "/etc/hosts", "--ro-bind-data")
        for prefix in sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}):
            if not prefix.startswith("/usr/"):  # the kernel's Python, where it expects to be
                bind(prefix, prefix)
        if sys.prefix != os.path.realpath(sys.prefix):  # a venv reached through a symlink
            bind(os.path.realpath(sys.prefix), sys.prefix, "--symlink")
        bind(str(BOOT), BOOT_MOUNT)
        bind(str(PIPSHIM), PIPSHIM_MOUNT)
        if spec is not None and spec.site_dir is not None:
            bind(str(spec.site_dir), str(self.site_mount))  # read-only: the host installs, the kernel imports
        if spec is not None:
            runtime, workspace = self.kernel_paths(spec)
            bind(str(spec.runtime_dir), runtime, "--bind")
            bind(str(spec.workspace_dir), workspace, "--bind")
            args.extend(["--chdir", workspace])
        return args


def _capped(which: int, value: int) -> int:
    """No higher than jupybox's own hard limit, which an unprivileged prlimit cannot raise."""
    hard = resource.getrlimit(which)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _parents(path: str, made: set[str]) -> list[str]:
    """``--dir`` for each missing ancestor, world-traversable (bwrap would make them 0700, which a
    kernel dropped to another uid could not cross)."""
    args: list[str] = []
    parts = Path(path).parent.parts[1:]
    for i in range(len(parts)):
        folder = "/" + "/".join(parts[: i + 1])
        if folder not in made and folder not in ("/usr", "/tmp", "/dev", "/proc"):
            made.add(folder)
            args += ["--perms", "0755", "--dir", folder]
    return args


def _data(fds: list[int], text: str) -> str:
    """A small file made up for the sandbox, handed to bwrap as a pipe's read end."""
    read, write = os.pipe()
    fds.append(read)
    os.write(write, text.encode())  # far below a pipe's buffer: cannot block
    os.close(write)
    return str(read)


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid``, from /proc (bwrap's pid 1 and the kernel, which setsid away)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
        if parent != pid:
            found.append(parent)
    return found


async def _drain(stream: asyncio.StreamReader | None, tail: deque[bytes]) -> None:
    """Read the sandbox's stderr to its end, keeping the last chunks for ``exit_reason``."""
    if stream is None:
        return
    while chunk := await stream.read(4096):
        tail.append(chunk)
