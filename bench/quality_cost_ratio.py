"""Back-to-back in one process: the quality metrics on --eval-tokens vs the streaming pass (forward to the hook +
encode, batch 16, as precompute) on the same number of tokens; extrapolated to a default precompute's stream.

Usage: python bench/quality_cost_ratio.py [--eval-tokens 2048] [--stream-tokens 8192]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch


def main() -> None:
    from saescope.precompute.config import PRECOMPUTE
    from saescope.precompute.data import iter_dataset_contexts, special_mask
    from saescope.precompute.embedded import resolve_model, resolve_sae
    from saescope.precompute.models import load_model
    from saescope.precompute.quality import EvalSAE, quality_metrics
    from saescope.precompute.pipeline.stream import sparse_features
    from saescope.precompute.saes import load_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=PRECOMPUTE.eval_tokens)
    ap.add_argument("--stream-tokens", type=int, default=8192)
    a = ap.parse_args()
    lm = load_model(str(resolve_model("default")), "cpu", "float32")
    sae = load_sae(str(resolve_sae("default")))
    T = PRECOMPUTE.context_len
    n = (a.stream_tokens + a.eval_tokens) // T
    ctx = np.stack(list(itertools.islice(iter_dataset_contexts("default", "text", lm.tokenizer, T, True), n)))
    ev, st = ctx[: a.eval_tokens // T], ctx[a.eval_tokens // T:]
    t0 = time.perf_counter()
    for b in range(0, len(st), PRECOMPUTE.batch_size):
        ids = st[b:b + PRECOMPUTE.batch_size]
        acts = lm.activations(torch.from_numpy(ids).long(), sae.cfg.hook_name)
        sparse_features(sae, acts, torch.from_numpy(special_mask(ids, lm.tokenizer)), 0)
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    quality_metrics(lm, [EvalSAE(sae, sae.cfg.hook_name)], ev)
    q_s = time.perf_counter() - t0
    per_tok = stream_s / st.size
    print(json.dumps({"stream_tokens": int(st.size), "stream_s": round(stream_s, 1), "eval_tokens": int(ev.size),
                      "quality_s": round(q_s, 1), "quality_per_eval_token_over_stream_per_token":
                      round(q_s / ev.size / per_tok, 2),
                      "quality_share_of_default_stream": round(q_s / (per_tok * PRECOMPUTE.tokens), 4)}))


if __name__ == "__main__":
    main()
