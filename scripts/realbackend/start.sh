#!/usr/bin/env bash
# Start a real llama.cpp OpenAI-compatible server (via the xllamacpp wheel) on 127.0.0.1
# in the background and wait until it answers. Run setup.sh first.
#
# usage: start.sh PORT [MODEL]       PORT 0 picks a free port
#   MODEL: smollm2 (default; real SmolLM2-135M-Instruct) | tiny (random weights) | /path/file.gguf
# env: POTLUCK_CACHE, RB_THREADS (default: nproc), RB_PARALLEL (slots, default 4),
#      RB_CTX (default 8192, shared by the slots), RB_EMBEDDINGS=1, RB_ALIAS, RB_API_KEY,
#      RB_TIMEOUT (seconds to wait, default 120), RB_CHAT_TEMPLATE (a Jinja file; default for
#      smollm2: smollm2-tools.jinja, its own template plus tools, so llama.cpp reports
#      supports_tools; "none": the model's own)
# prints: READY base_url=http://127.0.0.1:PORT/v1 model=ALIAS pid=PID
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RB_HOME="${POTLUCK_CACHE:-$HOME/.cache/potluck}/realbackend"
PORT="${1:?usage: start.sh PORT [MODEL]}"
MODEL="${2:-smollm2}"
case "$MODEL" in
  smollm2) MPATH="$RB_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"; ALIAS_DEF=smollm2-135m-instruct
           TEMPLATE_DEF="$HERE/smollm2-tools.jinja" ;;
  tiny)    MPATH="$RB_HOME/models/tiny-random-llama.gguf"; ALIAS_DEF=tiny-random-llama ;;
  *)       MPATH="$MODEL"; ALIAS_DEF="$(basename "$MODEL" .gguf)" ;;
esac
[ -f "$MPATH" ] || { echo "model not found: $MPATH (run scripts/realbackend/setup.sh)" >&2; exit 2; }
ARGS=("$MPATH" "$PORT" --ctx "${RB_CTX:-8192}" --parallel "${RB_PARALLEL:-4}"
      --threads "${RB_THREADS:-$(nproc)}" --alias "${RB_ALIAS:-$ALIAS_DEF}")
[ "${RB_EMBEDDINGS:-0}" = 1 ] && ARGS+=(--embeddings --pooling mean)
[ -n "${RB_API_KEY:-}" ] && ARGS+=(--api-key "$RB_API_KEY")
TEMPLATE="${RB_CHAT_TEMPLATE:-${TEMPLATE_DEF:-none}}"
[ "$TEMPLATE" != none ] && ARGS+=(--chat-template-file "$TEMPLATE")
mkdir -p "$RB_HOME/logs" "$RB_HOME/run"
LOG="$RB_HOME/logs/server-$$.log"
nohup "$RB_HOME/venv/bin/python" -u "$HERE/serve_xllamacpp.py" "${ARGS[@]}" >"$LOG" 2>&1 &
PID=$!
DEADLINE=$(( $(date +%s) + ${RB_TIMEOUT:-120} ))
URL=""
while :; do
  kill -0 "$PID" 2>/dev/null || { echo "server exited during startup:" >&2; tail -20 "$LOG" >&2; exit 1; }
  [ -z "$URL" ] && URL="$(sed -n 's/^xllamacpp listening on \(http[^ ]*\).*/\1/p' "$LOG" | head -1)"
  if [ -n "$URL" ] && curl -sf "$URL/health" >/dev/null 2>&1; then break; fi
  [ "$(date +%s)" -lt "$DEADLINE" ] || { echo "timeout waiting for $LOG" >&2; kill "$PID"; exit 1; }
  sleep 0.1
done
P="${URL##*:}"
echo "$PID" > "$RB_HOME/run/server-$P.pid"
echo "READY base_url=$URL/v1 model=${RB_ALIAS:-$ALIAS_DEF} pid=$PID log=$LOG"
