"""Dashboard latency under load: a real uvicorn server on loopback, 16 concurrent clients (wrk).

Two runs per page kind, because the server caches rendered pages of the read-only store:
  cold  every request asks for a page never rendered before (distinct features / queries)
  warm  requests spread over 200 already-rendered pages
Prints p50/p95 latency and requests/s. Target: feature page p95 <= 25 ms. Needs `wrk` (Debian package).
Usage: python bench/serve.py [--store out/bench.duckdb] [--seconds 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, ensure_store, free_port, wait_up  # noqa: E402

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


def run_wrk(base: str, paths: list[str], mode: str, clients: int, seconds: float) -> tuple[int, float, float, float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f'MODE = "{mode}"\n' + LUA % ", ".join(f'"{p}"' for p in paths))
    out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "-s", f.name, base], capture_output=True,
                         text=True, check=True).stdout
    os.unlink(f.name)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    n, p50, p95, secs, errs = line.split()[1:]
    return int(n), float(p50), float(p95), float(secs), int(errs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench.duckdb")
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens for the store if it must be built")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench/serve.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    a.store.parent.mkdir(parents=True, exist_ok=True)
    ensure_store(a.store, a.tokens)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", str(a.store), "--port", str(port), "--no-worker", "--no-prewarm"],
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
        print(f"{sid}: {n} features, {len(searches)} distinct search words; wrk, {a.clients} connections, "
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
                    lat.sort()
                    print(f"{name:12s} cold, 1 client, {len(lat)} distinct queries: p50 {lat[len(lat) // 2]:6.1f} ms  "
                          f"p95 {lat[int(0.95 * len(lat))]:6.1f} ms")
                    continue
                req, p50, p95, secs, errs = run_wrk(base, paths, mode, a.clients, a.seconds)
                print(f"{name:12s} {mode}: p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  {req / secs:7.0f} req/s  "
                      f"({req} requests, {errs} errors)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    # the default `saescope serve`: every feature page pre-rendered in the background after startup
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", str(a.store), "--port", str(port), "--no-worker"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/")
        t0 = time.time()
        while not httpx.get(base + "/_cache").json()["prewarmed"]:
            time.sleep(0.5)
        print(f"pre-rendering all {n} feature pages took {time.time() - t0:.0f} s after startup")
        req, p50, p95, secs, errs = run_wrk(base, feats, "warm", a.clients, a.seconds)
        print(f"{'feature page':12s} any, after pre-rendering: p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  "
              f"{req / secs:7.0f} req/s  ({req} requests, {errs} errors)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
