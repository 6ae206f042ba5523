#!/usr/bin/env bash
# Install everything shoal and its tests need on a Debian machine; idempotent.
#
#   - Debian packages: docker.io (Docker Engine), golang-go (builds the example image),
#     nftables and iproute2 (multi-host test clusters), curl, python3-venv when missing,
#     systemd (systemd-analyze checks the unit) and vagrant (vagrant validate checks the
#     Vagrantfile; no hypervisor is needed for that);
#   - a virtualenv at .venv with shoal installed (editable, with the test extras);
#   - a running Docker Engine (scripts/ensure-docker.sh starts dockerd if none answers);
#   - the local images (scripts/build-images.sh): nothing can be pulled from a registry.
#
# Needs root (or sudo) for the apt and dockerd steps only.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SUDO=
[ "$(id -u)" = 0 ] || SUDO="sudo -n"

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v go >/dev/null || missing+=(golang-go)
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
command -v pgrep >/dev/null || missing+=(procps)
command -v python3 >/dev/null || missing+=(python3)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v vagrant >/dev/null || missing+=(vagrant)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}" >&2
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 - <<'PY' || { echo "setup.sh: shoal needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.shoal-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test,fast]'
    touch "$stamp"
fi

bash scripts/ensure-docker.sh
bash scripts/build-images.sh
