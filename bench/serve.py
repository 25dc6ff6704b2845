"""Dashboard latency under load: a real uvicorn server on loopback, 16 concurrent clients.

Two runs per page kind, because the server caches rendered pages of the read-only store:
  cold  every request asks for a page never rendered before (distinct features / queries)
  warm  requests spread over 200 already-rendered pages
Prints p50/p95 latency and requests/s. Target: feature page p95 <= 25 ms.
The load comes from `wrk` (Debian package; `make bench` installs it) or, when wrk is missing, from a Python
load generator (httpx, one thread per client, loopback only); the output names which one ran. The Python
generator shares the GIL with itself, so its requests/s are a lower bound of what the server can do.
Usage: python bench/serve.py [--store out/bench.duckdb] [--seconds 10] [--clients 16] [--python-load]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, ensure_store, free_port, pct, wait_up  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

LUA = """
paths = {%s}
local counter = 0
local thread_id = 0
setup = function(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
request = function()
  counter = counter + 1
  local i
  if MODE == "cold" then i = (counter * 2 + tid) %% #paths + 1 else i = math.random(#paths) end
  return wrk.format("GET", paths[i], {["Accept-Encoding"] = "gzip"})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%.3f %%.3f %%.3f %%d\\n", summary.requests, latency:percentile(50) / 1000,
    latency:percentile(95) / 1000, summary.duration / 1e6, e.status + e.timeout + e.read + e.connect))
end
"""


@dataclass
class LoadResult:
    tool: str  # "wrk" or "python"
    requests: int  # answered requests (any status), as wrk counts them
    p50_ms: float
    p95_ms: float
    seconds: float  # wall time of the run
    errors: int  # answers with status >= 400, plus requests that got no answer (connect/read/timeout)


def run_wrk(base: str, paths: list[str], mode: str, clients: int, seconds: float) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f'MODE = "{mode}"\n' + LUA % ", ".join(f'"{p}"' for p in paths))
    try:
        out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{max(1, int(seconds))}s", "-s", f.name, base],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    n, p50, p95, secs, errs = line.split()[1:]
    return LoadResult("wrk", int(n), float(p50), float(p95), float(secs), int(errs))


def run_python(base: str, paths: list[str], mode: str, clients: int, seconds: float,
               max_requests: int | None = None, timeout_s: float = 10.0) -> LoadResult:
    """wrk's job in Python: `clients` threads, each with its own keep-alive connection, GET `paths` until
    `seconds` have passed or `max_requests` were sent. cold: every request a page not asked before (in order,
    wrapping around); warm: pages drawn at random. Only loopback servers: this is a benchmark, not a load tool."""
    host = urlsplit(base).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the Python load generator only targets loopback ({', '.join(sorted(LOOPBACK))}); "
                         f"got {base!r}")
    if not paths:
        raise ValueError("no paths to request")
    if clients < 1 or seconds <= 0:
        raise ValueError(f"clients must be >= 1 and seconds > 0 (got {clients}, {seconds})")
    ticket = itertools.count()  # shared: the n-th request overall (cold order, and the max_requests bound)
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    def client(tid: int) -> None:
        nonlocal errors
        pick = random.Random(tid)
        mine: list[float] = []
        errs = 0
        with httpx.Client(base_url=base, timeout=timeout_s, headers={"Accept-Encoding": "gzip"}) as c:
            while time.perf_counter() < deadline:
                n = next(ticket)
                if max_requests is not None and n >= max_requests:
                    break
                path = paths[n % len(paths)] if mode == "cold" else pick.choice(paths)
                t0 = time.perf_counter()
                try:
                    r = c.get(path)
                except httpx.HTTPError:
                    errs += 1
                    continue
                mine.append(1000 * (time.perf_counter() - t0))
                errs += r.status_code >= 400
        with lock:
            latencies.extend(mine)
            errors += errs

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 5)
    secs = time.perf_counter() - t0
    if not latencies:
        return LoadResult("python", 0, float("nan"), float("nan"), secs, errors)
    return LoadResult("python", len(latencies), pct(latencies, 0.5), pct(latencies, 0.95), secs, errors)


def run_load(base: str, paths: list[str], mode: str, clients: int, seconds: float, python: bool = False) -> LoadResult:
    """wrk when it is installed (and not overridden), the Python generator otherwise."""
    if not python and shutil.which("wrk"):
        return run_wrk(base, paths, mode, clients, seconds)
    return run_python(base, paths, mode, clients, seconds)


def line(name: str, mode: str, r: LoadResult) -> str:
    return (f"{name:12s} {mode}: p50 {r.p50_ms:6.1f} ms  p95 {r.p95_ms:6.1f} ms  {r.requests / r.seconds:7.0f} req/s  "
            f"({r.requests} requests, {r.errors} errors, {r.tool})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench.duckdb")
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens for the store if it must be built")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk is installed")
    a = ap.parse_args()
    use_python = a.python_load or shutil.which("wrk") is None
    tool = ("the Python load generator (wrk not installed: `make bench` or `apt-get install wrk` gives faster numbers)"
            if use_python and not a.python_load else "the Python load generator" if use_python else "wrk")
    a.store.parent.mkdir(parents=True, exist_ok=True)
    ensure_store(a.store, a.tokens)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "serve", str(a.store), "--port", str(port), "--no-worker", "--no-prewarm"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/")
        sae = httpx.get(base + "/api/saes").json()[0]
        sid, n = sae["sae_id"], sae["d_sae"]
        feats = [f"/sae/{sid}/feature/{i}" for i in random.Random(0).sample(range(n), n)]
        words = sorted({t.strip().lower() for i in range(0, n, 7)
                        for t in httpx.get(f"{base}/api/saes/{sid}/features", params={"page": i // 50 + 1}).json()["features"][0]["top_tokens"]
                        if t.strip().isalpha()})
        searches = [f"/sae/{sid}/search?q={w}" for w in words]
        warm_feats, warm_search = feats[-200:], searches[:50]
        for p in warm_feats + warm_search:
            httpx.get(base + p)
        print(f"{sid}: {n} features, {len(searches)} distinct search words; load from {tool}, {a.clients} connections, "
              f"{a.seconds:.0f} s per run, {os.cpu_count()} cores shared by server and load generator")
        for name, cold, warm in (("feature page", feats[:-200], warm_feats), ("search", searches[50:], warm_search)):
            for mode, paths in (("cold", cold), ("warm", warm)):
                if name == "search" and mode == "cold":
                    # too few distinct queries to keep 16 clients on never-seen ones: time them one by one
                    lat = []
                    with httpx.Client(base_url=base) as c:
                        for p in paths:
                            t0 = time.perf_counter()
                            c.get(p).raise_for_status()
                            lat.append(1000 * (time.perf_counter() - t0))
                    print(f"{name:12s} cold, 1 client, {len(lat)} distinct queries: p50 {pct(lat, 0.5):6.1f} ms  "
                          f"p95 {pct(lat, 0.95):6.1f} ms")
                    continue
                print(line(name, mode, run_load(base, paths, mode, a.clients, a.seconds, use_python)))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    # the default `saescope serve`: every feature page pre-rendered in the background after startup
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "serve", str(a.store), "--port", str(port), "--no-worker"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/")
        t0 = time.time()
        while not httpx.get(base + "/_cache").json()["prewarmed"]:
            time.sleep(0.5)
        print(f"pre-rendering all {n} feature pages took {time.time() - t0:.0f} s after startup")
        r = run_load(base, feats, "warm", a.clients, a.seconds, use_python)
        print(line("feature page", "any, after pre-rendering", r))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
