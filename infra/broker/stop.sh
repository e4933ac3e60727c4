#!/usr/bin/env bash
# Stop the broker started by infra/broker/start.sh: SIGTERM (the CLI stops
# Tansu in order), SIGKILL after ARBITER_BROKER_STOP_TIMEOUT seconds (default 15).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN_DIR="${ARBITER_RUN_DIR:-runs/broker}"
PID_FILE="$RUN_DIR/broker.pid"
TIMEOUT="${ARBITER_BROKER_STOP_TIMEOUT:-15}"
[[ -f "$PID_FILE" ]] || { echo "no broker pid file at $PID_FILE"; exit 0; }
PID="$(cat "$PID_FILE")"
if kill -0 "$PID" 2>/dev/null; then
  kill -TERM "$PID"
  deadline=$((SECONDS + TIMEOUT))
  while kill -0 "$PID" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "broker (pid $PID) did not stop in ${TIMEOUT}s; killing it" >&2
      kill -KILL "$PID" 2>/dev/null || true
      # Tansu runs in its own session: without the CLI to stop it, kill it too.
      TANSU_PID="$(sed -n 's/^tansu_pid=//p' "$RUN_DIR/broker.ready" 2>/dev/null || true)"
      [[ -n "$TANSU_PID" ]] && kill -KILL "$TANSU_PID" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
fi
rm -f "$PID_FILE" "$RUN_DIR/broker.ready"
echo "broker stopped"
