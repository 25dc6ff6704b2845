"""Interleaved (load drift cancels): one stream batch (16 contexts, forward to the hook + encode, as precompute)
then the quality metrics on 4 contexts, repeated; the per-token cost ratio and the implied share of a default
precompute's streaming pass for the default --eval-tokens.

Usage: python bench/quality_cost_interleaved.py [--reps 3]
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
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    lm = load_model(str(resolve_model("default")), "cpu", "float32")
    sae = load_sae(str(resolve_sae("default")))
    T, B = PRECOMPUTE.context_len, PRECOMPUTE.batch_size
    ctx = np.stack(list(itertools.islice(iter_dataset_contexts("default", "text", lm.tokenizer, T, True),
                                         a.reps * (B + 4))))
    s_s = q_s = 0.0
    s_tok = q_tok = 0
    for r in range(a.reps):
        st, ev = ctx[r * (B + 4): r * (B + 4) + B], ctx[r * (B + 4) + B: (r + 1) * (B + 4)]
        t0 = time.perf_counter()
        acts = lm.activations(torch.from_numpy(st).long(), sae.cfg.hook_name)
        sparse_features(sae, acts, torch.from_numpy(special_mask(st, lm.tokenizer)), 0)
        t1 = time.perf_counter()
        quality_metrics(lm, [EvalSAE(sae, sae.cfg.hook_name)], ev)
        t2 = time.perf_counter()
        s_s, q_s, s_tok, q_tok = s_s + t1 - t0, q_s + t2 - t1, s_tok + st.size, q_tok + ev.size
    ratio = (q_s / q_tok) / (s_s / s_tok)
    print(json.dumps({"stream_tokens": s_tok, "stream_s": round(s_s, 1), "quality_tokens": q_tok,
                      "quality_s": round(q_s, 1), "per_token_ratio": round(ratio, 2),
                      "eval_tokens_default": PRECOMPUTE.eval_tokens,
                      "share_of_default_stream": round(ratio * PRECOMPUTE.eval_tokens / PRECOMPUTE.tokens, 4)}))


if __name__ == "__main__":
    main()
