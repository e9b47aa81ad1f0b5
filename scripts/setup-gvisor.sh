#!/usr/bin/env bash
# Make gVisor available to Docker as the runtime "runsc", for `--runtime runsc` /
# SandboxSettings(docker_runtime="runsc"). Idempotent; run as root.
#
#   1. installs Debian's `runsc` package when the binary is missing;
#   2. registers it in /etc/docker/daemon.json (merged: other keys are kept) with the flags jupybox
#      needs: --host-uds=all (the kernel's ZMQ ipc sockets live in a bind-mounted folder and must be
#      reachable from the host), --platform=ptrace (works without KVM and inside VMs; the kvm
#      platform can hang at start), --network=none (no network stack at all in the sandbox),
#      --oci-seccomp (gVisor applies the container's seccomp profile, jupybox's deny list, inside
#      the sandbox too; without it runsc ignores the profile);
#   3. reloads dockerd's configuration with SIGHUP (running containers are not touched) and waits
#      until `docker info` lists the runtime.
#
# Environment: RUNSC_PLATFORM (default ptrace), DOCKER_CONFIG_FILE (default /etc/docker/daemon.json).
set -euo pipefail

RUNTIME_NAME=runsc
PLATFORM="${RUNSC_PLATFORM:-ptrace}"
CONFIG="${DOCKER_CONFIG_FILE:-/etc/docker/daemon.json}"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-gvisor: run as root (it installs a package and edits $CONFIG)" >&2
    exit 1
fi

# -- 1. the runsc binary -----------------------------------------------------------------------
if ! command -v runsc >/dev/null 2>&1; then
    echo "setup-gvisor: installing runsc"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends runsc >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends runsc >/dev/null; }
fi
RUNSC="$(command -v runsc)"

# -- 2. register it with Docker (merge, never overwrite other settings) -------------------------
mkdir -p "$(dirname "$CONFIG")"
changed="$(python3 - "$CONFIG" "$RUNTIME_NAME" "$RUNSC" "$PLATFORM" <<'PY'
import json, os, sys

path, name, binary, platform = sys.argv[1:5]
try:
    with open(path) as fh:
        text = fh.read()
    config = json.loads(text) if text.strip() else {}
except FileNotFoundError:
    config = {}
wanted = {"path": binary,
          "runtimeArgs": ["--host-uds=all", f"--platform={platform}", "--network=none", "--oci-seccomp"]}
runtimes = config.setdefault("runtimes", {})
if runtimes.get(name) == wanted:
    print("no")
else:
    runtimes[name] = wanted
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    print("yes")
PY
)"
[ "$changed" = yes ] && echo "setup-gvisor: registered runtime $RUNTIME_NAME in $CONFIG"

# -- 3. reload the daemon and wait for the runtime ----------------------------------------------
has_runtime() {
    docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null \
        | tr ' ' '\n' | grep -qx "$RUNTIME_NAME"
}

if ! docker info >/dev/null 2>&1; then
    echo "setup-gvisor: no Docker daemon answers; $CONFIG is ready for its next start"
    exit 0
fi
if [ "$changed" = yes ] || ! has_runtime; then
    pid="$(pidof dockerd || true)"
    if [ -z "$pid" ]; then
        echo "setup-gvisor: dockerd answers but its process is not visible here; reload it by hand" >&2
        exit 1
    fi
    kill -HUP $pid
    for _ in $(seq 1 50); do
        has_runtime && break
        sleep 0.2
    done
fi
if ! has_runtime; then
    echo "setup-gvisor: dockerd does not list the runtime $RUNTIME_NAME after a reload (see its log)" >&2
    exit 1
fi
echo "setup-gvisor: Docker runtime $RUNTIME_NAME is ready ($RUNSC, platform $PLATFORM)"
