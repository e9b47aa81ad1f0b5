"""Code run inside a sandbox to report what it may do, shared by the runtimes that must refuse
the same things (the default runtime's seccomp profile and gVisor)."""

from __future__ import annotations

SYSCALL_PROBE = r"""
import ctypes, json, os, resource, subprocess, threading, multiprocessing as mp
libc = ctypes.CDLL(None, use_errno=True)
def call(result):
    return [result, ctypes.get_errno()]
params = ctypes.create_string_buffer(120)
report = {"io_uring_setup": call(libc.syscall(425, 1, params)),  # the same number on x86_64 and arm64
          "unshare_user": call(libc.unshare(0x10000000)),
          "unshare_net": call(libc.unshare(0x40000000))}
t = threading.Thread(target=lambda: None); t.start(); t.join()
child = mp.Process(target=len, args=("x",)); child.start(); child.join()
report["fork"] = child.exitcode
report["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
report["core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
options = {line.split()[1]: line.split()[3].split(",") for line in open("/proc/mounts")}
report["noexec"] = {p: "noexec" in options.get(p, []) for p in ("/tmp", "/mnt/data", "/dev/shm")}
with open("/tmp/run.sh", "w") as fh:
    fh.write("#!/bin/sh\necho ran\n")
os.chmod("/tmp/run.sh", 0o755)
try:
    report["exec_tmp"] = subprocess.run(["/tmp/run.sh"], capture_output=True, text=True).stdout
except OSError as exc:
    report["exec_tmp"] = exc.strerror
print(json.dumps(report))
"""
