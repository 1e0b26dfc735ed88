# shellcheck shell=bash
# What bench/put_cpu.sh and bench/get_cpu.sh share (sourced, not run): an embedded cluster of
# TREE (put on PYTHONPATH) on a free-ish port in a work directory of its own, and the CPU
# counters they read.
#   start_cluster TREE EXTRA_TOML_LINE   sets $work (removed at exit), $port and $pid
#   ticks_of PID...                      CPU ticks (user + system) of the processes, summed
#   idle_ticks                           the machine's idle ticks so far (/proc/stat)
# KARMA8_LAUNCH replaces the `karma8` command (e.g. bench/parent_bounds.py's experiments).

start_cluster() {
    local tree=$1 extra=$2 here launch
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    work=$(mktemp -d /var/tmp/karma8-bench.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    port=$((20000 + RANDOM % 10000))
    printf 'host = "127.0.0.1"\ngateway_port = %d\ndiscovery_port = %d\nstorage_nodes = 6\n%s\n' \
        "$port" "$((port + 1))" "$extra" > "$work/karma8.toml"
    launch=${KARMA8_LAUNCH:-"$here/.venv/bin/karma8"}
    # From the work directory: `python -m` (an older tree's gateway workers) puts the current
    # directory first on sys.path, ahead of PYTHONPATH.
    # shellcheck disable=SC2086  # a command and its arguments
    (cd "$work" && exec env PYTHONPATH="$tree" $launch serve --role all --data "$work/data" \
        --config "$work/karma8.toml" > "$work/log" 2>&1) &
    pid=$!
    for _ in $(seq 150); do [ -f "$work/data/cluster.json" ] && break; sleep 0.2; done
    sleep 1
}

ticks_of() { for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat"; done | paste -sd+ | bc; }

idle_ticks() { awk '/^cpu / {print $5}' /proc/stat; }
