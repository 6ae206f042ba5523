#!/usr/bin/env bash
# Make sure a Docker Engine answers `docker info`; a no-op when one already does.
#
# Otherwise: install Debian's docker.io when dockerd (or the docker CLI) is missing,
# start docker.service under systemd, or else dockerd in the background in a session of
# its own (it starts its own containerd when none runs), and
# wait until `docker info` answers, for at most SHOAL_DOCKER_WAIT seconds (default 60).
# dockerd logs to /var/log/shoal-dockerd.log, or to a temporary file when /var/log is
# not writable. Extra dockerd flags (say --data-root) come from SHOAL_DOCKERD_ARGS;
# with DOCKER_HOST set as well, a private daemon can run beside another one -- but give
# it its own bridge (`--bridge=<an existing bridge>`), and never `--bridge=none` next to
# a running daemon: dockerd then deletes the host's docker0, breaking the other one.
# Needs root (or sudo) only when it has to install or start something.
set -euo pipefail

WAIT=${SHOAL_DOCKER_WAIT:-60}

die() { echo "ensure-docker.sh: $*" >&2; exit 1; }

answers() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

if answers; then
    exit 0
fi

SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "Docker Engine does not answer and this is not root (no sudo either)"
    SUDO="sudo -n"
fi

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    echo "ensure-docker.sh: installing docker.io" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null || die "apt-get update failed"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null \
        || die "apt-get install docker.io failed"
fi

# Another run (or the init system) may be bringing a daemon up: give it a moment
# before starting a second one on the same socket.
if [ -z "${DOCKER_HOST:-}" ] && pgrep -x dockerd >/dev/null; then
    echo "ensure-docker.sh: dockerd is running but does not answer yet; waiting" >&2
elif [ -z "${DOCKER_HOST:-}" ] && [ -z "${SHOAL_DOCKERD_ARGS:-}" ] && [ -d /run/systemd/system ] \
        && $SUDO systemctl start docker 2>/dev/null; then
    echo "ensure-docker.sh: started docker.service" >&2
else
    LOG=/var/log/shoal-dockerd.log
    if ! { $SUDO touch "$LOG"; } 2>/dev/null; then
        LOG=$(mktemp -t shoal-dockerd.XXXXXX.log)
    fi
    echo "ensure-docker.sh: starting dockerd (log: $LOG)" >&2
    # shellcheck disable=SC2086  # SHOAL_DOCKERD_ARGS is a list of flags
    # setsid: the daemon must outlive this script's session and process group.
    $SUDO setsid sh -c "exec dockerd ${SHOAL_DOCKERD_ARGS:-} >>'$LOG' 2>&1 </dev/null" >/dev/null 2>&1 </dev/null &
fi

deadline=$(( $(date +%s) + WAIT ))
until answers; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "ensure-docker.sh: dockerd did not answer within ${WAIT}s" >&2
        docker info 2>&1 | tail -n 3 >&2 || true
        if [ -n "${LOG:-}" ] && [ -r "$LOG" ]; then tail -n 20 "$LOG" >&2; fi
        exit 1
    fi
    sleep 0.5
done
echo "ensure-docker.sh: Docker Engine is up" >&2
