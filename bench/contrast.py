"""Contrast of 2 x 500 texts of 64 tokens on the embedded default (goal: <= 60 s on 2 cores).

Texts A and B are 64-token windows of the demo corpus: A from documents that mention "file", B from the others
(a real, fuzzy concept). Times text_activations for both sides, the ranking and the sparse probes.

Reports wall and CPU seconds (the machine may be shared: CPU seconds / cores is what an idle machine would take,
roughly) and the steps: encoding both sides (text_activations), ranking + sparse probes, the listed texts' per-token
values (from the kept nonzeros).

Usage: python bench/contrast.py [--n 500] [--tokens 64] [--dtype float32|bfloat16|auto] [--top 50]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from saescope.precompute import contrast as ct
    from saescope.precompute.data import demo_corpus
    from saescope.precompute.embedded import resolve_model, resolve_sae
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top", type=int, default=50)
    a = ap.parse_args()
    lm = load_model(str(resolve_model("default")), "cpu", a.dtype)
    sae = load_sae(str(resolve_sae("default")))
    tok = lm.tokenizer
    A, B = [], []
    with demo_corpus().open() as f:
        for line in f:
            text = json.loads(line)["text"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids) - a.tokens + 1, a.tokens):
                w = tok.decode(ids[s:s + a.tokens - 1])  # BOS makes it 64
                (A if " file" in w else B).append(w)
            if len(A) >= a.n and len(B) >= a.n:
                break
    A, B = A[:a.n], B[:a.n]
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    c = ct.compute(lm, sae, sae.cfg.hook_name, A, B, True, "max", a.top, batch_size=16)
    t1, c1 = time.perf_counter(), time.process_time()
    r, p = c.result, c.run["probe"]
    print(json.dumps({"n_per_side": len(A), "tokens_per_text": a.tokens, "dtype": str(lm.dtype) if hasattr(lm, "dtype")
                      else a.dtype, "torch_threads": torch.get_num_threads(), "total_wall_s": round(t1 - t0, 1),
                      "total_cpu_s": round(c1 - c0, 1), "steps_wall_s": {k: round(v, 1) for k, v in c.timings.items()},
                      "top_a": [int(f) for f in r.top_a[:5]],
                      "top_a_auroc": [round(float(r.auroc[f]), 3) for f in r.top_a[:5]],
                      "probe_acc": p["sae_accuracy"], "dense_acc": p["dense_accuracy"]}))


if __name__ == "__main__":
    main()
