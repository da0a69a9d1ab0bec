#!/usr/bin/env bash
# Start a local MLflow tracking server + model registry for pcl-hpc.
#
# Usage: tools/mlflow_server.sh [DIR] [PORT]
#   DIR   folder for the server's data (default: outputs). Runs and registered models go to
#         DIR/mlflow.db (sqlite), artifacts to DIR/mlartifacts (served through the server).
#         Pointing DIR at a demo's output folder serves the mlflow.db that runs without a server
#         wrote there (pcl_hpc.tracking puts their artifacts in the same DIR/mlartifacts).
#   PORT  port on 127.0.0.1 (default: 5000). The server is bound to localhost only.
#
# Then point training at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
# (or tracking.uri=http://127.0.0.1:PORT), and open the same URL in a browser for the UI.
# From another machine use an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host) rather than
# binding to 0.0.0.0: the server has no authentication and the runs describe medical data.
#
# Environment: PYTHON (default: the repo's .venv/bin/python, else python3), WORKERS (default 1),
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (default false here: no GenAI job-runner process).
# Stop it with Ctrl-C. Extra arguments after PORT are passed to `mlflow server`.
set -euo pipefail

DIR="${1:-outputs}"
PORT="${2:-5000}"
shift $(( $# > 2 ? 2 : $# ))

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! [[ "$PORT" =~ ^[0-9]+$ ]]; then
  echo "mlflow_server.sh: PORT must be a number, got '$PORT' (usage: tools/mlflow_server.sh [DIR] [PORT])" >&2
  exit 2
fi

for arg in "$@"; do
  case "$arg" in
    -h|--host|--host=*)
      echo "mlflow_server.sh: the server is bound to 127.0.0.1 only; use an SSH tunnel instead of --host" >&2
      exit 2 ;;
  esac
done

# No GenAI job runner (an extra process pcl-hpc never uses) unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

mkdir -p "$DIR/mlartifacts"
DIR="$(cd "$DIR" && pwd)"
echo "MLflow server: http://127.0.0.1:$PORT  (db $DIR/mlflow.db, artifacts $DIR/mlartifacts)"
echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
exec "$PYTHON" -m mlflow server \
  --host 127.0.0.1 --port "$PORT" --workers "${WORKERS:-1}" \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --artifacts-destination "$DIR/mlartifacts" \
  "$@"
