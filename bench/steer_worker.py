"""Steering through a real worker on the embedded default: 1, 4 and 8 concurrent requests vs the same requests one
after another.

Concurrent steering requests are decoded together in one KV-cached batch (app/worker/genbatch.py over
precompute.interventions.generate_many), so throughput grows with concurrency. Prints p50 latency and the
concurrent/serial throughput ratio per concurrency level.
Usage: python bench/steer_worker.py [--concurrency 1 4 8] [--new-tokens 32] [--kl] [--logprobs N]
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
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="concurrent requests per run")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens each request generates")
    ap.add_argument("--kl", action="store_true", help="also ask for KL(default || steered) per step (one more row)")
    ap.add_argument("--logprobs", type=int, default=0, help="top log-probs per token")
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
                                            "max_new_tokens": a.new_tokens, "kl": a.kl,
                                            "n_logprobs": a.logprobs,
                                            "edits": [{"feature": 0, "mode": "add", "value": 8.0}]})
            r.raise_for_status()
            return time.perf_counter() - t0

        call(0)  # warm up
        for n in a.concurrency:
            t0 = time.perf_counter()
            serial = [call(i) for i in range(n)]
            t_serial = time.perf_counter() - t0
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(n) as pool:
                conc = list(pool.map(call, range(n)))
            t_conc = time.perf_counter() - t0
            print(f"steer {a.new_tokens} new tokens (default + steered{', KL row' if a.kl else ''}), {n} requests: "
                  f"serial p50 {1000 * statistics.median(serial):.0f} ms, {n / t_serial:.2f} req/s; concurrent p50 "
                  f"{1000 * statistics.median(conc):.0f} ms, {n / t_conc:.2f} req/s; ratio concurrent/serial "
                  f"{t_serial / t_conc:.2f}x", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
