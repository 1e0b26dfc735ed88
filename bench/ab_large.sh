#!/usr/bin/env bash
# Large-file A/B of two karma8 trees in interleaved pairs: each run is a fresh embedded
# cluster (`karma8 serve`, its defaults) in a scratch directory, one PUT of a 256 MiB file of
# random bytes, then 5 GETs of it, a `sync` before each; curl's time_total gives MB/s.
#   bench/ab_large.sh OLD_TREE NEW_TREE [PAIRS]
# A tree is a directory holding a `karma8` package, e.g. `git archive REV karma8 | tar -x -C DIR`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
old=$(cd "$1" && pwd) new=$(cd "$2" && pwd) pairs=${3:-2}
if curl -s -o /dev/null http://127.0.0.1:8080/healthz; then
    echo "ab_large: port 8080 is in use; stop what serves it first" >&2
    exit 1
fi
work=$(mktemp -d /var/tmp/karma8-ab-large.XXXXXX)
trap 'pkill -f "karma8.cli serve --data $work" || true; rm -rf "$work"' EXIT
head -c 268435456 /dev/urandom > "$work/big"
rate() { python3 -c "print(round(268435456 / $1 / 1e6))"; }
one() {  # label tree
    local data="$work/data"
    rm -rf "$data"
    PYTHONPATH=$2 "$root/.venv/bin/python" -m karma8.cli serve --data "$data" >"$work/serve.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:8080/healthz && break; sleep 0.2; done
    sync
    local line
    line="$1  PUT $(rate "$(curl -s -o /dev/null -w '%{time_total}' -T "$work/big" http://127.0.0.1:8080/default/big)")  GET"
    for _ in 1 2 3 4 5; do
        sync
        line="$line $(rate "$(curl -s -o /dev/null -w '%{time_total}' http://127.0.0.1:8080/default/big)")"
    done
    kill -INT "$pid"; wait "$pid" || true
    echo "$line  MB/s"
}
# From the work directory: `python -m` puts the current directory first on sys.path, ahead
# of PYTHONPATH, so run from a checkout it would measure that checkout twice.
cd "$work"
for _ in $(seq 1 "$pairs"); do one old "$old"; one new "$new"; done
