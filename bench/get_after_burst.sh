#!/usr/bin/env bash
# Small GETs' latency right after a burst of small PUTs: a gateway worker that read nothing
# while its nodes appended has to index their new needles. Starts `karma8 serve --role all`
# from TREE (on PYTHONPATH, so an older `git archive` can be measured beside this one), PUTs
# 300 files of 4 KiB, then wrk --latency (-t2 -c16) of GETs over them for 4 s, BURST (30) s of PUTs
# to new names, and the same GETs twice: right after the burst, and again.
#   bench/get_after_burst.sh TREE
set -euo pipefail
tree=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/karma8-burst.XXXXXX)
port=$((20000 + RANDOM % 10000))
printf 'host = "127.0.0.1"\ngateway_port = %d\ndiscovery_port = %d\nstorage_nodes = 6\n' \
    "$port" "$((port + 1))" > "$work/karma8.toml"
head -c 4096 /dev/urandom > "$work/body"
sed -n '/^cat > "\$work\/put.lua"/,/^LUA/p' "$here/bench/put_cpu.sh" | sed '1d;$d' > "$work/put.lua"
cat > "$work/get.lua" <<'LUA'
function request()
  return wrk.format("GET", "/default/g" .. math.random(1, 300))
end
LUA
PYTHONPATH=$tree "$here/.venv/bin/karma8" serve --role all --data "$work/data" \
    --config "$work/karma8.toml" > "$work/log" 2>&1 &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 150); do [ -f "$work/data/cluster.json" ] && break; sleep 0.2; done
sleep 1
for i in $(seq 1 300); do
    curl -s -o /dev/null -T "$work/body" "http://127.0.0.1:$port/default/g$i"
done
gets() {  # label
    wrk -t2 -c16 -d4s --latency -s "$work/get.lua" "http://127.0.0.1:$port/" |
        awk -v label="$1" '/Requests\/sec/ {rate = $2} /^ +99%/ {p99 = $2}
            /Latency  / {max = $4} END {printf "%-20s %8s GET/s  p99 %8s  max %8s\n", label, rate, p99, max}'
}
gets "before the burst"
wrk -t2 -c16 -d"${BURST:-30}s" -s "$work/put.lua" "http://127.0.0.1:$port/" -- "/default/p$RANDOM" \
    "$work/body" | awk '/Requests\/sec/ {printf "%-20s %8s PUT/s\n", "the burst", $2}'
gets "right after it"
gets "again"
