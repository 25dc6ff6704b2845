"""Live latency and the gain from dynamic batching, on the embedded default, against a real worker process.

Prints p50 latency of a 64-token prompt (one client) and requests/s with 1 and with 16 concurrent clients.
Batching should give well over 3x the serial throughput.
Usage: python bench/worker.py [--requests 48]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import pct, start_worker  # noqa: E402


def prompts(n: int, tokenizer) -> list[list[int]]:
    """n different prompts of exactly 64 token ids (BOS + 63 tokens of text)."""
    from saescope.precompute.data import iter_texts

    out = []
    for text in iter_texts("default"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 63:
            out.append([tokenizer.bos_token_id] + ids[:63])
        if len(out) == n:
            return out
    raise RuntimeError("corpus too small")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per throughput run")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from saescope.precompute.embedded import convert_default_model

    tok = AutoTokenizer.from_pretrained(convert_default_model())
    texts = prompts(a.requests, tok)
    proc, url = start_worker()
    try:
        sae_id = httpx.get(url + "/health").json()["saes"][0]["sae_id"]
        client = httpx.Client(base_url=url, timeout=120)

        def call(ids: list[int]) -> float:
            t0 = time.perf_counter()
            r = client.post("/top_features", json={"sae_id": sae_id, "ids": ids, "k": 10})
            r.raise_for_status()
            assert len(r.json()["tokens"]) == 64, len(r.json()["tokens"])
            return time.perf_counter() - t0

        for t in texts[:3]:
            call(t)  # warm-up
        t0 = time.perf_counter()
        lat = [call(t) for t in texts]
        serial = len(texts) / (time.perf_counter() - t0)
        h0 = httpx.get(url + "/health").json()
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(16) as pool:
            lat16 = list(pool.map(call, texts))
        conc = len(texts) / (time.perf_counter() - t0)
        h1 = httpx.get(url + "/health").json()
        batches = h1["batches"] - h0["batches"]
        print(f"embedded default, 64-token prompts, {os.cpu_count()} cores, /top_features")
        print(f"1 client  : p50 {1000 * pct(lat, 0.5):6.1f} ms  p95 {1000 * pct(lat, 0.95):6.1f} ms  {serial:6.1f} req/s")
        print(f"16 clients: p50 {1000 * pct(lat16, 0.5):6.1f} ms  p95 {1000 * pct(lat16, 0.95):6.1f} ms  {conc:6.1f} req/s  "
              f"({len(texts)} requests in {batches} forward passes)")
        print(f"batching gain: {conc / serial:.1f}x the serial throughput")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
