#!/usr/bin/env bash
# CPU per small PUT of the embedded cluster: start `karma8 serve --role all` from TREE (put on
# PYTHONPATH, so a `git archive` of an older commit can be measured beside this one), run
# `wrk -t2 -c16` PUTs of a 4 KiB body to new names for SECONDS, and print the rate and the
# process's CPU time (user + system, /proc/PID/stat) per PUT, its gateway workers' and how
# idle the machine was. CPU per request moves less than the rate on a shared machine; still,
# compare only runs interleaved in the same minutes.
#   bench/put_cpu.sh TREE [SECONDS] [EXTRA_TOML_LINE]
#   e.g. for i in 1 2 3; do bench/put_cpu.sh /tmp/base 8; bench/put_cpu.sh "$PWD" 8; done
# KARMA8_LAUNCH replaces the `karma8` command (e.g. bench/parent_bounds.py's experiments).
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
  prefix = args[1]
  local f = assert(io.open(args[2], "rb"))
  body = f:read("*a")
  f:close()
  counter = 0
end
function request()
  counter = counter + 1
  return wrk.format("PUT", prefix .. "-" .. tid .. "-" .. counter, nil, body)
end
LUA
workers=$(pgrep -P "$pid" | tr '\n' ' ')
idle_before=$(idle_ticks)
before=$(ticks_of "$pid")
# shellcheck disable=SC2086  # one pid each
workers_before=$(ticks_of $workers)
out=$(wrk -t2 -c16 -d"${seconds}s" -s "$work/put.lua" "http://127.0.0.1:$port/" \
    -- "/default/p$RANDOM" "$work/body")
after=$(ticks_of "$pid")
idle_after=$(idle_ticks)
# shellcheck disable=SC2086
workers_after=$(ticks_of $workers)
kill -INT "$pid"
wait "$pid" || true
requests=$(echo "$out" | awk '/requests in/ {print $1}')
rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
ticks=$(getconf CLK_TCK)
cpu=$(echo "scale=3; ($after - $before) * 1000 / $ticks / $requests" | bc)
worker_cpu=$(echo "scale=3; ($workers_after - $workers_before) * 1000 / $ticks / $requests" | bc)
echo "$(basename "$tree"): $rate PUT/s, $requests PUTs, $cpu ms of CPU per PUT" \
    "(its gateway workers together: $worker_cpu ms; the machine idle" \
    "$(echo "($idle_after - $idle_before) * 100 / $ticks / $seconds" | bc) % of $(nproc)00 %)" \
    "$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)"
