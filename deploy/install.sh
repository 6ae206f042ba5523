#!/usr/bin/env bash
# Install the shoal agent on this host; safe to run again (what is already in place is
# left as it is, and a second run with the same flags changes nothing).
#
#   deploy/install.sh --server --bootstrap-expect 3 --join 10.0.0.11    one of 3 servers
#   deploy/install.sh --client --join 10.0.0.11                         a client agent
#
# What it lays down (PREFIX is empty unless --prefix is given):
#   PREFIX/opt/shoal/venv/                shoal in a virtualenv of its own
#   PREFIX/usr/local/bin/shoal            a link to the venv's `shoal`, on the PATH
#   PREFIX/etc/shoal/agent.yaml           settings from the flags; an existing one is never overwritten
#   PREFIX/var/lib/shoal/                 the agent's state (Raft log, snapshots, process replicas)
#   PREFIX/etc/systemd/system/shoal-agent.service
# and enables the unit (with --start, starts it) when systemd runs this host and no
# --prefix is given.
#
# Where shoal comes from: --from PATH (a checkout, a wheel or an sdist) or a pip
# requirement; by default the checkout this script sits in, else `shoal` from the
# package index. --version V pins it: from the index, shoal==V; from a file or a
# checkout, the script refuses one that is not V. An installed shoal of the wanted
# version is kept (--reinstall installs again).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNIT_SOURCE=$HERE/systemd/shoal-agent.service

usage() {
    cat <<'EOF'
usage: install.sh (--server | --client) [options]

role (needed when /etc/shoal/agent.yaml does not exist yet):
  --server                  hold the cluster state (Raft) and serve the API
  --client                  run workloads only; needs --join
  --bootstrap-expect N      servers: form a new cluster once N servers are seen (3 or 5)
  --join HOST[:PORT]        an agent already in the cluster; repeatable

agent settings (written to agent.yaml):
  --bind ADDR               address to listen on (default 0.0.0.0)
  --advertise ADDR          this host's address for the others (default: the address
                            that routes to the first --join host, else to the default route)
  --node-name NAME          this host's name in the cluster (default: the hostname)
  --label KEY=VALUE         node label; repeatable
  --driver docker|process   runtime drivers; repeatable (default: both)

installation:
  --version V               the shoal version to install
  --from SOURCE             a checkout, wheel or sdist path, or a pip requirement
  --python PY               the Python 3.11+ to build the virtualenv with (default python3)
  --pip-option OPT          passed to pip install; repeatable (e.g. --pip-option=--no-index
                            --pip-option=--find-links=/srv/wheels for an offline host)
  --reinstall               install shoal again even if the wanted version is installed
  --prefix DIR              install under DIR instead of / (tests, packaging): no root
                            needed, and systemd is left alone
  --start                   start (or restart, after a change) the agent with systemd
  -h, --help                this help
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
usage_error() { echo "install.sh: $*" >&2; echo "run install.sh --help for the options" >&2; exit 2; }

ROLE='' BOOTSTRAP='' BIND='' ADVERTISE='' NODE_NAME='' VERSION='' FROM='' PREFIX='' PYTHON=python3
REINSTALL=0 START=0
JOIN=() LABELS=() DRIVERS=() PIP_OPTS=()

while [ $# -gt 0 ]; do
    opt=$1 val=
    case $opt in
        --*=*) val=${opt#*=}; opt=${opt%%=*}; set -- "$opt" "$val" "${@:2}" ;;
    esac
    case $opt in
        --server|--client|--reinstall|--start|-h|--help) shift ;;
        --bootstrap-expect|--join|--bind|--advertise|--node-name|--label|--driver|--version|--from|--python|--pip-option|--prefix)
            [ $# -ge 2 ] || usage_error "$opt needs a value"; val=$2; shift 2 ;;
        -*) usage_error "unknown option $opt" ;;
        *) usage_error "unexpected argument \"$opt\"" ;;
    esac
    case $opt in
        --server|--client)
            [ -z "$ROLE" ] || [ "$ROLE" = "${opt#--}" ] || usage_error "--server and --client exclude each other"
            ROLE=${opt#--} ;;
        --bootstrap-expect) BOOTSTRAP=$val ;;
        --join) JOIN+=("$val") ;;
        --bind) BIND=$val ;;
        --advertise) ADVERTISE=$val ;;
        --node-name) NODE_NAME=$val ;;
        --label) LABELS+=("$val") ;;
        --driver) DRIVERS+=("$val") ;;
        --version) VERSION=$val ;;
        --from) FROM=$val ;;
        --python) PYTHON=$val ;;
        --pip-option) PIP_OPTS+=("$val") ;;
        --prefix) PREFIX=$val ;;
        --reinstall) REINSTALL=1 ;;
        --start) START=1 ;;
        -h|--help) usage; exit 0 ;;
    esac
