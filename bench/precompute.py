"""Precompute throughput against the bare model: how much do saescope's bookkeeping and storage cost?

Measured in one run on the embedded default (SmolLM2-135M + the demo SAE), same tokens:
  bare        forward to the hook (stopping early) + SAE encode, results dropped
  precompute  the full streaming pass (sparse extraction, crash-safe DuckDB appends) and, separately, the
              end-to-end job including building every feature's tables, logit effects and neighbours
Also: peak resident memory of `saescope precompute` at two token counts, and the store's bytes per example.
Target: precompute / bare >= 0.9.
Usage: python bench/precompute.py [--tokens 65536] [--mem-tokens 32768 131072]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT  # noqa: E402


def peak_rss_mb(tokens: int, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "app.cli", "precompute", "--tokens", str(tokens), "--out", str(out)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return usage.ru_maxrss / 1024, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--mem-tokens", type=int, nargs=2, default=[32_768, 131_072])
    a = ap.parse_args()

    import torch

    from precompute.store import Store
    from precompute.config import PRECOMPUTE
    from precompute.data import iter_contexts, iter_texts
    from precompute.embedded import resolve_model, resolve_sae
    from precompute.models import load_model
    from precompute.run import PrecomputeArgs, encode_batch, run_precompute
    from precompute.saes import load_sae

    lm = load_model(resolve_model("default"), "cpu", "float32")
    sae = load_sae(resolve_sae("default"))
    T, B = PRECOMPUTE.context_len, PRECOMPUTE.batch_size
    n_ctx = a.tokens // T
    ctxs = list(itertools.islice(iter_contexts(iter_texts("default"), lm.tokenizer, T, True), n_ctx))
    encode_batch(lm, sae, np.stack(ctxs[:B]), sae.cfg.hook_name)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n_ctx, B):
        encode_batch(lm, sae, np.stack(ctxs[i:i + B]), sae.cfg.hook_name)
    bare = n_ctx * T / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = PrecomputeArgs(out=Path(tmp) / "b.duckdb", tokens=a.tokens, progress=False)
        run_precompute(args)
        tm = args.timings
        stream = tm["tokens"] / tm["stream"]
        e2e = tm["tokens"] / (tm["stream"] + tm["publish"])
        with Store(args.out) as s:
            sid = s.saes()[0].sae_id
            st = s.stats(sid)
        size = args.out.stat().st_size
        print(f"embedded default, {a.tokens:,} tokens in {n_ctx} contexts of {T}, batch {B}, {torch.get_num_threads()} threads")
        print(f"bare forward-to-hook + encode : {bare:8.0f} tokens/s")
        print(f"precompute, streaming pass    : {stream:8.0f} tokens/s   ratio {stream / bare:.3f}")
        print(f"precompute, end to end        : {e2e:8.0f} tokens/s   ratio {e2e / bare:.3f}  "
              f"(tables {tm['publish']:.1f} s, model load {tm['load']:.1f} s not counted)")
        print(f"store: {size / 2**20:.1f} MB, {st['examples']:,} examples, {st['contexts']:,} contexts -> "
              f"{size / st['examples']:.0f} bytes per example; {st['full_top_k']:,} of {st['live_features']:,} live "
              f"features have a full top-{PRECOMPUTE.top_k}")
        for n in a.mem_tokens:
            rss, secs = peak_rss_mb(n, Path(tmp) / f"m{n}.duckdb")
            print(f"peak RSS of `saescope precompute --tokens {n:,}`: {rss:7.0f} MB  ({secs:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
