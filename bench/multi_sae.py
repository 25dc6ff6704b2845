"""Several SAEs in one forward pass vs one run per SAE (issue 10).

The embedded default model (SmolLM2-135M) with three SAEs at three hooks: the committed demo SAE read at
blocks.{L}.hook_resid_post for three neighbouring layers (the hook override makes it a different SAE input each
time; the cost of encoding and storing is that of a real 4,096-feature TopK SAE). One `precompute` run with all
three (one forward pass that stops after the deepest hook) against three single-SAE runs over the same tokens.
Reported: forward-pass seconds (time inside HookedLM.activations_multi), streaming-pass seconds and end-to-end
seconds (model load excluded), and their ratios. The forward ratio cannot exceed (sum of layers run by the
separate runs) / (layers run by the shared run), printed as the ideal.

Usage: python bench/multi_sae.py [--tokens 16384] [--layers 8 9 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--layers", type=int, nargs=3, default=[8, 9, 10])
    a = ap.parse_args()

    import torch

    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    specs = [SAESpec("default", f"blocks.{L}.hook_resid_post", f"demo-l{L}") for L in a.layers]
    common = dict(tokens=a.tokens, progress=False, verify_sample=0)
    def timed(spec_kw) -> dict:
        """Run precompute; its "finished" event's timings (load, stream, forward, publish seconds; tokens)."""
        timings = {}
        run_precompute(PrecomputeSpec(**spec_kw, **common,
                                      on_event=lambda name, **info: timings.update(info) if name == "finished" else None))
        return timings

    with tempfile.TemporaryDirectory() as tmp:
        m = timed(dict(out=Path(tmp) / "multi.duckdb", saes=specs))
        singles = [timed(dict(out=Path(tmp) / f"{s.sae_id}.duckdb", saes=[s])) for s in specs]
    sep = {k: sum(t[k] for t in singles) for k in ("forward", "stream", "publish")}
    ideal = sum(L + 1 for L in a.layers) / (max(a.layers) + 1)
    print(f"embedded default, {m['tokens']:,} tokens, SAEs at layers {a.layers}, {torch.get_num_threads()} threads")
    print(f"forward   : one run {m['forward']:7.1f} s   3 runs {sep['forward']:7.1f} s   ratio {sep['forward'] / m['forward']:.2f}"
          f"  (ideal {ideal:.2f})")
    print(f"stream    : one run {m['stream']:7.1f} s   3 runs {sep['stream']:7.1f} s   ratio {sep['stream'] / m['stream']:.2f}")
    e2e_m, e2e_s = m["stream"] + m["publish"], sep["stream"] + sep["publish"]
    print(f"end to end: one run {e2e_m:7.1f} s   3 runs {e2e_s:7.1f} s   ratio {e2e_s / e2e_m:.2f}  (model load excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
