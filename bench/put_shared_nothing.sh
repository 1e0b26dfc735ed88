#!/usr/bin/env bash
# Small PUTs of N independent single-process clusters sharing one port (SO_REUSEPORT: the
# kernel spreads wrk's connections over them): each process parses and stores its PUTs, with
# discovery, its nodes and its syncs of its own, and nothing passes between them: how far
# spreading whole PUTs over the cores goes. Prints the rate, the CPU per PUT of all N (not
# wrk's), how idle the machine stayed, and each cluster's CPU (an uneven split of the
# connections shows there). Compare with bench/put_cpu.sh in the same minutes.
#   bench/put_shared_nothing.sh [N] [SECONDS]     e.g. bench/put_shared_nothing.sh 2 8
# BOUNDS adds bench/parent_bounds.py variants to each cluster (BOUNDS=nosql: no discovery SQL).
set -euo pipefail
n=${1:-2}
seconds=${2:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/karma8-shared.XXXXXX)
pids=()
cleanup() {
    # SIGTERM: a background job of a script starts with SIGINT ignored, until karma8 has
    # its own handler; it stops cleanly on either.
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 10000))
for i in $(seq "$n"); do
    printf 'host = "127.0.0.1"\ngateway_port = %d\ndiscovery_port = %d\nstorage_nodes = 6\ngateway_workers = 1\n' \
        "$port" "$((port + i))" > "$work/karma8-$i.toml"
    "$here/.venv/bin/python" "$here/bench/parent_bounds.py" "shared${BOUNDS:++$BOUNDS}" serve --role all \
        --data "$work/data-$i" --config "$work/karma8-$i.toml" > "$work/log-$i" 2>&1 &
    pids+=($!)
done
for i in $(seq "$n"); do
    for _ in $(seq 150); do [ -f "$work/data-$i/cluster.json" ] && break; sleep 0.2; done
    [ -f "$work/data-$i/cluster.json" ] || { echo "cluster $i did not start:" >&2; cat "$work/log-$i" >&2; exit 1; }
done
sleep 1
head -c 4096 /dev/urandom > "$work/body"
sed -n '/^cat > "\$work\/put.lua"/,/^LUA/p' "$here/bench/put_cpu.sh" | sed '1d;$d' > "$work/put.lua"
[ -s "$work/put.lua" ] || { echo "no PUT script found in bench/put_cpu.sh" >&2; exit 1; }
# shellcheck source=bench/cluster.sh
source "$here/bench/cluster.sh"
idle_before=$(idle_ticks)
each_before=()
for p in "${pids[@]}"; do each_before+=("$(ticks_of "$p")"); done
before=$(ticks_of "${pids[@]}")
out=$(wrk -t2 -c16 -d"${seconds}s" -s "$work/put.lua" "http://127.0.0.1:$port/" \
    -- "/default/p$RANDOM" "$work/body")
after=$(ticks_of "${pids[@]}")
idle_after=$(idle_ticks)
each=()
for i in "${!pids[@]}"; do each+=("$(($(ticks_of "${pids[$i]}") - each_before[i]))"); done
requests=$(echo "$out" | awk '/requests in/ {print $1}')
rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
ticks=$(getconf CLK_TCK)
echo "$n shared-nothing clusters: $rate PUT/s, $requests PUTs," \
    "$(echo "scale=3; ($after - $before) * 1000 / $ticks / $requests" | bc) ms of CPU per PUT" \
    "(all of them; the machine idle $(echo "($idle_after - $idle_before) * 100 / $ticks / $seconds" | bc) % of $(nproc)00 %;" \
    "CPU ticks per cluster: ${each[*]}, an uneven split of wrk's connections shows here)" \
    "$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)"
