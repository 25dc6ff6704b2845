"""A 65,536-feature SAE on a tiny model (issue 10, "Large SAEs"): precompute phase times, and the server time of
cold feature pages with no pre-rendering.

Configuration: bench/memory.py's random 2-layer Llama (d_model 576, SmolLM2's 49,152-token vocabulary) and its
random ReLU SAE with a shifted bias for L0 ~ 70, widened to 65,536 features.

  build    `python -m saescope.app.cli precompute` as a child on --tokens tokens of the default corpus; the phase times
           come from its log lines (timestamps to the second), the co-occurrence and map lines carry their own.
  weights  logit effects and decoder-cosine neighbours of the 65k SAE in this process: the reference
           implementation (the code before issue 10, kept below) against precompute.logits, same run, as ratios;
           the outputs are compared for exact equality.
  serve    cold feature pages (HTML and JSON API) of distinct random features: in-process through the ASGI app
           (no page cache, so every page is rendered) and through a real uvicorn server started with
           `saescope serve --no-prewarm --no-worker`, whose page cache is bypassed by asking each feature once.
           Server time = time.perf_counter() around the ASGI call in process (and the process's CPU time,
           which a busy shared machine does not inflate); over HTTP, the round trip on loopback (an upper bound).
           The load average is printed: on 2 shared cores, wall times scale with it.

  compare  the in-process CPU time of cold pages of this checkout against --baseline DIR (another checkout),
           alternating child processes.

Usage: python bench/large_sae.py [build] [weights] [serve] [compare --baseline DIR] [--workdir /tmp/large_sae]
       [--tokens 65536] [--pages 200] [--features 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import memory
from bench.common import ROOT, free_port, pct, wait_up

D_SAE = 65_536
memory.D_SAE = D_SAE  # make_sae reads the module's width when it builds the SAE


def paths(work: Path) -> tuple[Path, Path, Path]:
    return work / "tiny576", work / "relu65k", work / "sae65k.duckdb"


# ---------------------------------------------------------------- build
PHASES = [  # (phase name, regex of the log line that ENDS it), in the order precompute/pipeline/ logs them
    ("load + stream (forward, encode, work cache)", r"streamed \d+ contexts"),
    ("examples/groups tables (feature ranges)", r"feature ranges built"),
    ("logit effects + neighbours + inserts + co-occurrence", r"co-occurrence: "),
    ("co-occurrence rest", r"co-occurrence of .* done"),
    ("feature map (UMAP)", r"feature map: UMAP of"),
    ("features table + publish", r"stored .* in "),
]


def build(work: Path, tokens: int, l0: float, extra: list[str]) -> Path:
    model, sae_dir, store = paths(work)
    work.mkdir(parents=True, exist_ok=True)
    memory.make_model(model)
    memory.make_sae(sae_dir, model, l0)
    store.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "saescope.app.cli", "precompute", "--model", str(model), "--sae", str(sae_dir),
           "--sae-id", "relu65k", "--tokens", str(tokens), "--out", str(store), "--restart", *extra]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"precompute failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ", ln)]
    for ln in lines:
        print("  | " + ln)
    stamp = lambda ln: dt.datetime.strptime(ln[:8], "%H:%M:%S")
    prev = dt.datetime.strptime(time.strftime("%H:%M:%S", time.localtime(t0)), "%H:%M:%S")
    print(f"precompute of {D_SAE:,} features on {tokens:,} tokens: {total:.0f} s end to end")
    for name, pat in PHASES:
        hit = next((ln for ln in lines if re.search(pat, ln)), None)
        if hit is None:
            print(f"  {name:<55} skipped")
            continue
        end = stamp(hit)
        own = re.search(r"([\d.]+) s in all| in ([\d.]+) s\b", hit)
        extra_s = f" (its own log: {own.group(1) or own.group(2)} s)" if own else ""
        print(f"  {name:<55} {(end - prev).total_seconds():5.0f} s{extra_s}")
        prev = end
    return store


# ---------------------------------------------------------------- weights
def reference_logit_effects(W_dec, W_U, gain, n=10, bins=50, chunk=128):
    """precompute.logits.logit_effects as it was before issue 10 (negate for the bottom, int64 scatter_add)."""
    import torch

    with torch.no_grad():
        d_sae = W_dec.shape[0]
        W = W_dec.float() * (gain.float() if gain is not None else 1.0)
        W_U = W_U.float()
        out = {"pos_ids": np.zeros((d_sae, n), np.int32), "pos_vals": np.zeros((d_sae, n), np.float32),
               "neg_ids": np.zeros((d_sae, n), np.int32), "neg_vals": np.zeros((d_sae, n), np.float32),
               "hist": np.zeros((d_sae, bins), np.int64), "hist_lo": np.zeros(d_sae, np.float32),
               "hist_hi": np.zeros(d_sae, np.float32), "mean": np.zeros(d_sae, np.float32)}
        for s in range(0, d_sae, chunk):
            L = W[s:s + chunk] @ W_U
            top, bot = L.topk(n, dim=-1), (-L).topk(n, dim=-1)
            out["pos_ids"][s:s + chunk], out["pos_vals"][s:s + chunk] = top.indices.numpy(), top.values.numpy()
            out["neg_ids"][s:s + chunk], out["neg_vals"][s:s + chunk] = bot.indices.numpy(), (-bot.values).numpy()
            out["mean"][s:s + chunk] = L.double().mean(dim=-1).float().numpy()
            lo, hi = L.aminmax(dim=-1)
            L.sub_(lo[:, None]).mul_((bins / (hi - lo).clamp_min(1e-12))[:, None]).clamp_(0, bins - 1)
            idx = L.long()
            h = torch.zeros(L.shape[0], bins, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
            out["hist"][s:s + chunk], out["hist_lo"][s:s + chunk], out["hist_hi"][s:s + chunk] = \
                h.numpy(), lo.numpy(), hi.numpy()
        return out


def reference_nearest_features(W_dec, n=10, chunk=1024):
    """precompute.logits.nearest_features as it was before issue 10."""
    import torch

    with torch.no_grad():
        Wn = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        d_sae = Wn.shape[0]
        n = min(n, d_sae - 1)
        ids, sims = np.zeros((d_sae, n), np.int32), np.zeros((d_sae, n), np.float32)
        for s in range(0, d_sae, chunk):
            S = Wn[s:s + chunk] @ Wn.T
            rows = torch.arange(S.shape[0])
            S[rows, rows + s] = -float("inf")
            t = S.topk(n, dim=-1)
            ids[s:s + chunk], sims[s:s + chunk] = t.indices.numpy(), t.values.numpy()
        return ids, sims


def weights(work: Path, n_features: int) -> None:
    import torch

    from saescope.precompute.config import PRECOMPUTE as P
    from saescope.precompute.logits import logit_effects, nearest_features
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    model, sae_dir, _ = paths(work)
    memory.make_model(model)
    memory.make_sae(sae_dir, model, 70.0)
    lm = load_model(str(model), "cpu", "float32")
    W_dec = load_sae(str(sae_dir)).W_dec.detach().cpu()[:n_features]  # the first n_features decoder rows
    W_U, gain = lm.unembedding().cpu(), lm.final_norm_gain()
    print(f"weights of {W_dec.shape[0]:,} features x d {W_dec.shape[1]}, vocabulary {W_U.shape[1]:,}; "
          f"torch threads {torch.get_num_threads()}")

    def timed(fn, *args, **kw):
        t0 = time.perf_counter()
        r = fn(*args, **kw)
        return r, time.perf_counter() - t0

    # the machine is shared: old and new alternate on the same slices, so a load change hits both alike
    t_new = t_ref = 0.0
    same = True
    for s in range(0, len(W_dec), LOGIT_SLICE):
        new, dt_new = timed(logit_effects, W_dec[s:s + LOGIT_SLICE], W_U, gain, n=P.n_logits)
        ref, dt_ref = timed(reference_logit_effects, W_dec[s:s + LOGIT_SLICE], W_U, gain, n=P.n_logits)
        t_new, t_ref = t_new + dt_new, t_ref + dt_ref
        same = same and all(np.array_equal(new[k], ref[k]) for k in ref)
    print(f"logit effects: before {t_ref:.1f} s, now {t_new:.1f} s (x{t_ref / t_new:.2f}); identical: {same}",
          flush=True)
    best_new = best_ref = float("inf")
    for _ in range(2):  # neighbours need every row at once: alternate whole runs, keep each one's best
        (ni, ns), dt = timed(nearest_features, W_dec, n=P.n_neighbours)
        best_new = min(best_new, dt)
        (ri, rs), dt = timed(reference_nearest_features, W_dec, n=P.n_neighbours)
        best_ref = min(best_ref, dt)
    ties = int((ni != ri).any(axis=1).sum())
    print(f"neighbours:    before {best_ref:.1f} s, now {best_new:.1f} s (x{best_ref / best_new:.2f}); similarities "
          f"identical: {np.array_equal(ns, rs)}; ids identical: {ties == 0} ({ties} rows differ only where the "
          f"old topk broke an exact tie arbitrarily)" if ties else
          f"neighbours:    before {best_ref:.1f} s, now {best_new:.1f} s (x{best_ref / best_new:.2f}); identical: "
          f"{np.array_equal(ns, rs) and np.array_equal(ni, ri)}")


LOGIT_SLICE = 4096  # features per alternation of old and new logit effects

# ---------------------------------------------------------------- serve
def _features(n: int, d_sae: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(d_sae), n)


def serve_in_process(store: Path, n: int) -> None:
    import httpx

    from saescope.app.web import lookups
    from saescope.app.web.app import create_app

    app = create_app(store)  # no page cache: every request renders
    if hasattr(lookups, "warm_up"):  # (absent before issue 10: run against an older checkout for the baseline)
        lookups.warm_up(app.state.store)  # what the server's startup runs in a thread (ASGITransport: no lifespan)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
            await c.get("/sae/relu65k/feature/0")  # first request: vocabulary, templates, map payload memo
            for label, fmt, seed in (("feature page", "/sae/relu65k/feature/{}", 1),
                                     ("htmx samples tab", "/sae/relu65k/feature/{}?samples=quantile", 2),
                                     ("JSON API", "/api/saes/relu65k/features/{}", 3)):
                hx = {"HX-Request": "true", "HX-Target": "samples"} if "samples" in fmt else {}
                ms, cpu = [], []
                for i in _features(n, D_SAE, seed):
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = await c.get(fmt.format(i), headers=hx)
                    ms.append(1000 * (time.perf_counter() - t0))
                    cpu.append(1000 * (time.process_time() - c0))
                    assert r.status_code == 200, (fmt.format(i), r.status_code, r.text[:300])
                print(f"  in process, {label:<17} {n} distinct features: wall p50 {pct(ms, .5):5.1f} ms  "
                      f"p95 {pct(ms, .95):5.1f} ms  max {max(ms):5.1f} ms | CPU p50 {pct(cpu, .5):5.1f} ms  "
                      f"p95 {pct(cpu, .95):5.1f} ms  max {max(cpu):5.1f} ms")

    asyncio.run(run())


def serve_uvicorn(store: Path, n: int) -> None:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "saescope.app.cli", "serve", str(store), "--port", str(port), "--no-worker",
           "--no-prewarm"]
    print("  $ " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/", 60)
        print(f"  server up (home page answered) {time.perf_counter() - t0:.1f} s after launch")
        with httpx.Client(base_url=base, timeout=30) as c:
            t0 = time.perf_counter()
            c.get("/sae/relu65k/feature/0")
            print(f"  first feature page right after startup (indexes may still be loading): "
                  f"{1000 * (time.perf_counter() - t0):.0f} ms")
            time.sleep(2)  # the startup's index loading (about a second) is over
            for label, fmt, seed in (("feature page", "/sae/relu65k/feature/{}", 4),
                                     ("JSON API", "/api/saes/relu65k/features/{}", 5)):
                ms = []
                for i in _features(n, D_SAE, seed):
                    t0 = time.perf_counter()
                    r = c.get(fmt.format(i))
                    ms.append(1000 * (time.perf_counter() - t0))
                    assert r.status_code == 200 and r.headers.get("x-cache") != "hit", (fmt.format(i), r.status_code)
                print(f"  uvicorn round trip, {label:<12} {n} cold features: p50 {pct(ms, .5):5.1f} ms  "
                      f"p95 {pct(ms, .95):5.1f} ms  max {max(ms):5.1f} ms")
            print(f"  page cache: {c.get('/_cache').json()}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


COMPARE_CHILD = """
import asyncio, os, random, sys, time
root, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, root)
import httpx
from saescope.app.web import lookups
from saescope.app.web.app import create_app
app = create_app(sys.argv[4])
if hasattr(lookups, "warm_up"):
    lookups.warm_up(app.state.store)
