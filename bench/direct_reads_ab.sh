#!/usr/bin/env bash
# Small GETs of one data set served three ways, round after round (docs/benchmarks.md,
# "Small files against their targets"): karma8's embedded cluster (one process), the design
# probe bench/direct_reads.py (processes that read the metadata and the volumes directly;
# 1 and 2 on the port), and the stack ceiling bench/stack_ceiling.py (files in memory; 1 and
# 2 processes). 200 files of 4 KiB, wrk -t2 -c16 for 8 s of GETs over them each time.
#   bench/direct_reads_ab.sh [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=${1:-2}
py="$root/.venv/bin/python"
for port in 8080 18081 18082; do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
        echo "direct_reads_ab: port $port is in use; stop what serves it first" >&2
        exit 1
    fi
done
work=$(mktemp -d /var/tmp/karma8-direct.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
cd "$work"
"$py" -c "
import sys; sys.path.insert(0, '$root/bench')
from loadgen import LUA_GET
open('get.lua', 'w').write(LUA_GET)"
head -c 4096 /dev/urandom > small.bin
up() {  # url: wait until it answers
    for _ in $(seq 1 150); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "direct_reads_ab: $1 did not answer" >&2
    exit 1
}
load() {  # base url: the 200 files
    for i in $(seq -w 0 199); do curl -s -o /dev/null -T small.bin "$1/default/g000$i"; done
}
rate() {  # base url
    wrk -t2 -c16 -d8s -s get.lua "$1" -- /default/g0 200 | awk '/Requests\/sec/ {print $2}'
}
"$py" -m karma8.cli serve --data "$work/data" >serve.log 2>&1 &
cluster=$!
pids+=("$cluster")
up http://127.0.0.1:8080/healthz
load http://127.0.0.1:8080
sync
for round in $(seq 1 "$rounds"); do
    echo "round $round  karma8, 1 process:         GET/s $(rate http://127.0.0.1:8080)"
    for w in 1 2; do
        "$py" "$root/bench/direct_reads.py" --data "$work/data" --port 18081 --workers "$w" >direct.log 2>&1 &
        p=$!
        pids+=("$p")
        up http://127.0.0.1:18081/default/g000100
        sleep 4  # the other processes on the port, before wrk opens its connections
        curl -s http://127.0.0.1:18081/default/g000123 | cmp -s - small.bin || { echo "direct read differs" >&2; exit 1; }
        echo "round $round  direct reads, $w process(es): GET/s $(rate http://127.0.0.1:18081)"
        kill -TERM "$p"; wait "$p" || true
    done
    for w in 1 2; do
        "$py" "$root/bench/stack_ceiling.py" --port 18082 --workers "$w" >ceiling.log 2>&1 &
        p=$!
        pids+=("$p")
        up http://127.0.0.1:18082/
        sleep 4
        load http://127.0.0.1:18082
        echo "round $round  stack ceiling, $w process(es): GET/s $(rate http://127.0.0.1:18082)"
        kill -TERM "$p"; wait "$p" || true
    done
done
kill -INT "$cluster"; wait "$cluster" || true
