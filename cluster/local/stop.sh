#!/usr/bin/env bash
# Stop the Ray head that start.sh started in CBD_RAY_DIR, and nothing else: the processes it
# recorded (pid and start time) and the descendants they have now (workers, job drivers).
# Never `ray stop`: it stops every Ray on the machine, other users' and other tests' included.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${CBD_RAY_DIR:-$ROOT/runs/ray-head}
GRACE=${CBD_RAY_STOP_GRACE_S:-15}
. "$ROOT/cluster/local/lib.sh"

if [ ! -s "$DIR/head.pid" ]; then
    echo "stop.sh: no head recorded in $DIR (nothing to stop)"
    exit 0
fi
# The tree is collected before any signal: once the raylet dies its workers are re-parented.
targets=()
while IFS= read -r line; do
    is_recorded_process "$line" && targets+=($(tree "${line%%|*}"))
done < <(cat "$DIR/head.pid" "$DIR/pids" 2>/dev/null)
mapfile -t targets < <(printf '%s\n' "${targets[@]}" | awk 'NF && !seen[$0]++')

wait_gone() {  # wait_gone SECONDS: until no target runs, or the time is up
    for _ in $(seq 1 "$1"); do
        [ -z "$(running "${targets[@]}")" ] && return 0
        sleep 1
    done
}
if [ ${#targets[@]} -gt 0 ]; then
    kill -TERM "${targets[@]}" 2>/dev/null || true
    wait_gone "$GRACE"
    # SIGKILL only what still runs after the grace period (a wedged raylet or worker).
    mapfile -t alive < <(running "${targets[@]}")
    [ ${#alive[@]} -gt 0 ] && { kill -KILL "${alive[@]}" 2>/dev/null || true; wait_gone 10; }
    mapfile -t alive < <(running "${targets[@]}")
    if [ ${#alive[@]} -gt 0 ]; then
        echo "stop.sh: still running after SIGKILL: ${alive[*]}" >&2
        exit 1
    fi
fi
rm -f "$DIR/head.pid"
echo "stopped the Ray head of $DIR: ${#targets[@]} processes (${targets[*]:-none alive})"
