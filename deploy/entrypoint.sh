#!/bin/sh
# The app image's entrypoint. Started as root, it does two things only root can, then runs the
# command as uid 1000 with no capabilities left:
#   - make JUPYBOX_HOME (a host folder bind-mounted at the same path) belong to uid 1000, so the
#     app can create the per-session folders its sandboxes mount, whoever created the host folder;
#   - add the group that owns the Docker socket to uid 1000's groups, whatever its id on this host.
# Started as another user (`user:` in compose, `docker run --user`), it runs the command as is:
# that user then needs the socket's group (`group_add`) and a writable JUPYBOX_HOME.
# JUPYBOX_RUN_AS_ROOT=1 keeps root (the app then chowns session folders to the sandbox's uid).
set -eu

if [ "$(id -u)" != 0 ] || [ "${JUPYBOX_RUN_AS_ROOT:-0}" = 1 ]; then
    exec "$@"
fi

uid=1000
gid=1000
home="${JUPYBOX_HOME:-/var/lib/jupybox}"
case "$home" in
    /*) ;;
    *) echo "jupybox: JUPYBOX_HOME must be an absolute path (it is '$home')" >&2; exit 2 ;;
esac
if [ "$home" = / ]; then
    echo "jupybox: JUPYBOX_HOME must not be /" >&2
    exit 2
fi
mkdir -p "$home/sessions"
# Not recursive: the sessions' own folders are created (and owned) by the app itself.
chown "$uid:$gid" "$home" "$home/sessions"

groups="$gid"
socket="${DOCKER_HOST:-unix:///var/run/docker.sock}"
socket="${socket#unix://}"
if [ -S "$socket" ]; then
    socket_gid="$(stat -c %g "$socket")"
    # A socket owned by root's group (gid 0) is shared as is: uid 1000 then joins group 0 too.
    groups="$groups,$socket_gid"
else
    echo "jupybox: no Docker socket at $socket: mount the host's with" \
         "-v /var/run/docker.sock:/var/run/docker.sock" >&2
fi

exec setpriv --reuid="$uid" --regid="$gid" --groups="$groups" --inh-caps=-all -- "$@"
