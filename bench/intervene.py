"""Cost of the SAE splice on the embedded default (SmolLM2-135M + the demo SAE), CPU, in-process.

Prints p50 latencies and the ratios the issue sets targets for:
  - 32 steered new tokens after a 32-token prompt vs plain `model.generate` of 32 tokens      (target <= 1.3x)
  - default + steered as one batch of 2 vs the two runs one after the other
  - attribution (one forward + one backward, all features and positions) for a 64-token prompt
    vs one plain forward pass                                                               (target <= 3x)
  - the same with the true ablation effect of the top 10 features (one batched forward of 11 rows)
  - steering cost per method (add, add along the unit direction, orthogonal, cap) vs plain generate (<= 1.3x)
  - 8 steering requests (32 new tokens each, default + steered) as one batch (generate_many) vs one after the other
  - an activation-patching experiment over all positions of a 32-token prompt (8 heatmap features) vs one forward
Runs are interleaved (a, b, c, a, b, c, ...) so that load from other processes hits every variant alike.
Usage: python bench/intervene.py [--reps 7] [--threads N] [--only steer methods many patch attribution]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import pct  # noqa: E402


def prompt_of(tokenizer, n: int) -> list[int]:
    """BOS + the first n-1 tokens of the first long enough demo-corpus text."""
    from saescope.precompute.data import iter_texts

    for text in iter_texts("default"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n - 1:
            return [tokenizer.bos_token_id] + ids[: n - 1]
    raise RuntimeError("corpus too small")


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warm: bool = True) -> dict[str, list[float]]:
    for fn in fns.values() if warm else ():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of each variant")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as load_model sets)")
    ap.add_argument("--only", nargs="+", default=["steer", "attribution", "methods", "many", "patch"],
                    help="sections to run")
    a = ap.parse_args()
    import torch

    from saescope.precompute import interventions as iv
    from saescope.precompute.config import EMBEDDED
    from saescope.precompute.embedded import convert_default_model
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm = load_model(str(convert_default_model()), device="cpu", dtype="float32")
    if a.threads:
        torch.set_num_threads(a.threads)
    sae = load_sae(EMBEDDED.sae_dir)
    p32, p64 = prompt_of(lm.tokenizer, 32), prompt_of(lm.tokenizer, 64)
    edits = [iv.Edit(365, "add", 10.0)]
    n = 32
    t32 = torch.tensor([p32])

    def plain() -> None:
        with torch.no_grad():
            out = lm.model.generate(t32, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        assert out.shape[1] == 32 + n

    def steered() -> None:
        g = iv.generate(lm, sae, p32, edits, n, with_default=False, stop_at_eos=False)
        assert len(g.steered.ids) == n

    def both_batched() -> None:
        iv.generate(lm, sae, p32, edits, n, stop_at_eos=False, batched=True)

    def both_serial() -> None:
        iv.generate(lm, sae, p32, edits, n, stop_at_eos=False, batched=False)

    gen = (interleaved({"plain": plain, "steered": steered, "batched": both_batched, "serial": both_serial}, a.reps)
           if "steer" in a.only else None)

    t64 = torch.tensor([p64])

    def forward() -> None:
        with torch.no_grad():
            lm.model(input_ids=t64, use_cache=False)

    def grads() -> None:
        iv.latent_gradients(lm, sae, p64)

    def attribute() -> None:
        iv.attribute(lm, sae, p64, n_top=20, n_verify=10)

    att = interleaved({"forward": forward, "grads": grads, "attribute": attribute}, a.reps) \
        if "attribution" in a.only else None

    meth = None
    if "methods" in a.only:
        def method(mode: str, value: float, unit: bool = False) -> Callable[[], None]:
            def run() -> None:
                g = iv.generate(lm, sae, p32, [iv.Edit(365, mode, value, normalize=unit)], n, with_default=False,
                                stop_at_eos=False)
                assert len(g.steered.ids) == n
            return run
        meth = interleaved({"plain": plain, "add": method("add", 10.0), "add:unit": method("add", 10.0, True),
                            "orthogonal": method("orthogonal", 4.0), "cap": method("cap", 0.0)}, a.reps)

    many = None
    if "many" in a.only:
        texts = ["Return the size of the buffer when", "The file descriptor is closed and", "In Python, a list",
                 "The module defines the following functions", "An exception is raised if the",
                 "This function returns a new", "Changed in version 3.8:", "The default value of the"]
        reqs = [iv.GenRequest([lm.tokenizer.bos_token_id] + lm.tokenizer(t, add_special_tokens=False)["input_ids"],
                              [iv.Edit(365 + i, "add", 8.0)], n, iv.Sampling(0.0 if i % 2 else 0.8, 1.0, i),
                              stop_at_eos=False) for i, t in enumerate(texts)]

        def one_by_one() -> None:
            for r in reqs:
                iv.generate(lm, sae, r.ids, r.edits, r.max_new_tokens, r.sampling, stop_at_eos=False)

        def together() -> None:
            iv.generate_many(lm, sae, reqs)

        iv.generate(lm, sae, reqs[0].ids, reqs[0].edits, 4)  # warm-up (the runs below are long)
        many = interleaved({"serial8": one_by_one, "batch8": together}, max(1, a.reps // 3), warm=False)

    pat = None
    if "patch" in a.only:
        from saescope.precompute.interventions.patching import Metric, patch

        corrupted = list(p32)
        corrupted[5], corrupted[12] = corrupted[12], corrupted[5]
        tgt = int(lm.model(input_ids=t32).logits[0, -1].argmax())

        def forward32() -> None:
            with torch.no_grad():
                lm.model(input_ids=t32, use_cache=False)

        def patching() -> None:
            patch(lm, sae, p32, corrupted, Metric("logprob", tgt), n_features=8)

        pat = interleaved({"forward": forward32, "patch": patching}, max(2, a.reps // 2))

    def p50(xs: list[float]) -> float:
        return pct(xs, 0.5)

    print(f"embedded default + demo SAE (hook {sae.cfg.hook_name}, {sae.cfg.d_sae} features), CPU, "
          f"{torch.get_num_threads()} threads of {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, "
          f"{a.reps} reps, p50 (min)")
    for k, label in ([] if gen is None else [("plain", "plain model.generate, 32 new tokens"), ("steered", "steered generate, 32 new tokens"),
                     ("batched", "default + steered, batch of 2"), ("serial", "default + steered, one after the other")]):
        print(f"  {label:<42} {1000 * p50(gen[k]):8.1f} ms ({1000 * min(gen[k]):.1f})")
    if gen is not None:
        print(f"  steered / plain generate: {p50(gen['steered']) / p50(gen['plain']):.2f}x  (target <= 1.3x; "
              f"min/min {min(gen['steered']) / min(gen['plain']):.2f}x)")
        print(f"  batch of 2 / serial: {p50(gen['batched']) / p50(gen['serial']):.2f}x  "
              f"(< 1 means batching the default and steered runs is faster)")
    if att is not None:
        for k, label in [("forward", "one forward, 64 tokens"), ("grads", "attribution (forward + backward)"),
                         ("attribute", "attribution + true effect of top 10")]:
            print(f"  {label:<42} {1000 * p50(att[k]):8.1f} ms ({1000 * min(att[k]):.1f})")
        print(f"  attribution / forward: {p50(att['grads']) / p50(att['forward']):.2f}x  (target <= 3x; "
              f"min/min {min(att['grads']) / min(att['forward']):.2f}x); with top-10 verification "
              f"{p50(att['attribute']) / p50(att['forward']):.2f}x")
    if meth is not None:
        for k in ("add", "add:unit", "orthogonal", "cap"):
            print(f"  steered ({k:<10}) / plain generate: {p50(meth[k]) / p50(meth['plain']):.2f}x  "
                  f"(min/min {min(meth[k]) / min(meth['plain']):.2f}x; target <= 1.3x)")
    if many is not None:
        print(f"  8 requests one by one {1000 * p50(many['serial8']):.0f} ms, as one batch "
              f"{1000 * p50(many['batch8']):.0f} ms: throughput {p50(many['serial8']) / p50(many['batch8']):.2f}x "
              f"(min/min {min(many['serial8']) / min(many['batch8']):.2f}x; goal >= 2x)")
    if pat is not None:
        print(f"  patching, 32-token prompt, all positions x 8 features: {1000 * p50(pat['patch']):.0f} ms vs one "
              f"forward {1000 * p50(pat['forward']):.1f} ms ({p50(pat['patch']) / p50(pat['forward']):.0f}x)")
    if gen is not None:
        spread = statistics.pstdev(gen["plain"]) / statistics.mean(gen["plain"])
        if spread > 0.25:
            print(f"  note: plain generate varied by {100 * spread:.0f}% between reps (other load on the machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
