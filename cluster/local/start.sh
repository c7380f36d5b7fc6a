#!/usr/bin/env bash
# Start a local Ray head bound to 127.0.0.1, with the dashboard and the job server on
# loopback only (nothing listens on other interfaces). Then submit jobs to it, e.g.
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/build_chain.py --config configs/demo.yaml --storage "$PWD/runs"
# Options by environment: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS, RAY_NUM_GPUS.
set -euo pipefail
cd "$(dirname "$0")/../.."
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
# Without this Ray binds the machine's address even when told 127.0.0.1 (see RAY_NOTES).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
PORT=${RAY_PORT:-6379}
DASH=${RAY_DASHBOARD_PORT:-8265}
args=(--head --port="$PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port="$DASH")
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
"$RAY" start "${args[@]}"
echo
echo "Ray head on 127.0.0.1:$PORT, dashboard and job server on http://127.0.0.1:$DASH"
echo "submit:  $RAY job submit --address http://127.0.0.1:$DASH --working-dir . -- python jobs/build_chain.py --config configs/demo.yaml --storage $PWD/runs"
echo "stop:    cluster/local/stop.sh"
