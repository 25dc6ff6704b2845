"""Precompute throughput against the bare model: how much do saescope's bookkeeping and storage cost?

Measured in one run on the embedded default model (SmolLM2-135M), same tokens, with the demo SAE (TopK, L0 32)
or any SAE on it (--sae; the peer's ReLU SAE has L0 ~91: `--sae /tmp/peer/sae --dataset peer`):
  bare        forward to the hook (stopping early) + SAE encode, results dropped (timed before and after the
              precompute run, the mean is used: the machine may be shared)
  precompute  the full streaming pass (sparse extraction, crash-safe appends, sealing into Parquet) and,
              separately, the end-to-end job including every feature's tables, logit effects and neighbours
Also: peak resident memory of `saescope precompute` at two token counts, and the store's bytes per example.
Target: precompute / bare >= 0.9.
Usage: python bench/precompute.py [--tokens 65536] [--mem-tokens 32768 131072] [--sae DIR] [--dataset peer|FILE]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import peak_rss  # noqa: E402


def peak_rss_mb(tokens: int, out: Path, sae: str, dataset: str) -> tuple[float, float]:
    """Through bench.common.peak_rss: a small launcher, so this process's own memory is not counted."""
    cmd = [sys.executable, "-m", "saescope.app.cli", "precompute", "--tokens", str(tokens), "--out", str(out), "--sae", sae,
           "--dataset", dataset]
    return peak_rss(cmd, out.with_suffix(".log"), env={**os.environ, "TQDM_DISABLE": "1"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--mem-tokens", type=int, nargs="*", default=[32_768, 131_072])
    ap.add_argument("--sae", default="default", help="SAE on the embedded default model (default: the demo SAE)")
    ap.add_argument("--dataset", default="default",
                    help="'default' (the demo corpus), 'peer' (the peer's token rows, $PEER or /tmp/peer) or a file")
    a = ap.parse_args()
    if a.dataset == "peer":
        import json

        peer = Path(os.environ.get("PEER", "/tmp/peer")) / "data" / "contexts.jsonl"
        rows = Path(tempfile.mkdtemp()) / "peer_tokens.jsonl"
        with peer.open() as src, rows.open("w") as dst:
            for line in src:
                dst.write(json.dumps({"tokens": json.loads(line)["tokens"]}) + "\n")
        a.dataset = str(rows)

    import torch

    from saescope.precompute.store import Store
    from saescope.precompute.config import PRECOMPUTE
    from saescope.precompute.data import iter_dataset_contexts
    from saescope.precompute.embedded import resolve_model, resolve_sae
    from saescope.precompute.models import load_model
    from saescope.precompute.encode import encode_batch
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.saes import load_sae

    lm = load_model(resolve_model("default"), "cpu", "float32")
    sae = load_sae(str(resolve_sae(a.sae)))
    T, B = PRECOMPUTE.context_len, PRECOMPUTE.batch_size
    n_ctx = a.tokens // T
    ctxs = list(itertools.islice(iter_dataset_contexts(a.dataset, "text", lm.tokenizer, T, sae.cfg.prepend_bos), n_ctx))
    encode_batch(lm, sae, np.stack(ctxs[:B]), sae.cfg.hook_name)  # warm-up
    l0 = []

    def bare_pass() -> float:
        t0 = time.perf_counter()
        for i in range(0, n_ctx, B):
            z = encode_batch(lm, sae, np.stack(ctxs[i:i + B]), sae.cfg.hook_name)
            if len(l0) < 4:
                l0.append(float((z[:, 1:] > 0).sum(-1).float().mean()))
        return n_ctx * T / (time.perf_counter() - t0)

    bare_before = bare_pass()
    with tempfile.TemporaryDirectory() as tmp:
        tm = {}
        args = PrecomputeSpec(out=Path(tmp) / "b.duckdb", tokens=a.tokens, progress=False, saes=[SAESpec(a.sae)],
                              dataset=a.dataset, on_event=lambda name, **info: tm.update(info) if name == "finished" else None)
        run_precompute(args)
        bare_after = bare_pass()
        bare = (bare_before + bare_after) / 2
        stream = tm["tokens"] / tm["stream"]
        e2e = tm["tokens"] / (tm["stream"] + tm["publish"])
        with Store(args.out) as s:
            sid = s.saes()[0].sae_id
            st = s.stats(sid)
        size = args.out.stat().st_size
        print(f"embedded default model, SAE {a.sae} (L0 {np.mean(l0):.1f} without BOS), {a.tokens:,} tokens in {n_ctx} "
              f"contexts of {T}, batch {B}, {torch.get_num_threads()} threads")
        print(f"bare forward-to-hook + encode : {bare:8.0f} tokens/s (before {bare_before:.0f}, after {bare_after:.0f})")
        print(f"precompute, streaming pass    : {stream:8.0f} tokens/s   ratio {stream / bare:.3f}")
        print(f"precompute, end to end        : {e2e:8.0f} tokens/s   ratio {e2e / bare:.3f}  "
              f"(tables {tm['publish']:.1f} s, model load {tm['load']:.1f} s not counted)")
        print(f"store: {size / 2**20:.1f} MB, {st['examples']:,} examples, {st['contexts']:,} contexts -> "
              f"{size / st['examples']:.0f} bytes per example; {st['full_top_k']:,} of {st['live_features']:,} live "
              f"features have a full top-{PRECOMPUTE.top_k}")
        for n in a.mem_tokens:
            rss, secs = peak_rss_mb(n, Path(tmp) / f"m{n}.duckdb", a.sae, a.dataset)
            print(f"peak RSS of `saescope precompute --tokens {n:,}`: {rss:7.0f} MB  ({secs:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
