"""Exact co-occurrence (precompute/cooccur.py): peak memory and wall time, the chunked path vs the old one.

Synthetic activations: every token draws L0 features from a skewed distribution (feature f with density ~
f^(-1/3), ids shuffled, so a few features are dense and most are rare; repeated draws count once). Each
configuration runs in a child process (`--child`); its peak RSS comes from os.wait4 (ru_maxrss).

  new   cooccurrence_from_chunks: read(t0, t1) generates the chunk's activations on the fly (as a DuckDB scan would)
  old   the previous implementation (the parent's `git show HEAD~N:precompute/cooccur.py`, see --old-rev), fed all
        activations at once, as precompute did
  gen   only generates all activations into memory (the old path's floor: its input arrays)
  base  imports numpy + scipy and the module, nothing else (every child's floor)

Usage:
  python bench/cooccur.py memory [--d-sae 16384] [--tokens 131072 1048576] [--l0 80] [--old-rev f0c7d45]
  python bench/cooccur.py large [--d-sae 65536] [--tokens 262144] [--l0 64] [--old]
  (--modes new old gen base picks the children; --check verifies the new result on 16 features directly;
   --block-mb, --chunk-tokens set the new path's budgets)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT

GEN_TOKENS = 8192  # tokens generated per seed (the data do not depend on how they are read; small, so that the
# generator's temporaries stay small next to what it returns)


def generate(t0: int, t1: int, d_sae: int, l0: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations of tokens [t0, t1): (token_index int64, feature int32), with repeats (they count once)."""
    perm = np.random.default_rng(seed).permutation(d_sae).astype(np.int32)
    tok = np.repeat(np.arange(t0, max(t0, t1), dtype=np.int64), l0)  # (tokens * l0,)
    feat = np.empty(tok.size, dtype=np.int32)
    for g in range(t0 // GEN_TOKENS, (t1 - 1) // GEN_TOKENS + 1 if t1 > t0 else 0):
        g0 = g * GEN_TOKENS
        u = np.random.default_rng([seed, g]).random((GEN_TOKENS, l0))  # (GEN_TOKENS, l0)
        lo, hi = max(t0, g0) - g0, min(t1, g0 + GEN_TOKENS) - g0
        feat[(g0 + lo - t0) * l0:(g0 + hi - t0) * l0] = perm[(d_sae * u[lo:hi] ** 1.5).astype(np.int64)].ravel()
    return tok, feat


def child(mode: str, d_sae: int, tokens: int, l0: int, old_module: str | None, out: str, opts: dict) -> None:
    import importlib.util

    import scipy.sparse  # noqa: F401

    from saescope.precompute.cooccur import cooccurrence_from_chunks

    t = time.perf_counter()
    res = None
    if mode == "new":
        with tempfile.TemporaryDirectory() as tmp:
            res = cooccurrence_from_chunks(lambda a, b: generate(a, b, d_sae, l0), tokens, d_sae, n=10,
                                           temp_dir=Path(tmp), **opts)
    elif mode in ("old", "gen"):
        tok, feat = generate(0, tokens, d_sae, l0)
        if mode == "old":
            spec = importlib.util.spec_from_file_location("cooccur_old", old_module)
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)
            res = old.cooccurrence(tok, feat, d_sae, n=10)
    if res is not None:
        np.savez(out, ids=res.ids, jaccard=res.jaccard, counts=res.counts)
    print(json.dumps({"seconds": time.perf_counter() - t}))


