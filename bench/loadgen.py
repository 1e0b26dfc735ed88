"""The load generators of ``bench/compare.py``: curl for large files, wrk (with a Lua script)
for small ones, and curl again to prefill the files the small GETs read."""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peers import Server, ServerError

SMALL_SIZE = 4096
CONNECTIONS = 16
WRK_THREADS = 2
PUT_OK = (200, 201, 204)


@dataclass
class Sample:
    """One measurement: a rate, or None if it failed; errors counts failed requests."""

    value: float | None
    errors: int = 0
    detail: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None


# -- wrk scripts ----------------------------------------------------------------------------

LUA_COMMON = """
-- Each wrk thread has its own Lua state; setup() runs in the main one and numbers them.
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if not ok[status] then
    bad = bad + 1
    last_bad = status
  end
end

function done(summary, latency, requests)
  local bad_total, last = 0, 0
  for _, t in ipairs(threads) do
    bad_total = bad_total + t:get("bad")
    if t:get("last_bad") ~= 0 then last = t:get("last_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d" ..
    " bad_status=%d last_bad=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    bad_total, last, latency:percentile(50), latency:percentile(99)))
end
"""

LUA_PUT = (
    """
-- PUT of the same 4 KiB body to a new path per request: PREFIX-THREAD-COUNTER.
-- wrk ... -- PREFIX BODYFILE
function init(args)
  prefix = args[1]
  local f = assert(io.open(args[2], "rb"))
  body = f:read("*a")
  f:close()
  ok = {[200] = true, [201] = true, [204] = true}
  bad, last_bad, counter = 0, 0, 0
end

function request()
  counter = counter + 1
  return wrk.format("PUT", prefix .. "-" .. tid .. "-" .. counter, nil, body)
end
"""
    + LUA_COMMON
)

LUA_GET = (
    """
-- GET round-robin over PREFIX00000 .. PREFIX(N-1), each thread from its own offset.
-- wrk ... -- PREFIX N
function init(args)
  prefix = args[1]
  n = tonumber(args[2])
  ok = {[200] = true}
  bad, last_bad = 0, 0
  counter = ((tid - 1) * 7919) % n
end

function request()
  counter = (counter + 1) % n
  return wrk.format("GET", string.format("%s%05d", prefix, counter))
end
"""
    + LUA_COMMON
)


# -- measurements ---------------------------------------------------------------------------


def curl(args: list[str], timeout: float = 900.0) -> tuple[int, str, str]:
    """Run curl with the common options; (exit status, stdout, stderr)."""
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr.strip()


def large_transfer(server: Server, name: str, put_file: Path | None, size: int) -> Sample:
    """A PUT of ``put_file`` to ``name``, or (put_file None) a GET of it; MB/s."""
    if put_file is not None:
        args = ["-H", "Expect:", "-T", str(put_file)]
        expected: tuple[int, ...] = PUT_OK
        size_var = "size_upload"
    else:
        args, expected, size_var = [], (200,), "size_download"
    code, out, err = curl(
        [
            *args,
            server.url(name),
            "-o",
            "/dev/null",
            "-w",
            f"%{{http_code}} %{{time_total}} %{{{size_var}}}",
        ]
    )
    parts = out.split()
    if code != 0 or len(parts) != 3:
        return Sample(None, 1, f"curl exit {code}: {err or out}")
    status, seconds, moved = int(parts[0]), float(parts[1]), int(parts[2])
    if status not in expected or moved != size:
        return Sample(None, 1, f"HTTP {status}, {moved} of {size} bytes")
    return Sample(size / 1e6 / seconds)


def verify_download(server: Server, name: str, sha256: str) -> str:
    """Download ``name`` and compare its SHA-256 with the source's; a short verdict."""
    digest = hashlib.sha256()
    with subprocess.Popen(
        ["curl", "-sS", "--fail", server.url(name)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
    if proc.returncode != 0:
        return f"download failed (curl exit {proc.returncode})"
    if digest.hexdigest() != sha256:
        return f"MISMATCH: sha256 {digest.hexdigest()[:16]}… != {sha256[:16]}…"
    return "byte-identical (sha256)"


RESULT_RE = re.compile(r"^RESULT (.*)$", re.MULTILINE)
RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


def wrk(server: Server, script: Path, seconds: int, script_args: list[str]) -> Sample:
    """wrk with CONNECTIONS connections for ``seconds``; Requests/sec, errors and latency."""
    return wrk_url(server.base_url, script, seconds, script_args)


def wrk_url(
    base_url: str,
    script: Path,
    seconds: int,
    script_args: list[str],
    *,
    threads: int = WRK_THREADS,
    connections: int = CONNECTIONS,
) -> Sample:
    """wrk against ``base_url`` with ``threads`` threads and ``connections`` connections
    for ``seconds``; Requests/sec, errors and latency."""
    args = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        base_url,
        "--",
        *script_args,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    rps = RPS_RE.search(done.stdout)
    result = RESULT_RE.search(done.stdout)
    if done.returncode != 0 or rps is None or result is None:
        return Sample(
            None, 1, f"wrk exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    fields = {k: int(v) for k, v in (item.split("=") for item in result.group(1).split())}
    sockets = {k: fields[k] for k in ("connect", "read", "write", "timeout") if fields[k]}
    errors = sum(sockets.values()) + fields["bad_status"]
    detail = ", ".join(
        (
            [f"{fields['bad_status']} bad status (last {fields['last_bad']})"]
            if fields["bad_status"]
            else []
        )
        + [f"{n} socket {k}" for k, n in sockets.items()]
    )
    return Sample(
        float(rps.group(1)), errors, detail, fields["p50_us"] / 1000, fields["p99_us"] / 1000
    )


def prefill(server: Server, body: Path, count: int, config: Path) -> None:
    """PUT ``count`` small files get-00000… with curl, 16 in parallel; raise on any failure."""
    prefill_urls(server.url, server.label, body, count, config)


def prefill_urls(
    url: Callable[[str], str], label: str, body: Path, count: int, config: Path
) -> None:
    """:func:`prefill` with file ``name`` at ``url(name)``; ``label`` names it in errors."""
    with open(config, "w") as f:
        for i in range(count):
            f.write(
                f'upload-file = "{body}"\nurl = "{url(f"get-{i:05d}")}"\noutput = "/dev/null"\n'
            )
    code, out, err = curl(
        [
            "--parallel",
            "--parallel-max",
            str(CONNECTIONS),
            "--no-progress-meter",
            "-H",
            "Expect:",
            "-K",
            str(config),
            "-w",
            "%{http_code}\n",
        ]
    )
    statuses = out.split()
    bad = [s for s in statuses if int(s) not in PUT_OK]
    if code != 0 or len(statuses) != count or bad:
        raise ServerError(
            f"{label}: prefill of {count} files failed (curl exit {code},"
            f" {len(statuses)} answers, {len(bad)} bad: {bad[:5]}) {err[-300:]}"
        )
    back = subprocess.run(
        ["curl", "-sS", "--fail", url("get-00000")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if back.returncode != 0 or back.stdout != body.read_bytes():
        raise ServerError(f"{label}: get-00000 does not read back as written")
