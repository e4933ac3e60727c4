#!/usr/bin/env bash
# Start the local Kafka-protocol broker (Tansu, in memory) in the background
# and wait until it answers metadata requests (no fixed sleeps).
#   infra/broker/start.sh [PORT]      default 9092; prints HOST:PORT
# Environment: ARBITER_RUN_DIR (default runs/broker), ARBITER_TOPIC_PREFIX,
#   PYTHON (default .venv/bin/python), ARBITER_BROKER_START_TIMEOUT (s, default 60).
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT="${1:-9092}"
RUN_DIR="${ARBITER_RUN_DIR:-runs/broker}"
PYTHON="${PYTHON:-.venv/bin/python}"
TIMEOUT="${ARBITER_BROKER_START_TIMEOUT:-60}"
mkdir -p "$RUN_DIR"
PID_FILE="$RUN_DIR/broker.pid"
READY_FILE="$RUN_DIR/broker.ready"

if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  if [[ -f "$READY_FILE" ]]; then head -n 1 "$READY_FILE"; exit 0; fi
  echo "broker (pid $(cat "$PID_FILE")) is starting or unhealthy; run infra/broker/stop.sh" >&2
  exit 1
fi
rm -f "$READY_FILE"
nohup "$PYTHON" -m cli broker --port "$PORT" --create-topics \
  --topic-prefix "${ARBITER_TOPIC_PREFIX:-}" --ready-file "$READY_FILE" \
  --log-file "$RUN_DIR/tansu.log" >"$RUN_DIR/broker.out" 2>&1 &
echo $! >"$PID_FILE"

deadline=$((SECONDS + TIMEOUT))
until [[ -f "$READY_FILE" ]]; do
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "broker exited while starting:" >&2
    tail -n 20 "$RUN_DIR/broker.out" >&2
    rm -f "$PID_FILE"
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "broker not ready within ${TIMEOUT}s; see $RUN_DIR/broker.out" >&2
    exit 1
  fi
  sleep 0.1
done
head -n 1 "$READY_FILE"