done

if [ -n "$PREFIX" ]; then
    PREFIX=$(realpath -m "$PREFIX")  # absolute, and nothing made before the checks pass
    [ "$PREFIX" != / ] || PREFIX=''
fi
ETC=$PREFIX/etc/shoal
CONF=$ETC/agent.yaml
DATA=$PREFIX/var/lib/shoal
VENV=$PREFIX/opt/shoal/venv
BIN=$PREFIX/usr/local/bin
UNIT=$PREFIX/etc/systemd/system/shoal-agent.service

# -- the flags, checked before anything is touched ------------------------------------

write_conf=0
[ -e "$CONF" ] || write_conf=1
if [ "$write_conf" = 1 ]; then
    [ -n "$ROLE" ] || usage_error "say --server or --client (there is no $CONF yet to take the role from)"
fi
if [ -n "$BOOTSTRAP" ]; then
    [[ $BOOTSTRAP =~ ^[1-9]$ ]] || usage_error "--bootstrap-expect must be a number of servers from 1 to 9, got \"$BOOTSTRAP\""
    [ "$ROLE" = server ] || usage_error "--bootstrap-expect is for servers: add --server"
fi
if [ "$ROLE" = client ] && [ ${#JOIN[@]} -eq 0 ]; then
    usage_error "a client needs --join HOST: any agent already in the cluster"
fi
for l in "${LABELS[@]}"; do
    [[ $l =~ ^[^=]+=.*$ ]] || usage_error "--label must be KEY=VALUE, got \"$l\""
done
for d in "${DRIVERS[@]}"; do
    [ "$d" = docker ] || [ "$d" = process ] || usage_error "--driver must be docker or process, got \"$d\""
done

# -- prerequisites: every missing one is named at once, then the script stops ----------

missing=()
if [ -z "$PREFIX" ] && [ "$(id -u)" != 0 ]; then
    missing+=("root: run it as root (sudo deploy/install.sh ...), or use --prefix DIR to install elsewhere")
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=("Python 3.11 or newer: \"$PYTHON\" not found (apt-get install python3 python3-venv, or --python PATH)")
elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    have=$("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown)
    missing+=("Python 3.11 or newer: $PYTHON is $have (--python PATH to use another)")
elif ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=("Python's venv module for $PYTHON: apt-get install python3-venv")
fi
wants_docker=1
if [ ${#DRIVERS[@]} -gt 0 ]; then
    wants_docker=0
    for d in "${DRIVERS[@]}"; do [ "$d" != docker ] || wants_docker=1; done
elif [ "$write_conf" = 0 ] && grep -Eq '^drivers:' "$CONF" && ! grep -Eq '^drivers:.*docker' "$CONF"; then
    wants_docker=0
fi
if [ "$wants_docker" = 1 ] && ! command -v dockerd >/dev/null 2>&1 && ! command -v docker >/dev/null 2>&1; then
    missing+=("Docker Engine, for the docker driver: apt-get install docker.io (or --driver process to run plain processes only)")
fi
[ -f "$UNIT_SOURCE" ] || missing+=("the systemd unit $UNIT_SOURCE: run install.sh from a shoal checkout")

# What to install, and which version that is.
src_kind='' src='' want=''
if [ -z "$FROM" ] && [ -f "$HERE/../pyproject.toml" ]; then
    FROM=$(cd "$HERE/.." && pwd)
fi
if [ -z "$FROM" ]; then
    src_kind=index src=shoal${VERSION:+==$VERSION} want=$VERSION
elif [ -d "$FROM" ]; then
    src_kind=checkout src=$(cd "$FROM" && pwd)
    if [ -f "$src/pyproject.toml" ]; then
        want=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$src/pyproject.toml" | head -n 1)
    else
        missing+=("a shoal checkout at $src: it has no pyproject.toml")
    fi
elif [ -f "$FROM" ]; then
    src_kind=file src=$(cd "$(dirname "$FROM")" && pwd)/$(basename "$FROM")
    case $(basename "$src") in
        shoal-*.whl) want=$(basename "$src" | cut -d- -f2) ;;
        shoal-*.tar.gz) want=$(basename "$src" .tar.gz); want=${want#shoal-} ;;
        *) missing+=("a shoal wheel or sdist: $src is neither (shoal-VERSION-*.whl, shoal-VERSION.tar.gz)") ;;
    esac
elif [[ $FROM == */* ]]; then
    missing+=("the source $FROM: no such file or directory")
else
    src_kind=index src=$FROM want=$VERSION
    [ -z "$VERSION" ] || [[ $FROM == *[=\<\>~]* ]] || src="$FROM==$VERSION"
fi
if [ -n "$VERSION" ] && [ "$src_kind" != index ] && [ -n "$want" ] && [ "$want" != "$VERSION" ]; then
    missing+=("shoal $VERSION: $src is shoal $want (check out $VERSION, or give --from the right wheel)")
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: cannot install until these are fixed:" >&2
    for m in "${missing[@]}"; do echo "  - $m" >&2; done
    exit 1
fi

# This host's address for the others, when nobody said: the source address of the route
# towards the first seed (the interface the cluster is reached through), else of the
# default route. Looking a route up sends nothing.
if [ -n "$ROLE" ] && [ -z "$ADVERTISE" ] && [ "${BIND:-0.0.0.0}" = 0.0.0.0 ]; then
    target=
    if [ ${#JOIN[@]} -gt 0 ]; then
        target=${JOIN[0]%:*}
        [[ $target =~ ^[0-9.]+$ ]] || target=$(getent ahostsv4 "$target" 2>/dev/null | awk 'NR == 1 { print $1 }')
    fi
    if command -v ip >/dev/null 2>&1; then
        for t in $target 192.0.2.1; do
            ADVERTISE=$(ip -4 route get "$t" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
            [ -z "$ADVERTISE" ] || break
        done
    fi
    [ -n "$ADVERTISE" ] || [ "$write_conf" = 0 ] || die "cannot tell this host's address for the other hosts: give --advertise ADDR"
fi

# -- doing it -------------------------------------------------------------------------

did=()       # what changed, for the summary
changed=0    # something the running agent would need a restart for
note() { did+=("$1"); }

# The virtualenv. One made by another Python (an OS upgrade) is made again.
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -I -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    note "unchanged  $VENV (virtualenv)"
else
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    note "created    $VENV (virtualenv, $("$VENV/bin/python" -I -c 'import platform; print("Python", platform.python_version())'))"
fi

installed_version() {
    "$VENV/bin/python" -I -c 'import importlib.metadata as m; print(m.version("shoal"))' 2>/dev/null || true
}
before=$(installed_version)
if [ -n "$before" ] && [ "$REINSTALL" = 0 ] && { [ -z "$want" ] || [ "$before" = "$want" ]; }; then
    note "unchanged  shoal $before (--reinstall to install it again)"
else
    pip=("$VENV/bin/python" -I -m pip install --disable-pip-version-check --no-warn-script-location -q)
    if [ -n "$before" ] && [ "$REINSTALL" = 1 ]; then
        # shoal alone: its dependencies stay as they are when they still satisfy it.
        "$VENV/bin/python" -I -m pip uninstall --disable-pip-version-check -y -q shoal
    fi
    if [ "$src_kind" = checkout ]; then
        # Build from a copy: pip builds in the source tree, and the checkout may be shared
        # (a Vagrant synced folder) or read-only.
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude=./tests --exclude=./bench -cf - . | tar -C "$work" -xf -
        "${pip[@]}" "${PIP_OPTS[@]}" "$work"
    else
        "${pip[@]}" "${PIP_OPTS[@]}" "$src"
    fi
    after=$(installed_version)
    [ -n "$after" ] || die "pip finished but shoal is not installed in $VENV"
    [ -z "$want" ] || [ "$after" = "$want" ] || die "installed shoal $after, not the wanted $want"
    if [ -z "$before" ]; then
        note "installed  shoal $after from $src"
    else
        note "installed  shoal $after from $src (was $before)"
    fi
    changed=1
fi
[ -x "$VENV/bin/shoal" ] || die "$VENV/bin/shoal is missing after the install"

# `shoal` on the PATH.
mkdir -p "$BIN"
if [ -L "$BIN/shoal" ] && [ "$(readlink "$BIN/shoal")" = "$VENV/bin/shoal" ]; then
    note "unchanged  $BIN/shoal -> $VENV/bin/shoal"
elif [ -e "$BIN/shoal" ] && [ ! -L "$BIN/shoal" ]; then
    note "kept       $BIN/shoal (not a link made by this script; $VENV/bin/shoal is the installed one)"
else
    ln -sfn "$VENV/bin/shoal" "$BIN/shoal"
    note "linked     $BIN/shoal -> $VENV/bin/shoal"
fi

# State.
if [ -d "$DATA" ]; then
    note "unchanged  $DATA"
else
    mkdir -p "$DATA"
    chmod 0750 "$DATA"
    note "created    $DATA"
fi

# Settings. Every key `shoal agent` knows is in the file, the unset ones commented out
# with their defaults, so the file documents itself (`shoal agent --print-config` shows
# the effective values).
yaml_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
kv() { printf '%-30s # %s\n' "$1" "$2"; }  # a setting and what it means
render_conf() {
    echo "# shoal agent settings, read by \`shoal agent --config $CONF\` (the systemd unit)."
    echo "# Written by deploy/install.sh, which never overwrites it: edit it freely."
    echo "# Every \`shoal agent\` flag has a key here; a flag given on the command line wins."
    echo "# After a change: systemctl restart shoal-agent (the log level alone: systemctl reload)."
    echo "# Replicas keep running across a restart; the agent adopts them."
    echo
    echo "# Role: a server holds the cluster state (Raft) and serves the API; every agent,"
    echo "# servers included, runs the replicas it is assigned."
    if [ "$ROLE" = server ]; then echo "server: true"; else echo "server: false"; fi
    if [ -n "$BOOTSTRAP" ]; then
        kv "bootstrap_expect: $BOOTSTRAP" "form a new cluster once this many servers are seen"
    else
        kv "# bootstrap_expect: 0" "servers: form a new cluster once this many are seen (3 or 5)"
    fi
    if [ ${#JOIN[@]} -gt 0 ]; then
        kv "join:" "agents already in the cluster, HOST[:GOSSIP_PORT]"
        for j in "${JOIN[@]}"; do echo "  - $(yaml_str "$j")"; done
    else
        kv "# join: []" "agents already in the cluster, HOST[:GOSSIP_PORT]"
    fi
    echo
    echo "# Network."
    kv "bind: $(yaml_str "${BIND:-0.0.0.0}")" "the address to listen on"
    if [ -n "$ADVERTISE" ]; then
        kv "advertise: $(yaml_str "$ADVERTISE")" "the address other hosts reach this one at"
    else
        kv "# advertise: \"\"" "the address other hosts reach this one at (default: bind)"
    fi
    kv "# grpc_port: 7420" "gRPC API (servers)"
    kv "# gossip_port: 7421" "gossip, UDP and TCP"
    kv "# metrics_port: 7422" "Prometheus /metrics over HTTP; 0 turns it off"
    echo
    echo "# This host."
    kv "data_dir: $(yaml_str "$DATA")" "the agent's state"
    if [ -n "$NODE_NAME" ]; then
        kv "node_name: $(yaml_str "$NODE_NAME")" "this host's name in the cluster"
    else
        kv "# node_name: \"\"" "this host's name in the cluster (default: the hostname)"
    fi
    if [ ${#LABELS[@]} -gt 0 ]; then
        kv "labels:" "for nodeSelector"
        for l in "${LABELS[@]}"; do echo "  $(yaml_str "${l%%=*}"): $(yaml_str "${l#*=}")"; done
    else
        kv "# labels: {}" "for nodeSelector, e.g. {zone: eu-1, disk: ssd}"
    fi
    if [ ${#DRIVERS[@]} -gt 0 ]; then
        list=$(IFS=,; echo "${DRIVERS[*]}")
        kv "drivers: [${list//,/, }]" "runtime drivers"
    else
        kv "# drivers: [docker, process]" "runtime drivers"
    fi
    echo
    echo "# Placement (read by servers)."
    kv "# scheduler_spread_hosts: 3" "binpack keeps a deployment on at least this many hosts"
    kv "# scheduler_sample_threshold: 256" "feasible nodes ranked in full; more are ranked by sample"
    kv "# scheduler_sample_size: 16" "feasible nodes ranked per replica when sampling"
    echo
    echo "# Logs (to the journal under systemd)."
    kv "# log_level: info" "debug, info, warning or error; systemctl reload applies it"
    kv "# log_json: false" "JSON lines instead of key=value"
    kv "# dev: false" "a one-process cluster on loopback: not for a real host"
}
if [ "$write_conf" = 1 ]; then
    mkdir -p "$ETC"
    tmp=$(mktemp "$ETC/.agent.yaml.XXXXXX")
    render_conf >"$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$CONF"
    note "wrote      $CONF"
    changed=1
elif [ -z "$ROLE" ] || [ "$(render_conf)" = "$(cat "$CONF")" ]; then
    note "unchanged  $CONF"
else
    note "kept       $CONF as it is (it differs from what these flags would write; edit it to change a setting)"
fi

# The systemd unit, pointing into PREFIX when there is one.
unit_text=$(sed -e "s#/opt/shoal/#$PREFIX/opt/shoal/#g" -e "s#/etc/shoal/#$PREFIX/etc/shoal/#g" \
    -e "s#/var/lib/shoal#$PREFIX/var/lib/shoal#g" "$UNIT_SOURCE")
unit_changed=0
if [ -f "$UNIT" ] && [ "$(cat "$UNIT")" = "$unit_text" ]; then
    note "unchanged  $UNIT"
else
    mkdir -p "$(dirname "$UNIT")"
    printf '%s\n' "$unit_text" >"$UNIT"
    chmod 0644 "$UNIT"
    note "installed  $UNIT"
    unit_changed=1
    changed=1
fi

next=()
if [ -n "$PREFIX" ]; then
    note "skipped    systemd: --prefix installs leave the service manager alone"
    next+=("$BIN/shoal agent --config $CONF")
elif [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
    note "skipped    systemd: it does not run this host; start the agent some other way"
    next+=("shoal agent --config $CONF")
else
    if [ "$unit_changed" = 1 ]; then
        systemctl daemon-reload
        note "reloaded   systemd's units"
    fi
    if systemctl is-enabled --quiet shoal-agent.service; then
        note "unchanged  shoal-agent.service enabled at boot"
    else
        systemctl enable --quiet shoal-agent.service
        note "enabled    shoal-agent.service at boot"
    fi
    if systemctl is-active --quiet shoal-agent.service; then
        if [ "$changed" = 1 ] && [ "$START" = 1 ]; then
            systemctl restart shoal-agent.service
            note "restarted  shoal-agent.service (replicas keep running; the agent adopts them)"
        elif [ "$changed" = 1 ]; then
            next+=("systemctl restart shoal-agent    # to run what changed")
        else
            note "unchanged  shoal-agent.service running"
        fi
    elif [ "$START" = 1 ]; then
        systemctl start shoal-agent.service
        note "started    shoal-agent.service"
    else
        next+=("systemctl start shoal-agent")
    fi
    next+=("shoal members    # every agent the cluster knows, once the agents have met")
fi

echo "shoal install:"
for line in "${did[@]}"; do echo "  $line"; done
echo "next:"
for line in "${next[@]}"; do echo "  $line"; done