async def run():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        await c.get("/sae/relu65k/feature/0")
        await c.get("/api/saes/relu65k/features/0")
        for fmt in ("/sae/relu65k/feature/{}", "/api/saes/relu65k/features/{}"):
            for i in random.Random(seed).sample(range(1, 65536), n):
                c0 = time.process_time()
                assert (await c.get(fmt.format(i))).status_code == 200
                print(fmt.split("/")[1], 1000 * (time.process_time() - c0))
asyncio.run(run())
"""


def compare(store: Path, baseline: Path, n: int, rounds: int = 3) -> None:
    """CPU time of cold pages, this checkout against `baseline` (another checkout, e.g. `git archive HEAD`),
    in alternating child processes so that the shared machine's load hits both alike."""
    cpu: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for label, root in (("baseline", baseline), ("this", ROOT)):
            out = subprocess.run([sys.executable, "-c", COMPARE_CHILD, str(root), str(r), str(n), str(store)],
                                 capture_output=True, text=True, check=True, cwd=root).stdout
            for line in out.splitlines():
                kind, ms = line.split()
                cpu.setdefault((label, kind), []).append(float(ms))
    for kind, name in (("sae", "feature page"), ("api", "JSON API")):
        b, t = cpu[("baseline", kind)], cpu[("this", kind)]
        print(f"  CPU per cold {name:<12} ({len(t)} cold requests, fresh processes): baseline p50 {pct(b, .5):5.1f} "
              f"p95 {pct(b, .95):5.1f} max {max(b):5.1f} ms; this p50 {pct(t, .5):5.1f} p95 {pct(t, .95):5.1f} "
              f"max {max(t):5.1f} ms; p50 ratio x{pct(b, .5) / pct(t, .5):.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="*", default=["build", "weights", "serve"],
                    choices=["build", "weights", "serve", "compare"])
    ap.add_argument("--baseline", type=Path, help="compare step: another checkout (git archive HEAD | tar -x -C DIR)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/large_sae"), help="model, SAE and store live here")
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--l0", type=float, default=70.0)
    ap.add_argument("--features", type=int, default=D_SAE,
                    help="weights step: time the first N decoder rows only (neighbours cost ~N^2)")
    ap.add_argument("--pages", type=int, default=200, help="distinct cold features measured per kind of page")
    ap.add_argument("--precompute-args", default="", help="extra precompute flags, e.g. '--no-cooccurrence'")
    a = ap.parse_args()
    store = paths(a.workdir)[2]
    if "build" in a.steps:
        build(a.workdir, a.tokens, a.l0, a.precompute_args.split())
    if "weights" in a.steps:
        weights(a.workdir, a.features)
    if "serve" in a.steps:
        print(f"cold pages of {store} ({D_SAE:,} features); load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores:")
        serve_in_process(store, a.pages)
        serve_uvicorn(store, a.pages)
    if "compare" in a.steps:
        if a.baseline is None:
            ap.error("the compare step needs --baseline DIR (an older checkout to measure against)")
        print(f"cold pages, this checkout against {a.baseline}; load average {os.getloadavg()[0]:.1f}:")
        compare(store, a.baseline, a.pages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
