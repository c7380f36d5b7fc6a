#!/usr/bin/env bash
# Start a local Ray head bound to 127.0.0.1 with token authentication, and record what it
# started so that stop.sh can stop exactly this head (never any other Ray on the machine).
#
# Everything is taken from the environment (defaults in brackets):
#   CBD_RAY_DIR                 run dir: token, PIDs, log, client env [<project>/runs/ray-head]
#   CBD_RAY_PORT                GCS port [6379]
#   CBD_RAY_DASHBOARD_PORT      dashboard and job server [8265]
#   CBD_RAY_AGENT_PORT          dashboard agent HTTP port [52365]; a second Ray on the machine
#                               already holds the default, and then no job can be submitted
#   CBD_RAY_CLIENT_PORT         Ray Client server [10001]
#   CBD_RAY_AGENT_GRPC_PORT, CBD_RAY_METRICS_PORT, CBD_RAY_RUNTIME_ENV_AGENT_PORT,
#   CBD_RAY_OBJECT_MANAGER_PORT, CBD_RAY_NODE_MANAGER_PORT, CBD_RAY_MIN_WORKER_PORT,
#   CBD_RAY_MAX_WORKER_PORT     [Ray's choice: a free port, workers 10002-19999]
#   CBD_RAY_NUM_CPUS, CBD_RAY_NUM_GPUS, CBD_RAY_OBJECT_STORE_BYTES   [Ray's detection]
#   CBD_VENV                    the project's virtual environment [<project>/.venv]
# Clients use the token too:  source "$CBD_RAY_DIR/client.env"  (see cluster/local/README.md)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${CBD_RAY_DIR:-$ROOT/runs/ray-head}
VENV=${CBD_VENV:-$ROOT/.venv}
die() { echo "start.sh: $*" >&2; exit 2; }
. "$ROOT/cluster/local/lib.sh"

PORT_VARS=(CBD_RAY_PORT CBD_RAY_DASHBOARD_PORT CBD_RAY_AGENT_PORT CBD_RAY_CLIENT_PORT CBD_RAY_AGENT_GRPC_PORT
           CBD_RAY_METRICS_PORT CBD_RAY_RUNTIME_ENV_AGENT_PORT CBD_RAY_OBJECT_MANAGER_PORT
           CBD_RAY_NODE_MANAGER_PORT CBD_RAY_MIN_WORKER_PORT CBD_RAY_MAX_WORKER_PORT)
for var in "${PORT_VARS[@]}"; do  # bad input stops here, before anything starts
    value=${!var:-}
    [ -z "$value" ] || { [[ "$value" =~ ^[0-9]+$ ]] && [ "$value" -ge 1 ] && [ "$value" -le 65535 ]; } \
        || die "$var=$value is not a port; give an integer from 1 to 65535"
done
port_arg() {  # port_arg FLAG VAR [DEFAULT]: "--FLAG=value", or nothing when unset with no default
    local value=${!2:-${3:-}}
    [ -n "$value" ] && echo "--$1=$value"
    return 0
}

# The head and everything it starts run from the project's environment first.
[ -d "$VENV/bin" ] && export PATH="$VENV/bin:$PATH"
command -v ray >/dev/null || die "no 'ray' on PATH and no $VENV/bin; set CBD_VENV to the project's venv"
PY=$(command -v python3 || command -v python)

mkdir -p "$DIR"
if [ -s "$DIR/head.pid" ] && is_recorded_process "$(cat "$DIR/head.pid")"; then
    die "a head recorded in $DIR/head.pid is still running; stop it with cluster/local/stop.sh first"
fi

# Token: kept across restarts so clients keep working; created owner-only (mode 0600).
TOKEN=$DIR/auth_token
if [ ! -e "$TOKEN" ]; then
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN")
fi
[ "$(stat -c %a "$TOKEN")" = 600 ] || die "$TOKEN has mode $(stat -c %a "$TOKEN"); it must be 600 (chmod 600 it)"

# Without this Ray binds the machine's address even when told 127.0.0.1 (see RAY_NOTES).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN
unset RAY_AUTH_TOKEN RAY_ADDRESS  # the token file above is the one this head uses

PORT=${CBD_RAY_PORT:-6379}
DASH=${CBD_RAY_DASHBOARD_PORT:-8265}
args=(--head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
      "$(port_arg port CBD_RAY_PORT 6379)"
      "$(port_arg dashboard-port CBD_RAY_DASHBOARD_PORT 8265)"
      "$(port_arg dashboard-agent-listen-port CBD_RAY_AGENT_PORT 52365)"
      "$(port_arg ray-client-server-port CBD_RAY_CLIENT_PORT 10001)")
for spec in dashboard-agent-grpc-port:CBD_RAY_AGENT_GRPC_PORT metrics-export-port:CBD_RAY_METRICS_PORT \
            runtime-env-agent-port:CBD_RAY_RUNTIME_ENV_AGENT_PORT object-manager-port:CBD_RAY_OBJECT_MANAGER_PORT \
            node-manager-port:CBD_RAY_NODE_MANAGER_PORT min-worker-port:CBD_RAY_MIN_WORKER_PORT \
            max-worker-port:CBD_RAY_MAX_WORKER_PORT; do
    a=$(port_arg "${spec%%:*}" "${spec#*:}")
    [ -n "$a" ] && args+=("$a")
done
[ -n "${CBD_RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$CBD_RAY_NUM_CPUS")
[ -n "${CBD_RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$CBD_RAY_NUM_GPUS")
[ -n "${CBD_RAY_OBJECT_STORE_BYTES:-}" ] && args+=(--object-store-memory="$CBD_RAY_OBJECT_STORE_BYTES")

# `ray start --block` stays the parent of the head's processes; setsid gives it its own
# process group, so stop.sh can find exactly this head's tree.
# RAY_ADDRESS for the head's own processes only: Ray Train's placement-group cleaner in a job's
# workers then asks this head about its controller, never another Ray on the machine.
RAY_ADDRESS=127.0.0.1:$PORT setsid ray start "${args[@]}" > "$DIR/head.log" 2>&1 < /dev/null &
HEAD=$!
echo "$HEAD|$(ps -o lstart= -p "$HEAD")" > "$DIR/head.pid"

URL=http://127.0.0.1:$DASH
for _ in $(seq 1 ${CBD_RAY_START_TIMEOUT_S:-90}); do
    if ray job list --address "$URL" > /dev/null 2>&1; then break; fi
    kill -0 "$HEAD" 2>/dev/null || { tail -n 30 "$DIR/head.log" >&2; die "the Ray head exited; log: $DIR/head.log"; }
    sleep 1
done
ray job list --address "$URL" > /dev/null 2>&1 || die "the Ray head did not answer on $URL; log: $DIR/head.log"

# Record the tree as started (pid|start time|name): stop.sh never signals a reused PID.
for p in $(tree "$HEAD"); do
    echo "$p|$(ps -o lstart= -p "$p" || true)|$(ps -o comm= -p "$p" || true)"
done > "$DIR/pids"

cat > "$DIR/client.env" <<EOF
export RAY_ADDRESS=$URL RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN
EOF
echo "Ray head on 127.0.0.1:$PORT (token authentication), dashboard and job server on $URL"
echo "PIDs: $DIR/pids   log: $DIR/head.log   token: $TOKEN"
echo "submit:  source $DIR/client.env && ray job submit --working-dir . -- python jobs/build_chain.py --config configs/demo.yaml --storage $ROOT/runs"
echo "stop:    CBD_RAY_DIR=$DIR cluster/local/stop.sh"
