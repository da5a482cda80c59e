#!/usr/bin/env bash
# The README's main command from a fresh clone, timed: clone, install (new venv), `mlkv plan`, then
# `mlkv reproduce --smoke` with a cold token cache; prints a table-like summary and one JSON line.
#   bash benchmarks/smoke_fresh_clone.sh [WORKDIR]        (default /tmp/mlkv-fresh; needs MLKV_DATA or ../shared/data)
# Say how busy the machine was: the load average is recorded before and after, as the times depend on it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd); work=${1:-/tmp/mlkv-fresh}
export MLKV_DATA=${MLKV_DATA:-$repo/../shared/data}
rm -rf "$work" && git clone -q "$repo" "$work" && cd "$work"
load0=$(cut -d' ' -f1 /proc/loadavg); t0=$(date +%s.%N)
python3 -m venv .venv && . .venv/bin/activate
python -m pip install -q torch==2.13.0 && python -m pip install -q -e ".[all]"
t1=$(date +%s.%N)
mlkv plan > /dev/null
/usr/bin/time -f "%e %U" -o smoke.time mlkv reproduce --smoke --out runs/smoke > smoke.log 2>&1
read -r wall cpu < smoke.time; load1=$(cut -d' ' -f1 /proc/loadavg)
disk=$(du -sb runs/smoke | cut -f1); commit=$(git rev-parse --short HEAD)
install=$(python -c "print(round($t1 - $t0, 1))")
printf '%-10s %s\n' commit "$commit" install_s "$install" smoke_wall_s "$wall" smoke_cpu_s "$cpu" \
    disk_bytes "$disk" load "$load0 -> $load1"
echo "{\"commit\": \"$commit\", \"install_s\": $install, \"smoke_wall_s\": $wall, \"smoke_cpu_s\": $cpu, \"disk_bytes\": $disk, \"load_before\": $load0, \"load_after\": $load1}"