def run_child(mode: str, d_sae: int, tokens: int, l0: int, old_module: str | None, out: Path, opts: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--d-sae", str(d_sae), "--tokens", str(tokens), "--l0", str(l0),
           "--out", str(out), *opts] + (["--old-module", old_module] if old_module else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed")
    return {"mode": mode, "peak_mb": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime,
            **json.loads(stdout.strip().splitlines()[-1])}


def old_source(rev: str, folder: Path) -> str:
    src = subprocess.run(["git", "show", f"{rev}:precompute/cooccur.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    p = folder / "cooccur_old.py"
    p.write_text(src)
    return str(p)


def check_sample(path: Path, d_sae: int, tokens: int, l0: int, k: int = 16) -> str:
    """The new result on k features (the densest among them) against a direct computation: the rows of X at each
    feature's tokens summed (scipy), Jaccard, and the ranking rule by lexsort."""
    import scipy.sparse as sp

    got = np.load(path)
    n = got["ids"].shape[1]
    tok, feat = generate(0, tokens, d_sae, l0)
    x = sp.csr_matrix((np.ones(tok.size, np.int32), (tok, feat)), shape=(tokens, d_sae))
    del tok, feat
    x.sum_duplicates()
    x.data[:] = 1
    xc = x.tocsc()
    n_active = np.diff(xc.indptr)
    sample = [int(n_active.argmax()), *np.random.default_rng(1).choice(d_sae, k - 1, replace=False).tolist()]
    for a in sample:
        c = np.asarray(x[xc.indices[xc.indptr[a]:xc.indptr[a + 1]]].sum(axis=0)).ravel()  # (d_sae,) |A ∩ B|
        jac = c / np.maximum(n_active[a] + n_active - c, 1)
        cand = np.flatnonzero((c > 0) & (np.arange(d_sae) != a))
        top = cand[np.lexsort((cand, -jac[cand]))][:n]
        m = top.size
        if not (np.array_equal(got["ids"][a, :m], top) and (got["ids"][a, m:] == -1).all()
                and np.array_equal(got["counts"][a, :m], c[top])
                and np.array_equal(got["jaccard"][a, :m], jac[top].astype(np.float32))):
            return f"MISMATCH at feature {a}"
    return f"{k} features (densest: {n_active.max():,} tokens) equal a direct computation"


def same(a: Path, b: Path) -> bool:
    x, y = np.load(a), np.load(b)
    return all(np.array_equal(x[k], y[k]) for k in ("ids", "jaccard", "counts"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", choices=["memory", "large"], default="memory")
    ap.add_argument("--child", choices=["new", "old", "gen", "base"])
    ap.add_argument("--d-sae", type=int)
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--l0", type=int)
    ap.add_argument("--old-rev", default="f0c7d45", help="git revision holding the previous cooccur.py")
    ap.add_argument("--old", action="store_true", help="large: also run the old path (slow)")
    ap.add_argument("--modes", nargs="+", choices=["new", "old", "gen", "base"], help="which children to run")
    ap.add_argument("--check", action="store_true", help="check the new result on 16 features, computed directly")
    ap.add_argument("--block-mb", type=int, help="new: block_bytes in MiB (default: the module's BLOCK_BYTES)")
    ap.add_argument("--chunk-tokens", type=int, help="new: tokens per read (default: the module's CHUNK_TOKENS)")
    ap.add_argument("--old-module")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        opts = ({"block_bytes": a.block_mb * 2**20} if a.block_mb else {}) | (
            {"chunk_tokens": a.chunk_tokens} if a.chunk_tokens else {})
        child(a.child, a.d_sae, a.tokens[0], a.l0, a.old_module, a.out, opts)
        return
    large = a.what == "large"
    d_sae = a.d_sae or (65_536 if large else 16_384)
    sizes = a.tokens or ([262_144] if large else [131_072, 1_048_576])
    l0 = a.l0 or (64 if large else 80)
    modes = a.modes or ["new"] + (["old"] if (a.old or not large) else []) + ([] if large else ["gen", "base"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old = old_source(a.old_rev, folder)
        print(f"d_sae {d_sae}, L0 {l0} (before repeats collapse), {os.cpu_count()} cores")
        for tokens in sizes:
            opts = (["--block-mb", str(a.block_mb)] if a.block_mb else []) + (
                ["--chunk-tokens", str(a.chunk_tokens)] if a.chunk_tokens else [])
            rows = {m: run_child(m, d_sae, tokens, l0, old, folder / f"{m}.npz", opts) for m in modes}
            for m, r in rows.items():
                print(f"  {tokens:>9,} tokens  {m:<4}  peak RSS {r['peak_mb']:8.0f} MB   wall {r['seconds']:7.1f} s"
                      f"   CPU {r['cpu']:7.1f} s")
            if a.check and "new" in rows:
                print(f"  {tokens:>9,} tokens  new: {check_sample(folder / 'new.npz', d_sae, tokens, l0)}")
            if "old" in rows and "new" in rows:
                n, o = rows["new"], rows["old"]
                print(f"  {tokens:>9,} tokens  new/old: peak RSS x{n['peak_mb'] / o['peak_mb']:.2f}, "
                      f"wall x{n['seconds'] / o['seconds']:.2f}, CPU x{n['cpu'] / o['cpu']:.2f}; identical results: "
                      f"{same(folder / 'new.npz', folder / 'old.npz')}")


if __name__ == "__main__":
    main()
