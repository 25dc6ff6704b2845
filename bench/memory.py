"""Peak resident memory of `saescope precompute` as the token count grows (issue 10: it must stay flat).

Configuration (the issue's): a tiny cheap model, so the forward pass costs little, as on a GPU: a random 2-layer
Llama with d_model 576 (SmolLM2's tokenizer and vocabulary), saved with save_pretrained; a random ReLU
('standard') SAE of 16,384 features on blocks.1.hook_resid_post whose encoder biases are shifted so that L0 ~ 80
(one shared bias; random directions fire alike). Each size runs `python -m saescope.app.cli precompute` as a child
process, started by a small launcher (bench.common.peak_rss: Linux would otherwise count this benchmark's own
memory, copied at fork, in the child's peak); its peak RSS comes from os.wait4 (ru_maxrss: torch, DuckDB, Python).

Usage: python bench/memory.py [--tokens 131072 524288 1048576] [--memory-limit 1GB] [--l0 80]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import peak_rss as peak_rss_of  # noqa: E402

D_MODEL, D_SAE, HOOK = 576, 16_384, "blocks.1.hook_resid_post"


def make_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saescope.precompute.embedded import convert_default_model

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(convert_default_model())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_sae(folder: Path, model: Path, l0: float) -> tuple[Path, float]:
    """A random ReLU SAE whose (shared) encoder bias puts L0 at l0 on calibration tokens."""
    import torch

    from saescope.precompute.data import iter_contexts, iter_texts
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import SAEConfig, load_sae, save_saelens
    from saescope.precompute.saes.standard import StandardSAE

    if not (folder / "cfg.json").exists():
        torch.manual_seed(1)
        sae = StandardSAE(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=D_SAE, hook_name=HOOK,
                                    model_name="tiny-576"))
        lm = load_model(str(model), "cpu", "float32")
        # calibration tokens spread over the first 2,048 contexts of the corpus the runs stream
        ctxs = itertools.islice(iter_contexts(iter_texts("default"), lm.tokenizer, 128, True), 0, 2048, 32)
        ids = np.stack(list(ctxs))  # (64, 128)
        x = lm.activations(torch.from_numpy(ids).long(), HOOK)[:, 1:].reshape(-1, D_MODEL)  # (N, d), BOS dropped
        with torch.no_grad():
            W = torch.randn(D_MODEL, D_SAE) / D_MODEL ** 0.5
            sae.W_enc.copy_(W)
            sae.W_dec.copy_(W.T)
            sae.b_dec.zero_()
            pre = x @ W  # (N, d_sae)
            # the bias shift: one bias for all features (random directions fire alike), bisected so that the
            # calibration tokens' L0 is l0
            lo, hi = -50.0, 0.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if ((pre + mid) > 0).sum(1).float().mean() > l0:
                    hi = mid
                else:
                    lo = mid
            sae.b_enc.fill_(hi)
        save_saelens(sae, folder)
    sae = load_sae(str(folder))
    return folder, float(sae.cfg.d_sae)


def measure_l0(model: Path, sae_dir: Path) -> float:

    from saescope.precompute.data import iter_contexts, iter_texts
    from saescope.precompute.encode import encode_batch
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm = load_model(str(model), "cpu", "float32")
    sae = load_sae(str(sae_dir))
    ids = np.stack(list(itertools.islice(iter_contexts(iter_texts("default"), lm.tokenizer, 128, True), 7, 4096, 41)))
    z = encode_batch(lm, sae, ids, HOOK)
    return float((z[:, 1:] > 0).sum(-1).float().mean())


def token_rows(folder: Path, model: Path, tokens: int) -> Path:
    """Pre-tokenized contexts of 128 tokens, enough for `tokens`: the demo corpus (~496k tokens) and then
    the same contexts again with their tokens after BOS rotated by 1, 2, ... places (new sequences, same
    vocabulary statistics)."""
    import json

    from transformers import AutoTokenizer

    from saescope.precompute.data import iter_dataset_contexts

    out = folder / f"tokens_{tokens}.jsonl"
    if out.exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(model))
    base = list(itertools.islice(iter_dataset_contexts("default", "text", tok, 128, True), tokens // 128))
    with out.open("w") as f:
        for n in range(tokens // 128):
            ctx, r = base[n % len(base)], n // len(base)
            row = [int(ctx[0])] + np.roll(ctx[1:], r).tolist()
            f.write(json.dumps({"tokens": row}) + "\n")
    return out


def peak_rss(model: Path, sae: Path, tokens: int, out: Path, memory_limit: str | None) -> tuple[float, float]:
    rows = token_rows(out.parent, model, tokens)
    cmd = [sys.executable, "-m", "saescope.app.cli", "precompute", "--model", str(model), "--sae", str(sae),
           "--tokens", str(tokens), "--out", str(out), "--dataset", str(rows)]
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    log_path = out.with_suffix(".log")
    rss, secs = peak_rss_of(cmd, log_path, env={**os.environ, "TQDM_DISABLE": "1"})
    err = log_path.read_text()
    for line in err.splitlines():  # precompute logs its peak memory after each phase
        if "peak memory" in line:
            print("    " + line.split(" INFO ")[-1], flush=True)
    return rss, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[131_072, 524_288, 1_048_576])
    ap.add_argument("--memory-limit", default=None, help="passed to precompute (default: its own default)")
    ap.add_argument("--l0", type=float, default=70.0, help="calibration target (held-out L0 comes out ~15%% higher)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the model/SAE here (default: a temp folder)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        model = make_model(work / "tiny576")
        sae, _ = make_sae(work / "relu16k", model, a.l0)
        print(f"model: random 2-layer Llama, d_model {D_MODEL}; SAE: ReLU {D_SAE:,} features at {HOOK}, "
              f"measured L0 {measure_l0(model, sae):.1f}; DuckDB memory limit "
              f"{a.memory_limit or 'default'}", flush=True)
        results = []
        for n in a.tokens:
            out = Path(tmp) / f"m{n}.duckdb"
            rss, secs = peak_rss(model, sae, n, out, a.memory_limit)
            results.append((n, rss))
            print(f"{n:>10,} tokens: peak RSS {rss:7.0f} MB  ({secs:.0f} s end to end)", flush=True)
            out.unlink(missing_ok=True)
        base = results[0][1]
        for n, rss in results[1:]:
            print(f"peak RSS at {n:,} / at {results[0][0]:,} tokens: {rss / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
