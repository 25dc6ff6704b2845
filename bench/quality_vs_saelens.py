"""saescope's SAE quality metrics next to SAELens's own `run_evals`, on the same model, SAE and tokens.

The peer setup (../shared/peer/setup.sh, under $PEER, default /tmp/peer) has SAELens 6.54 + TransformerLens 2.17
offline on SmolLM2-135M-Instruct, a SAELens standard ReLU SAE (4,608 features, blocks.9.hook_resid_post) and
2,048 fixed contexts of 128 tokens (BOS first). This script

1. runs SAELens's `sae_lens.evals.run_evals` in the peer's venv (a subprocess) on the first --contexts contexts:
   HookedTransformer.from_pretrained_no_processing on the peer's HF cache (the TL patch for SmolLM2 from the peer
   folder), `get_eval_everything_config(batch_size_prompts=C, n_eval_reconstruction_batches=1,
   n_eval_sparsity_variance_batches=1)` so that both metric groups see exactly these C contexts as ONE batch,
   special tokens excluded (run_evals' default). SAELens's run_evals stops at per-feature densities; SAEBench's
   core misc metrics are computed from them with SAEBench's formulas (calculate_misc_metrics,
   calculate_max_cosine_sim) written out below;
2. runs saescope's `precompute.quality.quality_metrics` on the same tokens with the same SAE folder and the same
   weights (the peer's HF-cache SmolLM2 loaded with transformers; --model default uses saescope's embedded
   default instead, converted from the same GGUF);
3. prints the table and writes the raw numbers to bench/quality_vs_saelens.json (the note around them,
   bench/quality_vs_saelens.md, is written by hand).

Usage: python bench/quality_vs_saelens.py [--peer /tmp/peer] [--contexts 16] [--model peer|default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPTS = Path(os.environ.get("PEER_SCRIPTS", "/work/shared/peer"))
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ORDER = ["ce_loss_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_score",
         "kl_div_with_sae", "kl_div_with_ablation", "explained_variance", "mse", "cossim", "l2_norm_in",
         "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "frac_alive", "freq_over_1_percent",
         "freq_over_10_percent", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
         "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim"]


# ------------------------------------------------------------------ part 1: inside the peer venv
def saelens_part(peer: Path, n: int) -> dict:
    import torch

    sys.path.insert(0, str(PEER_SCRIPTS))
    import tl_smollm2_patch  # noqa: F401
    from sae_lens import SAE
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformer_lens import HookedTransformer

    torch.set_grad_enabled(False)
    tokens = torch.load(peer / "data" / "tokens.pt")[:n]
    model = HookedTransformer.from_pretrained_no_processing(MODEL_ID, device="cpu", dtype="float32")
    sae = SAE.load_from_disk(str(peer / "sae"), device="cpu")

    class FixedTokens:
        """What run_evals reads of an ActivationsStore: the same C contexts as every batch."""
        store_batch_size_prompts = n
        context_size = tokens.shape[1]

        def get_batch_tokens(self, k: int):
            assert k == n
            return tokens

        def reset_input_dataset(self):
            pass

    cfg = get_eval_everything_config(batch_size_prompts=n, n_eval_reconstruction_batches=1,
                                     n_eval_sparsity_variance_batches=1)
    t0 = time.perf_counter()
    metrics, feats = run_evals(sae, FixedTokens(), model, ActivationScaler(), cfg)
    seconds = time.perf_counter() - t0
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    # SAEBench core (sae_bench/evals/core/main.py): calculate_misc_metrics over SAELens's feature densities
    d = torch.tensor(feats["feature_density"]).float()
    tot = d.sum()

    def max_cos(m):  # calculate_max_cosine_sim: columns normalised, self-similarity excluded
        m = torch.nn.functional.normalize(m.float(), p=2, dim=0)
        s = m.T @ m
        s.fill_diagonal_(float("-inf"))
        return s.max(dim=1).values

    flat.update(frac_alive=(d > 0).float().mean().item(), freq_over_1_percent=(d > 0.01).float().mean().item(),
                freq_over_10_percent=(d > 0.1).float().mean().item(),
                normalized_freq_over_1_percent=(d[d > 0.01].sum() / tot).item() if tot > 0 else 0.0,
                normalized_freq_over_10_percent=(d[d > 0.1].sum() / tot).item() if tot > 0 else 0.0,
                average_max_encoder_cosine_sim=max_cos(sae.W_enc.detach()).mean().item(),
                average_max_decoder_cosine_sim=max_cos(sae.W_dec.detach().T).mean().item(),
                seconds=seconds)
    import sae_lens
    flat["version"] = f"sae_lens {sae_lens.__version__}"
    return flat


# ------------------------------------------------------------------ part 2: saescope
def saescope_part(peer: Path, n: int, model: str) -> dict:
    import torch

    from saescope.precompute.embedded import resolve_model
    from saescope.precompute.models import load_model
    from saescope.precompute.quality import EvalSAE, quality_metrics
    from saescope.precompute.saes import load_sae

    if model == "peer":
        snaps = sorted((peer / "hf" / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots").iterdir())
        path = str(snaps[-1])
    else:
        path = str(resolve_model("default"))
    lm = load_model(path, "cpu", "float32")
    tokens = torch.load(peer / "data" / "tokens.pt")[:n].numpy()
    sae = load_sae(str(peer / "sae"))
    r = quality_metrics(lm, [EvalSAE(sae, sae.cfg.hook_name, "peer")], tokens, batch_size=4)[0]
    r["model_path"] = path
    return r


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.6g}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", type=Path, default=Path(os.environ.get("PEER", "/tmp/peer")))
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--model", choices=("peer", "default"), default="peer")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "quality_vs_saelens.md")
    ap.add_argument("--saelens-part", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.saelens_part:
        print("RESULT " + json.dumps(saelens_part(a.peer, a.contexts)))
        return 0
    env = dict(os.environ, HF_HOME=str(a.peer / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONPATH="")
    proc = subprocess.run([str(a.peer / "venv" / "bin" / "python"), __file__, "--saelens-part", "--peer", str(a.peer),
                           "--contexts", str(a.contexts)], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        return 1
    ref = json.loads(lines[-1].removeprefix("RESULT "))
    ours = saescope_part(a.peer, a.contexts, a.model)
    raw = {"saelens": ref, "saescope": ours, "contexts": a.contexts, "model": a.model}
    a.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    rows = ["| metric | SAELens 6.54 run_evals (+ SAEBench misc) | saescope | saescope − SAELens | relative |",
            "|---|---|---|---|---|"]
    for k in ORDER:
        x, y = ref.get(k), ours.get(k)
        diff = None if x is None or y is None else y - x
        rel = None if diff is None or x == 0 else diff / abs(x)
        rows.append(f"| {k} | {_fmt(x)} | {_fmt(y)} | {_fmt(diff)} | {_fmt(rel)} |")
    print("\n".join(rows))
    print(f"tokens counted by saescope: {ours['n_tokens']} of {a.contexts * 128}; SAELens {ref['version']} "
          f"{ref['seconds']:.1f} s, saescope {ours['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
