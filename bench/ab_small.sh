#!/usr/bin/env bash
# Small-file A/B of two karma8 trees in interleaved pairs: each run is a fresh embedded
# cluster (`karma8 serve`, 6 nodes) in a scratch directory, 200 files of 4 KiB, then wrk
# -t2 -c16 for 8 s of GETs over them and 8 s of PUTs to new names.
#   bench/ab_small.sh OLD_TREE NEW_TREE [PAIRS]
# A tree is a directory holding a `karma8` package, e.g. `git archive REV karma8 | tar -x -C DIR`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
old=$(cd "$1" && pwd) new=$(cd "$2" && pwd) pairs=${3:-2}
if curl -s -o /dev/null http://127.0.0.1:8080/healthz; then
    echo "ab_small: port 8080 is in use; stop what serves it first" >&2
    exit 1
fi
work=$(mktemp -d /var/tmp/karma8-ab.XXXXXX)
trap 'pkill -f "karma8.cli serve --data $work" || true; rm -rf "$work"' EXIT
"$root/.venv/bin/python" -c "
import sys; sys.path.insert(0, '$root/bench')
from loadgen import LUA_GET, LUA_PUT
open('$work/get.lua', 'w').write(LUA_GET); open('$work/put.lua', 'w').write(LUA_PUT)"
head -c 4096 /dev/urandom > "$work/small.bin"
one() {  # label tree
    local data="$work/data"
    rm -rf "$data"
    PYTHONPATH=$2 "$root/.venv/bin/python" -m karma8.cli serve --data "$data" >"$work/serve.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:8080/healthz && break; sleep 0.2; done
    for i in $(seq -w 0 199); do curl -s -o /dev/null -T "$work/small.bin" "http://127.0.0.1:8080/default/g000$i"; done
    sync
    local g p
    g=$(wrk -t2 -c16 -d8s -s "$work/get.lua" http://127.0.0.1:8080 -- /default/g0 200 | awk '/Requests\/sec/ {print $2}')
    p=$(wrk -t2 -c16 -d8s -s "$work/put.lua" http://127.0.0.1:8080 -- /default/p "$work/small.bin" | awk '/Requests\/sec/ {print $2}')
    kill -INT "$pid"; wait "$pid" || true
    echo "$1  GET/s $g  PUT/s $p"
}
# From the work directory: `python -m` puts the current directory first on sys.path, ahead
# of PYTHONPATH, so run from a checkout it would measure that checkout twice.
cd "$work"
for _ in $(seq 1 "$pairs"); do one old "$old"; one new "$new"; done
