#!/usr/bin/env bash
# stop.sh PORT: stop the server that start.sh started on PORT.
set -uo pipefail
RB_HOME="${POTLUCK_CACHE:-$HOME/.cache/potluck}/realbackend"
PIDF="$RB_HOME/run/server-${1:?usage: stop.sh PORT}.pid"
[ -f "$PIDF" ] || { echo "no server recorded on port $1"; exit 0; }
PID="$(cat "$PIDF")"
kill "$PID" 2>/dev/null && for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
kill -9 "$PID" 2>/dev/null; rm -f "$PIDF"; echo "stopped port $1 (pid $PID)"
