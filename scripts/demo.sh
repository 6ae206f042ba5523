#!/usr/bin/env bash
# The demo: set everything up, start `shoal agent --dev` in the background, apply the
# seed example (examples/hello-world) and show port 80 answering three times.
#
#   scripts/demo.sh        bring it up (idempotent: reuses a running dev agent)
#   scripts/demo.sh down   delete the example and stop the dev agent
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STATE=${XDG_STATE_HOME:-$HOME/.local/state}/shoal
PIDFILE=$STATE/dev-agent.pid
LOG=$STATE/dev-agent.log
SHOAL=$ROOT/.venv/bin/shoal

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if [ "${1:-up}" = down ]; then
    if running; then
        "$SHOAL" delete -f examples/hello-world/ || true
        # Let the agent stop the replicas (up to their grace period) before it exits.
        for _ in $(seq 1 200); do
            [ -z "$("$SHOAL" get pods -o json 2>/dev/null)" ] && \
                ! docker ps --filter label=io.shoal.deployment=hello-world -q | grep -q . && break
            sleep 0.2
        done
        kill "$(cat "$PIDFILE")"
        rm -f "$PIDFILE"
        echo "dev agent stopped"
    else
        echo "no dev agent started by this script is running"
    fi
    exit 0
fi

bash scripts/setup.sh
mkdir -p "$STATE"
if ! running; then
    echo "starting shoal agent --dev (log: $LOG)"
    nohup "$SHOAL" agent --dev >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
fi
for _ in $(seq 1 100); do
    "$SHOAL" get nodes >/dev/null 2>&1 && break
    running || { echo "the dev agent exited; see $LOG" >&2; tail -n 20 "$LOG" >&2; exit 1; }
    sleep 0.2
done
"$SHOAL" apply -f examples/hello-world/
echo "waiting for the replicas to serve on port 80"
for _ in $(seq 1 300); do
    curl -fsS --max-time 1 http://localhost:80/ 2>/dev/null | grep -q "Hello World!" && break
    sleep 0.2
done
"$SHOAL" get pods -o wide
for _ in 1 2 3; do curl -sS --max-time 2 http://localhost:80/; echo; done
