# Helpers shared by start.sh and stop.sh (sourced, not run).
# A process is recorded as "pid|start time|name"; the start time (ps lstart) guards
# against signalling a PID that the system has since given to another process.

is_recorded_process() {  # is_recorded_process "pid|lstart|...": alive and the same process
    local pid=${1%%|*} rest=${1#*|}
    local lstart=${rest%%|*}
    [ -n "$pid" ] && [ "$(ps -o lstart= -p "$pid" 2>/dev/null)" = "$lstart" ]
}

tree() {  # tree PID: PID and all its descendants, parents first
    echo "$1"
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$c"; done
}

running() {  # running PID...: those still running (a zombie has exited; only its parent's wait is left)
    local p s
    for p in "$@"; do
        s=$(ps -o stat= -p "$p" 2>/dev/null) && [[ $s != Z* ]] && echo "$p"
    done
    return 0
}
