"""Steering through a real worker on the embedded default: 8 concurrent requests vs the same 8 one after another.

Every model use in the worker holds one lock (reading activations installs module hooks that would fire in
another thread's forward pass), so concurrent steering requests run one at a time; on 2 CPU cores the model is
compute-bound anyway. Prints p50 latency and the concurrent/serial throughput ratio.
Usage: python bench/steer_worker.py [--requests 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import start_worker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="steering requests per run")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens each request generates")
    a = ap.parse_args()
    proc, url = start_worker()
    try:
        sae_id = httpx.get(url + "/health").json()["saes"][0]["sae_id"]
        client = httpx.Client(base_url=url, timeout=600)
        prompts = [f"Return the {w} of the buffer when the file descriptor is closed and" for w in
                   ("size", "name", "mode", "offset", "length", "owner", "state", "value")]

        def call(i: int) -> float:
            t0 = time.perf_counter()
            r = client.post("/steer", json={"sae_id": sae_id, "text": prompts[i % len(prompts)],
                                            "max_new_tokens": a.new_tokens,
                                            "edits": [{"feature": 0, "mode": "add", "value": 8.0}]})
            r.raise_for_status()
            return time.perf_counter() - t0

        call(0)  # warm up
        t0 = time.perf_counter()
        serial = [call(i) for i in range(a.requests)]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.requests) as pool:
            list(pool.map(call, range(a.requests)))
        t_conc = time.perf_counter() - t0
        print(f"steer {a.new_tokens} new tokens (default + steered), {a.requests} requests: serial p50 "
              f"{1000 * statistics.median(serial):.0f} ms, {a.requests / t_serial:.2f} req/s; concurrent "
              f"{a.requests / t_conc:.2f} req/s; ratio concurrent/serial {t_serial / t_conc:.2f}x")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
