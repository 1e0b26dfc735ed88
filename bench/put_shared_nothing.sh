#!/usr/bin/env bash
# Small PUTs of N independent single-process clusters sharing one port (SO_REUSEPORT: the
# kernel spreads wrk's connections over them): each process parses and stores its PUTs, with
# discovery, its nodes and its syncs of its own, and nothing passes between them. What no
# layout of karma8's work over processes can beat on this machine: its rate, the CPU per PUT
# of all N, and how idle the machine stayed. Compare with bench/put_cpu.sh in the same minutes.
#   bench/put_shared_nothing.sh [N] [SECONDS]     e.g. bench/put_shared_nothing.sh 2 8
set -euo pipefail
n=${1:-2}
seconds=${2:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/karma8-shared.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 10000))
for i in $(seq "$n"); do
    printf 'host = "127.0.0.1"\ngateway_port = %d\ndiscovery_port = %d\nstorage_nodes = 6\ngateway_workers = 1\n' \
        "$port" "$((port + i))" > "$work/karma8-$i.toml"
    "$here/.venv/bin/python" "$here/bench/parent_bounds.py" shared serve --role all \
        --data "$work/data-$i" --config "$work/karma8-$i.toml" > "$work/log-$i" 2>&1 &
    pids+=($!)
done
for i in $(seq "$n"); do
    for _ in $(seq 150); do [ -f "$work/data-$i/cluster.json" ] && break; sleep 0.2; done
done
sleep 1
head -c 4096 /dev/urandom > "$work/body"
sed -n '/^cat > "\$work\/put.lua"/,/^LUA/p' "$here/bench/put_cpu.sh" | sed '1d;$d' > "$work/put.lua"
# shellcheck source=bench/cluster.sh
source "$here/bench/cluster.sh"
idle_before=$(idle_ticks)
before=$(ticks_of "${pids[@]}")
out=$(wrk -t2 -c16 -d"${seconds}s" -s "$work/put.lua" "http://127.0.0.1:$port/" \
    -- "/default/p$RANDOM" "$work/body")
after=$(ticks_of "${pids[@]}")
idle_after=$(idle_ticks)
requests=$(echo "$out" | awk '/requests in/ {print $1}')
rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
ticks=$(getconf CLK_TCK)
echo "$n shared-nothing clusters: $rate PUT/s, $requests PUTs," \
    "$(echo "scale=3; ($after - $before) * 1000 / $ticks / $requests" | bc) ms of CPU per PUT" \
    "(all of them; the machine idle $(echo "($idle_after - $idle_before) * 100 / $ticks / $seconds" | bc) % of $(nproc)00 %)" \
    "$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)"
