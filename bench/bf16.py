"""bf16 against float32 on this CPU: forward + encode throughput and the difference from float32, in one run.

On the embedded default (SmolLM2-135M to blocks.9.hook_resid_post + the demo TopK SAE, k=32 of 4096), the same
contexts, rounds interleaved so that load on the shared machine hits every variant alike:
  fp32        model float32, SAE float32                    (the reference)
  bf16        model bfloat16, SAE float32 on its activations (what `--dtype bfloat16` / auto runs)
  bf16+sae16  model bfloat16, SAE bfloat16                  (the alternative, to justify keeping the SAE in fp32)
Differences from fp32, S = the SAE's largest fp32 activation on these tokens (the bound of precompute/verify.py):
max |diff| / S where both are active, the share of active positions whose TopK selection changes (one side zero,
the other beyond the bound) and their largest value, the hook activations' relative error |dx| / |x|.
Also the hook error of tiny random models of four families (every layer's resid_post), to show how it grows.
Usage: python bench/bf16.py [--tokens 16384] [--rounds 2] [--dtype bfloat16|float16]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _quantiles(x: torch.Tensor) -> str:
    q = torch.quantile(x.double(), torch.tensor([0.5, 0.99, 1.0], dtype=torch.float64)).tolist()
    return "median {:.4f}, 99% {:.4f}, max {:.4f}".format(*q)


def default_model(tokens: int, rounds: int, low: str) -> None:
    from saescope.precompute.config import PRECOMPUTE
    from saescope.precompute.data import iter_dataset_contexts, special_mask
    from saescope.precompute.embedded import resolve_model, resolve_sae
    from saescope.precompute.encode import encode_activations
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    tau = {"bfloat16": PRECOMPUTE.verify_bound_bf16, "float16": PRECOMPUTE.verify_bound_fp16}[low]
    T, B = PRECOMPUTE.context_len, PRECOMPUTE.batch_size
    sae = load_sae(resolve_sae("default")).float()
    sae_low = copy.deepcopy(sae).to(getattr(torch, low))
    hook = sae.cfg.hook_name
    lm32, lm16 = load_model(resolve_model("default"), "cpu", "float32"), load_model(resolve_model("default"), "cpu", low)
    ctxs = np.stack(list(itertools.islice(iter_dataset_contexts("default", "text", lm32.tokenizer, T, sae.cfg.prepend_bos),
                                          tokens // T)))
    batches = [(torch.from_numpy(ctxs[i:i + B]).long(), torch.from_numpy(special_mask(ctxs[i:i + B], lm32.tokenizer)))
               for i in range(0, len(ctxs), B)]
    n_tok = ctxs.size
    print(f"embedded default, {n_tok:,} tokens in {len(batches)} batches of {B}x{T}, {torch.get_num_threads()} threads; "
          f"low precision: {low}")
    for lm, sa in ((lm32, sae), (lm16, sae), (lm16, sae_low)):  # warm-up: one batch each
        ids, sp = batches[0]
        encode_activations(sa, lm.activations(ids, hook).to(sa.W_enc.dtype), sp)
    t = {"forward32": 0.0, "forward16": 0.0, "encode32": 0.0, "encode16": 0.0}
    stats = {"rho": [], "both": 0.0, "both_s": 0.0, "rel": 0.0, "rel_s": 0.0, "one": [], "one_s": [], "active": 0,
             "peak": 0.0}
    for r in range(rounds):
        for ids, sp in batches:
            t0 = time.perf_counter()
            a32 = lm32.activations(ids, hook)  # (B, T, d_model)
            t1 = time.perf_counter()
            z32 = encode_activations(sae, a32, sp)  # (B, T, d_sae)
            t2 = time.perf_counter()
            a16 = lm16.activations(ids, hook)  # float32 copy of the low-precision activations
            t3 = time.perf_counter()
            z16 = encode_activations(sae, a16, sp)
            t4 = time.perf_counter()
            z16s = encode_activations(sae_low, a16.to(sae_low.W_enc.dtype), sp)
            t5 = time.perf_counter()
            t["forward32"] += t1 - t0
            t["encode32"] += (t2 - t1) + (t4 - t3)  # the fp32 SAE, run twice (on both activations)
            t["forward16"] += t3 - t2
            t["encode16"] += 2 * (t5 - t4)  # ... to compare with the low-precision SAE on the same footing
            if r:
                continue
            keep = ~sp
            stats["rho"].append(((a16 - a32).norm(dim=-1) / a32.norm(dim=-1))[keep])
            stats["peak"] = max(stats["peak"], float(z32.max()))
            for key, z in (("", z16), ("_s", z16s.float())):
                d = (z - z32).abs()
                both = (z != 0) & (z32 != 0)
                stats["both" + key] = max(stats["both" + key], float(d[both].max()))
                rel = d[both] / torch.maximum(z[both].abs(), z32[both].abs())
                stats["rel" + key] = max(stats["rel" + key], float(rel.max()))
                stats["one" + key].append(d[(z == 0) != (z32 == 0)])
            stats["active"] += int(((z16 != 0) | (z32 != 0)).sum())
    S = stats["peak"]
    f32 = n_tok * rounds / (t["forward32"] + t["encode32"] / 2)
    f16 = n_tok * rounds / (t["forward16"] + t["encode32"] / 2)
    f16s = n_tok * rounds / (t["forward16"] + t["encode16"] / 2)
    print(f"forward+encode tokens/s: fp32 {f32:,.0f}   {low} model + fp32 SAE {f16:,.0f}   {low} model + {low} SAE "
          f"{f16s:,.0f}")
    print(f"ratio {low}/fp32: {f16 / f32:.2f}x (model {low}, SAE fp32); {f16s / f32:.2f}x (both {low}); "
          f"forward alone {t['forward32'] / t['forward16']:.2f}x, SAE encode alone {t['encode32'] / t['encode16']:.2f}x")
    print(f"hook activation relative error |dx|/|x| over tokens: {_quantiles(torch.cat(stats['rho']))}")
    for key, name in (("", f"{low} model + fp32 SAE"), ("_s", f"{low} model + {low} SAE")):
        one = torch.cat(stats["one" + key])  # |diff| at every zero/nonzero disagreement
        changes = one[one > tau * S]  # ... beyond the bound: what verify counts as selection changes
        largest = float(one.max()) / S if len(one) else 0.0
        print(f"[{name}] S = {S:.3g}: max |diff| / S where both active {stats['both' + key] / S:.4f} (bound {tau:g}); "
              f"zero/nonzero disagreements {len(one) / stats['active']:.2%} of {stats['active']:,} active positions, "
              f"{len(changes) / stats['active']:.2%} beyond the bound "
              f"(bound {PRECOMPUTE.verify_changes_bf16 if low == 'bfloat16' else PRECOMPUTE.verify_changes_fp16:.0%}), "
              f"largest {largest:.4f} S; max relative diff |diff| / max(|a|, |b|) where both active "
              f"{stats['rel' + key]:.3f} (1 at every selection change)")


def tiny_models(low: str) -> None:
    """The hook error through the layers of tiny random models (the test fixtures' configs: 3 layers, d_model 32)."""
    from transformers import AutoModelForCausalLM

    from saescope.precompute.models import HookedLM
    from tests.conftest import _tiny_config

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, (8, 64)))
    for family in ("gpt2", "neox", "llama", "gemma2"):
        torch.manual_seed(0)
        m32 = AutoModelForCausalLM.from_config(_tiny_config(family)).eval()
        m16 = copy.deepcopy(m32).to(getattr(torch, low))
        h32, h16 = HookedLM(m32, None, family, "cpu"), HookedLM(m16, None, family, "cpu")
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(h32.n_layers)]
        a32, a16 = h32.activations_multi(ids, hooks), h16.activations_multi(ids, hooks)
        errs = [float(((a16[h] - a32[h]).norm(dim=-1) / a32[h].norm(dim=-1)).max()) for h in hooks]
        print(f"tiny {family:6s} max |dx|/|x| by layer: " + " ".join(f"{e:.4f}" for e in errs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds (the differences come from the first)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    a = ap.parse_args()
    from saescope.precompute.models import cpu_has_native_bf16, resolve_dtype

    print(f"this CPU has native bf16 (avx512_bf16/amx_bf16): {cpu_has_native_bf16()}; --dtype auto on cpu resolves "
          f"to {resolve_dtype('auto', 'cpu')}")
    default_model(a.tokens, a.rounds, a.dtype)
    tiny_models(a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
