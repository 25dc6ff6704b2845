"""bf16 precompute: the same small store built with the model in float32 and in bfloat16 (the SAE in float32).

The bound (precompute/verify.py), M = the SAE's largest float32 activation on the data: where both are active,
every stored bf16 activation is within TAU x M of float32; where one side is zero, either within TAU x M or a
TopK selection change (the feature's float32 pre-activation within 2 x TAU x M of the token's k-th largest), and
those are at most CHANGES of the active positions. Checked against a dense float32 brute force that does not use
the precompute path.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from saescope.precompute.config import PRECOMPUTE
from saescope.precompute.store import Store
from tests.conftest import TINY_ARGS
from tests.helpers import dense_reference

TAU, CHANGES = PRECOMPUTE.verify_bound_bf16, PRECOMPUTE.verify_changes_bf16
ARGS = {**TINY_ARGS, "feature_map": False, "cooccurrence": False}
T = ARGS["context_len"]
KINDS = ("top", "interval", "quantile")


@pytest.fixture(scope="module")
def stores(make_store) -> dict[str, Path]:
    return {dtype: make_store(device="cpu", dtype=dtype, **ARGS) for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def ref(tiny_lm_dir, tiny_sae_dir, small_corpus) -> dict:
    """Dense float32 activations of every feature on every token (hidden_states + the TopK formula by hand, in
    tests/helpers.py), in float64 for the comparisons here."""
    d = dense_reference(str(tiny_lm_dir), str(tiny_sae_dir), str(small_corpus), ARGS["tokens"], T)
    A = d["A"].astype(np.float64)
    return {"A": A, "pre": d["pre"].double().numpy(), "kth": d["kth"], "ctxs": d["ctxs"], "M": float(A.max())}


def _selection_changes(got: np.ndarray, want: np.ndarray, M: float) -> np.ndarray:
    """Positions where exactly one side is zero and the other beyond TAU x M."""
    return ((got == 0) != (want == 0)) & (np.abs(got - want) > TAU * M)


def _examples(path: Path) -> dict[str, dict[int, list]]:
    with Store(path) as s:
        d_sae = s.sae("tiny").d_sae
        return {kind: {f: s.examples("tiny", f, kind) for f in range(d_sae)} for kind in KINDS}


def _rows(path: Path) -> dict:
    with Store(path) as s:
        return {r.index: r for r in s.features("tiny", limit=10_000)}


# ------------------------------------------------------------------ auto dtype


def test_auto_is_bf16_on_cuda_and_on_native_bf16_cpus_only_when_asked(monkeypatch):
    from saescope.precompute.models import (
        CPU_BF16_ENV,
        cpu_has_native_bf16,
        dtype_name,
        resolve_dtype,
    )

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    plain = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    bf16 = plain.replace("avx512f", "avx512f avx512_bf16")
    assert resolve_dtype("auto", "cpu", bf16) == torch.float32  # the default: fp32 on every CPU
    assert resolve_dtype("auto", "cuda", plain) == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "auto")
    assert resolve_dtype("auto", "cpu", plain) == torch.float32
    assert resolve_dtype("auto", "cpu", plain.replace("avx512f", "avx512f avx512_bf16")) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", plain.replace("avx2", "avx2 amx_bf16 amx_tile")) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", "Features\t: fp asimd bf16\n") == torch.float32  # no x86 flag: float32
    assert resolve_dtype("auto", "cuda", plain) == torch.bfloat16 and resolve_dtype("auto", "mps") == torch.float32
    assert resolve_dtype("float32", "cuda") == torch.float32 and resolve_dtype("bfloat16", "cpu", plain) == torch.bfloat16
    # this machine: the flags line of /proc/cpuinfo read independently
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = bool(re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", text, re.MULTILINE))
    assert cpu_has_native_bf16() == native
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_dtype("auto", "cpu", plain.replace("avx2", "avx2 avx512_bf16")) == torch.float32
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_dtype("auto", "cpu", plain) == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="valid: auto .* 0 .* 1"):
        resolve_dtype("auto", "cpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid: auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")
    assert dtype_name(torch.bfloat16) == dtype_name("torch.bfloat16") == "bfloat16"


# ------------------------------------------------------------------ the bf16 store against float32


def test_each_store_records_its_dtype_and_fp32_matches_brute_force(stores, ref):
    for dtype, path in stores.items():
        with Store(path) as s:
            assert s.sae("tiny").params["dtype"] == f"torch.{dtype}"
    ex = _examples(stores["float32"])
    worst = max(np.abs(np.asarray(e.acts) - ref["A"][e.ctx_id, :, f]).max()
                for kind in KINDS for f, es in ex[kind].items() for e in es)
    assert worst <= 1e-5 * ref["M"]


def test_every_stored_bf16_activation_is_within_the_bound(stores, ref):
    """Per-token lists and example values of every example (top, interval, quantile) against float32."""
    A, M = ref["A"], ref["M"]
    ex = _examples(stores["bfloat16"])
    worst_both = 0.0
    changes = n = 0
    for kind in KINDS:
        for f, es in ex[kind].items():
            for e in es:
                got, want = np.asarray(e.acts, dtype=np.float64), A[e.ctx_id, :, f]
                assert e.token_ids == ref["ctxs"][e.ctx_id].tolist()
                both = (got != 0) & (want != 0)
                worst_both = max(worst_both, np.abs(got - want)[both].max(initial=0))
                changed = _selection_changes(got, want, M)
                for t in np.nonzero(changed)[0]:  # each one is explained by the float32 TopK boundary
                    margin = abs(ref["pre"][e.ctx_id, t, f] - ref["kth"][e.ctx_id, t])
                    assert margin <= 2 * TAU * M, f"feature {f}, context {e.ctx_id}, position {t}: {margin / M:.3f} M"
                assert np.abs(got - want)[~changed].max() <= TAU * M
                changes += int(changed.sum())
                n += int(((got != 0) | (want != 0)).sum())
                assert abs(e.value - got[e.pos]) <= 1e-6 * M  # the example's value is its own list's
                assert abs(e.value - want[e.pos]) <= TAU * M or changed[e.pos]
    assert n > 1000 and worst_both <= TAU * M
    assert worst_both > 1e-3 * M  # bf16 did change the values: the checks above are not vacuous
    assert changes <= CHANGES * n, f"{changes} selection changes in {n} active positions"


def test_max_and_mean_act_within_the_bound(stores, ref):
    A, M = ref["A"], ref["M"]
    flat = A.reshape(-1, A.shape[-1])
    rows = _rows(stores["bfloat16"])
    for f, r in rows.items():
        v = flat[:, f][flat[:, f] > 0]
        assert abs(r.max_act - (v.max() if len(v) else 0.0)) <= TAU * M, f"feature {f}"
        assert abs(r.mean_act - (v.mean() if len(v) else 0.0)) <= TAU * M, f"feature {f}"


def test_top_examples_keep_their_order_except_near_ties(stores, ref):
    """The bf16 top list is a float32 ranking where values closer than 2 x TAU x M may swap (each moves by at most
    TAU x M): no float32 gap wider than that is ever inverted, and nothing left out beats the last one by more."""
    A, M = ref["A"], ref["M"]
    tie = 2 * TAU * M
    k = ARGS["top_k"]
    tops16, tops32 = _examples(stores["bfloat16"])["top"], _examples(stores["float32"])["top"]
    same = 0
    for f, es in tops16.items():
        m32 = A[:, :, f].max(1)  # float32 max of feature f in every context
        got = [e.ctx_id for e in es]
        assert len(set(got)) == len(got)
        for i, j in itertools.combinations(range(len(got)), 2):
            assert m32[got[i]] >= m32[got[j]] - tie, f"feature {f}: {got}"
        cut = m32[got[-1]] if len(got) == k else 0.0
        left_out = [c for c in range(len(m32)) if c not in got and m32[c] > 0]
        assert all(m32[c] <= cut + tie for c in left_out), f"feature {f}"
        same += got == [e.ctx_id for e in tops32[f]]
    assert same >= 0.75 * len(tops16)  # most lists are identical outright (84 of 96 when measured)


def test_dead_and_alive_agree_except_below_the_bound(stores, ref):
    A, M = ref["A"], ref["M"]
    m32 = A.reshape(-1, A.shape[-1]).max(0)
    rows = _rows(stores["bfloat16"])
    alive16 = np.array([rows[f].n_active > 0 for f in range(len(m32))])
    changed = np.nonzero(alive16 != (m32 > 0))[0]
    assert all(m32[f] <= TAU * M for f in changed), [(int(f), m32[f] / M) for f in changed]
    assert (m32 > TAU * M).sum() > 10  # most features are above the bound and must keep their state


# ------------------------------------------------------------------ verify holds each store to its dtype's bound


def test_precompute_verified_the_bf16_store_against_the_bf16_bound(stores, ref):
    """The check precompute ran while building (a StoreBuilder, not a Store) read the dtype too."""
    with Store(stores["bfloat16"]) as s:
        v = s.sae("tiny").verify
        stored = s.stored_activations("tiny", v["ctx_ids"])
    assert v["ok"] and v["dtype"] == "bfloat16" and v["metric"] == "max_peak_diff" and v["tolerance"] == TAU
    assert v["bound"].startswith("bfloat16 bound: |stored - fp32| <= 0.125 x the SAE's largest fp32 activation")
    # its numbers, recomputed from the brute force: max |stored - fp32| where both are active, over the largest fp32
    # activation on those contexts; and the one-sided positions beyond the bound among all compared positions
    A = ref["A"]
    peak = A[v["ctx_ids"]].max()
    worst, changes, n = 0.0, 0, 0
    for c, (_, feats) in stored.items():
        for f, (pos, val) in feats.items():
            got = np.zeros(T)
            got[pos] = val
            want = A[c, :, f]
            both = (got != 0) & (want != 0)
            worst = max(worst, np.abs(got - want)[both].max(initial=0))
            changes += int((((got == 0) != (want == 0)) & (np.abs(got - want) > TAU * peak)).sum())
            n += int(((got != 0) | (want != 0)).sum())
    assert v["sae_peak"] == pytest.approx(peak, rel=1e-5)
    assert v["max_peak_diff"] == pytest.approx(worst / peak, rel=1e-3) and v["max_peak_diff"] > 1e-4
    assert (v["mismatches"], v["positions"]) == (changes, n) and v["mismatch_share"] <= CHANGES
    with Store(stores["float32"]) as s:
        v32 = s.sae("tiny").verify
    assert v32["ok"] and v32["dtype"] == "float32" and v32["bound"].startswith("float32 bound: relative difference")


def test_verify_cli_passes_bf16_with_its_bound_and_fails_it_with_float32(stores, capsys):
    from saescope.app.cli import main
    from saescope.precompute.verify import verify_store

    assert main(["verify", str(stores["bfloat16"]), "--sample", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: ok:") and "checked against the bfloat16 bound" in out
    assert main(["verify", str(stores["bfloat16"]), "--sample", "8", "--bound", "float32"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("tiny: FAILED:") and "checked against the float32 bound: relative difference <= 0.0001" in out
    r = verify_store(stores["bfloat16"], "tiny", sample=8, dtype="float32")["tiny"]
    assert not r["ok"] and r["max_rel_diff"] > PRECOMPUTE.verify_tolerance
    assert r["command"].endswith("--sae tiny --sample 8 --seed 0 --bound float32")
    assert not verify_store(stores["bfloat16"], "tiny", sample=8, tolerance=1e-4)["tiny"]["ok"]
    with pytest.raises(ValueError, match="--bound 'int8': unknown dtype; valid: float32, bfloat16, float16"):
        verify_store(stores["bfloat16"], "tiny", dtype="int8")


def test_home_page_badge_names_the_bf16_bound(stores):
    import html

    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app

    with Store(stores["bfloat16"]) as s:
        v = s.sae("tiny").verify
    page = TestClient(create_app(stores["bfloat16"], worker_url=None)).get("/")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert f"verified (bfloat16): max diff {v['max_peak_diff']:.0e} of the SAE's peak on 8 contexts" in text
    assert v["bound"] in text and "max rel. diff" not in text


def test_worker_on_auto_runs_the_model_in_the_stores_dtype(stores, monkeypatch):
    """Live activations must match the stored ones: `saescope worker --store S` (auto) follows S's dtype."""
    from saescope.app.cli import build_parser
    from saescope.app.worker.engine import engine_from_args, store_dtype
    from saescope.precompute.models import CPU_BF16_ENV

    assert store_dtype(stores["bfloat16"]) == "bfloat16" and store_dtype(stores["float32"]) == "float32"
    for env in ("0", "1"):  # whatever auto would pick on this CPU
        monkeypatch.setenv(CPU_BF16_ENV, env)
        for dtype, path in stores.items():
            args = build_parser().parse_args(["worker", "--store", str(path), "--device", "cpu"])
            assert args.dtype == "auto" and engine_from_args(args).lm.dtype == getattr(torch, dtype)
    args = build_parser().parse_args(["worker", "--store", str(stores["bfloat16"]), "--dtype", "float32"])
    assert engine_from_args(args).lm.dtype == torch.float32  # an explicit --dtype still wins
