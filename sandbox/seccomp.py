"""The seccomp profile of sandbox containers: Docker's protections, less io_uring and kin.

Docker 20.10's default profile allows ``io_uring_*``, a large attack surface of the host kernel
that no code in the sandbox needs, and a daemon's default cannot be extended, only replaced. So the
containers get this profile instead: every system call is allowed except those below, which fail
with EPERM (``clone3`` with ENOSYS, so the C library falls back to ``clone``, whose flags a filter
can read). The list covers what an unprivileged process could still reach (io_uring, BPF, perf
events, userfaultfd, the kernel keyring, namespaces, ptrace and cross-process memory access) and,
as a second line behind the dropped capabilities, the privileged calls Docker's default denies.
Only the host's native architecture is allowed at all, so 32-bit entry points cannot dodge a rule.

gVisor (``runsc``, registered with ``--oci-seccomp``) applies the same profile inside its sandbox,
less the ``clone3`` rule: its filter answers every denied call with EPERM whatever ``errnoRet``
says, which would break thread creation, and its own kernel answers ``clone3`` with ENOSYS anyway.
"""

from __future__ import annotations

import json
import platform
from functools import cache
from typing import Any

EPERM, ENOSYS = 1, 38

DENIED = (
    # unprivileged, and large: asynchronous I/O rings, BPF programs, perf events, page-fault handlers
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
    # the kernel keyring
    "keyctl", "add_key", "request_key",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the host as a whole: modules, reboot, swap, clocks, accounting, quotas, the log
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "lookup_dcookie", "name_to_handle_at", "open_by_handle_at",
    "fanotify_init", "personality", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
)
X86_ONLY = ("iopl", "ioperm", "modify_ldt")
# clone flags that make a namespace (CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET)
NAMESPACE_FLAGS = (0x80, 0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
ARCHITECTURES = {"x86_64": "SCMP_ARCH_X86_64", "amd64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64",
                 "arm64": "SCMP_ARCH_AARCH64"}


def profile(machine: str | None = None, gvisor: bool = False) -> dict[str, Any]:
    """The profile as Docker's JSON format has it, for ``machine`` (default: this host's), under
    runc or (``gvisor``) runsc."""
    machine = (machine or platform.machine()).lower()
    denied = [*DENIED, *(X86_ONLY if machine in ("x86_64", "amd64") else ())]
    rules: list[dict[str, Any]] = [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]
    if not gvisor:
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    rules += [{"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
               "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}
              for flag in NAMESPACE_FLAGS]
    arch = ARCHITECTURES.get(machine)
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch] if arch else [], "syscalls": rules}


@cache
def security_opt(runtime: str | None = None) -> str:
    """The profile as a ``--security-opt`` value (the daemon takes the JSON itself) for a Docker
    ``runtime`` (None: the daemon's default, runc)."""
    return "seccomp=" + json.dumps(profile(gvisor=runtime == "runsc"), separators=(",", ":"))
