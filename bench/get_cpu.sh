#!/usr/bin/env bash
# CPU per small GET of the embedded cluster: start `karma8 serve --role all` from TREE (put on
# PYTHONPATH, so a `git archive` of an older commit can be measured beside this one), store
# 500 files of 4 KiB, run `wrk -t2 -c16` GETs of them (random order) for SECONDS, and print
# the rate, every process's CPU time (user + system, /proc/PID/stat) per GET together, and
# how idle the machine was. Compare only runs interleaved in the same minutes, and many of
# them: this VM's spread hides a change of 10 % in a few pairs.
#   bench/get_cpu.sh TREE [SECONDS] [EXTRA_TOML_LINE]
#   e.g. for i in $(seq 8); do bench/get_cpu.sh /tmp/base 8; bench/get_cpu.sh "$PWD" 8; done
set -euo pipefail
tree=$(cd "$1" && pwd)
seconds=${2:-8}
extra=${3:-}
# shellcheck source=bench/cluster.sh
source "$(dirname "$0")/cluster.sh"
start_cluster "$tree" "$extra"
head -c 4096 /dev/urandom > "$work/body"
cat > "$work/put.lua" <<'LUA'
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  local f = assert(io.open(args[1], "rb"))
  body = f:read("*a")
  f:close()
  counter = 0
end
-- Round and round, so that every name is written (wrk may build a request it never sends).
function request()
  counter = counter % 250 + 1
  return wrk.format("PUT", "/default/g-" .. tid .. "-" .. counter, nil, body)
end
LUA
cat > "$work/get.lua" <<'LUA'
function request()
  return wrk.format("GET", "/default/g-" .. math.random(1, 2) .. "-" .. math.random(1, 250))
end
LUA
wrk -t2 -c2 -d6s -s "$work/put.lua" "http://127.0.0.1:$port/" -- "$work/body" > /dev/null
processes="$pid $(pgrep -P "$pid" | tr '\n' ' ')"
idle_before=$(idle_ticks)
# shellcheck disable=SC2086  # one pid each
before=$(ticks_of $processes)
out=$(wrk -t2 -c16 -d"${seconds}s" -s "$work/get.lua" "http://127.0.0.1:$port/")
# shellcheck disable=SC2086
after=$(ticks_of $processes)
idle_after=$(idle_ticks)
kill -INT "$pid"
wait "$pid" || true
requests=$(echo "$out" | awk '/requests in/ {print $1}')
rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
ticks=$(getconf CLK_TCK)
cpu=$(echo "scale=1; ($after - $before) * 1000000 / $ticks / $requests" | bc)
echo "$(basename "$tree"): $rate GET/s, $requests GETs, $cpu µs of CPU per GET (all processes;" \
    "the machine idle $(echo "($idle_after - $idle_before) * 100 / $ticks / $seconds" | bc) %" \
    "of $(nproc)00 %) $(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)"
