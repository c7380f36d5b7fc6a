#!/usr/bin/env bash
# Stop the local Ray head started by start.sh (and its workers on this machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
"$RAY" stop
