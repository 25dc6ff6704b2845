"""The suite's shared references and utilities, written once: the dense TopK brute force, the Jaccard brute force,
the table dump that compares stores, and the one way to start and stop a subprocess.

Fixtures live in tests/conftest.py (make_store, two_sae_store, tiny_worker, browser, ...); these are plain
functions that any test module imports (`from tests.helpers import dense_reference`).
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# the per-SAE tables one SAE's rows live in (sae_id dropped when one SAE is dumped)
SAE_TABLES = ("features", "examples", "groups", "contexts", "explanations")


# ------------------------------------------------------------------------------------------ dense reference
@functools.lru_cache(maxsize=4)
def dense_reference(lm_dir: str, sae_dir: str, corpus: str, tokens: int, context_len: int) -> dict:
    """Dense float32 activations of every feature of a TopK SAE on every token of the first tokens // context_len
    contexts of `corpus`, computed without the precompute code path: transformers' hidden_states and the TopK
    formula written here (resid_post of layer 1 = hidden_states[2]). Special tokens are zeroed in "A".

    Returns ctxs (n_ctx, T), A (n_ctx, T, F) float32, pre (the pre-activations, torch float32), kth (the k-th
    largest pre-activation of every token, float64), special (mask), and the model, SAE and tokenizer used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saescope.precompute.data import iter_contexts, iter_texts
    from saescope.precompute.saes import load_sae

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    sae = load_sae(sae_dir)
    n_ctx = tokens // context_len
    ctxs = np.stack(list(itertools.islice(iter_contexts(iter_texts(corpus), tok, context_len, True), n_ctx)))
    with torch.no_grad():
        hs = model(torch.from_numpy(ctxs).long(), output_hidden_states=True).hidden_states[2]  # resid_post of layer 1
        pre = (hs - sae.b_dec) @ sae.W_enc + sae.b_enc  # (n_ctx, T, F)
        top = pre.topk(sae.cfg.k, dim=-1)
        A = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values)).numpy()  # (n_ctx, T, F)
        kth = top.values[..., -1].double().numpy()
    special = np.isin(ctxs, tok.all_special_ids)
    A[special] = 0
    return {"ctxs": ctxs, "A": A, "pre": pre, "kth": kth, "special": special, "model": model, "sae": sae, "tok": tok}


# ------------------------------------------------------------------------------------------ Jaccard reference
def jaccard_reference(tok: np.ndarray, feat: np.ndarray, d_sae: int, n: int, which=None) -> dict[int, list[tuple]]:
    """feature -> its top-n (-Jaccard, partner, |A ∩ B|) over the token sets each feature is active on, best first
    (Jaccard descending, then the lower index), from Python sets."""
    sets = [set(tok[feat == a].tolist()) for a in range(d_sae)]
    out = {}
    for a in range(d_sae) if which is None else which:
        cands = [(-len(sets[a] & sets[b]) / len(sets[a] | sets[b]), b, len(sets[a] & sets[b]))
                 for b in range(d_sae) if b != a and sets[a] & sets[b]]
        out[a] = sorted(cands)[:n]
    return out


# ------------------------------------------------------------------------------------------ table dump
_UNTIMED = {"quality": "EXCLUDE (seconds, created)"}  # when and how long, not what: differs between equal runs


def dump_tables(path: Path, sae_id: str | None = None, tables: tuple[str, ...] | None = None) -> dict[str, list]:
    """Every row of every table of a store (or of `tables`), sorted, and the saes (and quality) rows without their
    build times.

    With `sae_id`: only that SAE's rows of the per-SAE tables (default SAE_TABLES), with the sae_id column
    dropped, so that the same SAE can be compared between a one-SAE and a many-SAE store."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        if sae_id is None:
            names = tables or tuple(r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_name <> 'saes' ORDER BY 1").fetchall())
            out = {t: sorted(con.execute(f"SELECT * {_UNTIMED.get(t, '')} FROM {t}").fetchall(), key=repr) for t in names}
            out["saes"] = con.execute("SELECT * EXCLUDE (created) FROM saes ORDER BY sae_id").fetchall()
        else:
            out = {t: sorted(con.execute(f"SELECT * EXCLUDE (sae_id) FROM {t} WHERE sae_id = ?", [sae_id]).fetchall(),
                             key=repr) for t in tables or SAE_TABLES}
            out["saes"] = con.execute("SELECT * EXCLUDE (sae_id, created) FROM saes WHERE sae_id = ?",
                                      [sae_id]).fetchall()
        return out
    finally:
        con.close()


# ------------------------------------------------------------------------------------------ damaged stores
def damaged_copies(src: Path, out: Path) -> dict[str, Path]:
    """Three damaged copies of a store in `out`: truncated to 50% and 80%, and 64 kB of noise written mid-file."""
    data = src.read_bytes()
    made = {}
    for share in (0.5, 0.8):
        p = out / f"truncated{int(share * 100)}.duckdb"
        p.write_bytes(data[: int(len(data) * share)])
        made[p.stem] = p
    mid = len(data) // 2
    junk = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    p = out / "corrupt.duckdb"
    p.write_bytes(data[:mid] + junk + data[mid + len(junk):])
    made[p.stem] = p
    return made


# ------------------------------------------------------------------------------------------ processes
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
                  "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}


def wait_for(check, seconds: float, what: str, every: float = 0.2):
    """Poll `check()` until it returns something truthy; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"gave up after {seconds:.0f} s waiting for {what}")


def answers(url: str, headers: dict | None = None) -> bool:
    """True when `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=1.0, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False


def start_process(cmd: list[str], *, ready: str | list[str] | None = None, timeout: float = 120.0,
                  headers: dict | None = None, **popen) -> subprocess.Popen:
    """Start `cmd` in its own session (so stop_process reaches its children too); with `ready`, wait until every
    URL in it answers 200, failing with the process's stderr (when piped) if it exits first or never answers.
    Other keyword arguments go to Popen (stdout=..., stderr=..., env=..., cwd=...)."""
    popen.setdefault("start_new_session", True)
    if "stderr" not in popen:
        popen["stderr"] = subprocess.PIPE
    if popen["stderr"] is subprocess.PIPE:
        popen.setdefault("text", True)
    proc = subprocess.Popen(cmd, **popen)
    urls = [ready] if isinstance(ready, str) else list(ready or [])
    if not urls:
        return proc
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if popen["stderr"] is subprocess.PIPE else ""
            raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} exited with {proc.returncode}: {err}")
        if all(answers(u, headers) for u in urls):
            return proc
        time.sleep(0.2)
    stop_process(proc, grace_s=0)
    raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} did not answer {urls} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process started by start_process (its own session) and its children: SIGTERM, then SIGKILL if it
    lingers past `grace_s` (grace_s=0: SIGKILL at once). A process that already exited is only reaped."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        proc.wait(grace_s or None)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def worker_cmd(store: Path, port: int, *extra: str) -> list[str]:
    """The `saescope worker` command on a store, on a loopback port."""
    return [sys.executable, "-m", "saescope.app.cli", "worker", "--store", str(store), "--port", str(port), *extra]
