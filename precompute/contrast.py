"""Contrast: which SAE features separate two sets of texts, and how well k of them read the concept.

Per text, a feature's activation is reduced over the text's counted positions (special tokens and padding
excluded) to its max (default, for ranking) or mean (SAEBench's pooling, for probing). Then per feature:

    AUROC       P(score_A > score_B) + P(tie)/2, by the rank formula (U = R_A - n_A (n_A + 1) / 2, ranks over the
                pooled scores with ties given their average rank; AUROC = U / (n_A n_B)). 1: A always higher.
    mean_a, mean_b, diff = mean_a - mean_b

Features are listed twice: those higher on A (AUROC descending, then diff) and those higher on B.

Sparse probing (SAEBench, evals/sparse_probing): a seeded stratified train/test split; on the train split the k
features with the largest |mean_A - mean_B| (get_top_k_mean_diff_mask), a scikit-learn LogisticRegression on them
(standardised), test accuracy for each k; the same on the dense hook activations (mean-pooled) as the ceiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import bos_id, special_mask
from .errors import UserError
from .models import HookedLM
from .saes import SAE

PROBE_KS = (1, 2, 5, 20)
REDUCTIONS = ("max", "mean")


@dataclass
class TextActs:
    """Per-text reduced activations: features (n, d_sae) by max and by mean, dense hook activations (n, d_in) mean."""

    max: np.ndarray
    mean: np.ndarray
    dense: np.ndarray
    n_tokens: np.ndarray  # (n,) counted positions per text
    token_ids: list[list[int]] = field(default_factory=list)
    # per text, its nonzero activations (positions, features, values), kept while they fit KEEP_NONZEROS: the
    # per-token values of the texts a contrast lists, without a second forward pass; None where not kept
    nonzeros: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = field(default_factory=list)


KEEP_NONZEROS = 16_000_000  # nonzero (token, feature) activations text_activations keeps (~200 MB)


def tokenize(lm: HookedLM, texts: Sequence[str], prepend_bos: bool, max_tokens: int, side: str = "") -> list[list[int]]:
    """Each text's token ids (BOS first when prepend_bos); a text over max_tokens or without tokens is a UserError
    naming it (`side`: "A" or "B", for the message) and the limit."""
    out = []
    bos = bos_id(lm.tokenizer) if prepend_bos else None
    what = f"text {{}} of {side}" if side else "text {}"
    for i, t in enumerate(texts):
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = ([bos] if bos is not None else []) + list(ids)
        if len(ids) > max_tokens:
            raise UserError(f"{what.format(i + 1)} has {len(ids)} tokens; the limit is {max_tokens} tokens per text"
                            + (" (BOS included)" if bos is not None else ""))
        if not ids:
            raise UserError(f"{what.format(i + 1)} is empty")
        out.append(ids)
    return out


def _batches(ids: list[list[int]], batch_size: int, pad: int):
    """Texts in batches of similar length (little padding): (their indices, padded ids (B, T), valid mask)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for b0 in range(0, len(ids), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(ids[i]) for i in idx)
        batch = np.full((len(idx), T), pad, dtype=np.int64)
        valid = np.zeros((len(idx), T), dtype=bool)
        for r, i in enumerate(idx):
            batch[r, :len(ids[i])] = ids[i]
            valid[r, :len(ids[i])] = True
        yield idx, batch, valid


def _pad_id(lm: HookedLM) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def text_activations(lm: HookedLM, sae: SAE, hook: str, texts: Sequence[str], prepend_bos: bool = True,
                     max_tokens: int = 512, batch_size: int = 8, side: str = "",
                     progress: Callable[[int], None] | None = None) -> TextActs:
    """Every text's per-feature max and mean activation over its counted tokens, and its mean hook activation.
    `progress(n)` is called after each batch with the number of texts it held."""
    ids = tokenize(lm, texts, prepend_bos, max_tokens, side)
    n, d_sae, d_in = len(ids), sae.cfg.d_sae, sae.cfg.d_in
    mx, mn = np.zeros((n, d_sae), np.float32), np.zeros((n, d_sae), np.float32)
    dense, counted = np.zeros((n, d_in), np.float32), np.zeros(n, np.int64)
    nonzeros: list = [None] * n
    kept = 0
    for idx, batch, valid in _batches(ids, batch_size, _pad_id(lm)):
        keep = valid & ~special_mask(batch, lm.tokenizer)  # (B, T)
        acts = lm.activations(torch.from_numpy(batch), hook, torch.from_numpy(valid.astype(np.int64)))
        z = sae.encode(acts.to(sae.W_enc.device)).float().cpu()  # (B, T, d_sae)
        k = torch.from_numpy(keep)
        z[~k] = 0
        cnt = k.sum(1).clamp(min=1)  # (B,)
        mx[idx] = z.max(dim=1).values.numpy()
        mn[idx] = (z.sum(1) / cnt[:, None]).numpy()
        a = acts.float().cpu() * k[..., None]
        dense[idx] = (a.sum(1) / cnt[:, None]).numpy()
        counted[idx] = k.sum(1).numpy()
        nz = torch.nonzero(z)  # (N, 3): row, position, feature, in row order
        if kept + len(nz) <= KEEP_NONZEROS:
            kept += len(nz)
            vals = z[nz[:, 0], nz[:, 1], nz[:, 2]].numpy()
            bounds = np.searchsorted(nz[:, 0].numpy(), np.arange(len(idx) + 1))
            cols = nz[:, 1:].numpy().astype(np.int32)
            for r, i in enumerate(idx):
                lo, hi = bounds[r], bounds[r + 1]
                nonzeros[i] = (cols[lo:hi, 0], cols[lo:hi, 1], vals[lo:hi])
        if progress is not None:
            progress(len(idx))
    return TextActs(mx, mn, dense, counted, ids, nonzeros)


@torch.no_grad()
def token_values(lm: HookedLM, sae: SAE, hook: str, acts: TextActs, want: dict[int, set[int]],
                 batch_size: int = 8) -> dict[tuple[int, int], list[float]]:
    """(text, feature) -> the feature's activation on every token of the text (0 on special tokens), for the
    texts and features in `want` (text index -> features): the highlighting of the texts a contrast lists.
    From the nonzeros text_activations kept; texts it did not keep are encoded again."""
    ids = acts.token_ids
    out: dict[tuple[int, int], list[float]] = {}
    for i in sorted(want):
        kept = acts.nonzeros[i] if i < len(acts.nonzeros) else None
        if kept is None:
            continue
        pos, feat, vals = kept
        for f in sorted(want[i]):
            row = np.zeros(len(ids[i]), np.float32)
            sel = feat == f
            row[pos[sel]] = vals[sel]
            out[(i, f)] = row.tolist()
    texts = sorted(i for i in want if (i, min(want[i])) not in out)
    sub = [ids[i] for i in texts]
    for idx, batch, valid in _batches(sub, batch_size, _pad_id(lm)):
        keep = valid & ~special_mask(batch, lm.tokenizer)
        h = lm.activations(torch.from_numpy(batch), hook, torch.from_numpy(valid.astype(np.int64)))
        z = sae.encode(h.to(sae.W_enc.device)).float().cpu()
        z[~torch.from_numpy(keep)] = 0
        for r, j in enumerate(idx):
            i, T = texts[j], len(sub[j])
            for f in sorted(want[i]):
                out[(i, f)] = z[r, :T, f].tolist()
    return out


def auroc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column: AUROC of scores a (n_a, F) against b (n_b, F) by the rank formula, ties averaged."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    na, nb = len(a), len(b)
    ranks = rankdata(np.concatenate([a, b]), axis=0)  # average ranks for ties
    u = ranks[:na].sum(0) - na * (na + 1) / 2
    return u / (na * nb)


@dataclass
class ContrastResult:
    auroc: np.ndarray  # (d_sae,)
    mean_a: np.ndarray
    mean_b: np.ndarray
    diff: np.ndarray
    top_a: np.ndarray  # feature ids higher on A, best first
    top_b: np.ndarray  # feature ids higher on B, best first
    reduce: str = "max"


def contrast(sa: np.ndarray, sb: np.ndarray, top: int = 50, reduce: str = "max") -> ContrastResult:
    """Rank features by how well per-text scores sa (n_a, F) and sb (n_b, F) separate A from B."""
    if len(sa) < 1 or len(sb) < 1:
        raise UserError(f"contrast needs at least one text on each side; got {len(sa)} (A) and {len(sb)} (B)")
    au = auroc(sa, sb)
    ma, mb = sa.astype(np.float64).mean(0), sb.astype(np.float64).mean(0)
    diff = ma - mb
    f = np.arange(len(au))
    # lexsort: last key first. A side: AUROC desc, then diff desc, then index
    order_a = np.lexsort((f, -diff, -au))
    order_b = np.lexsort((f, diff, au))
    top_a = order_a[(au[order_a] > 0.5) | ((au[order_a] == 0.5) & (diff[order_a] > 0))][:top]
    top_b = order_b[(au[order_b] < 0.5) | ((au[order_b] == 0.5) & (diff[order_b] < 0))][:top]
    return ContrastResult(au, ma, mb, diff, top_a, top_b, reduce)


# ------------------------------------------------------------------ sparse probing
def split(n_a: int, n_b: int, test_frac: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test index split over the pooled [A..., B...] rows; (train, test)."""
    g = np.random.default_rng(seed)
    tr, te = [], []
    for lo, n in ((0, n_a), (n_a, n_b)):
        perm = lo + g.permutation(n)
        k = max(1, int(round(n * test_frac)))
        if n - k < 1:
            raise UserError(f"sparse probing needs at least 2 texts per side; got {n}")
        te.append(perm[:k])
        tr.append(perm[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """SAEBench get_top_k_mean_diff_mask: the k columns with the largest |mean(x | y=1) - mean(x | y=0)|."""
    d = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-d, kind="stable")[:k]


def fit_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int = 0) -> float:
    """Standardised logistic regression (scikit-learn, L2, C=1): test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(sc.transform(xtr), ytr)
    return float((clf.predict(sc.transform(xte)) == yte).mean())


@dataclass
class ProbeResult:
    ks: list[int]
    features: dict[int, list[int]]  # k -> features picked on the train split
    sae_accuracy: dict[int, float]
    dense_accuracy: float
    n_train: int
    n_test: int
    test_frac: float
    seed: int


def sparse_probe(fa: np.ndarray, fb: np.ndarray, da: np.ndarray, db: np.ndarray, ks: Sequence[int] = PROBE_KS,
                 test_frac: float = 0.2, seed: int = 0) -> ProbeResult:
    """fa/fb: per-text SAE features of A/B (mean-pooled); da/db: the dense hook activations (mean-pooled)."""
    x = np.concatenate([fa, fb]).astype(np.float64)
    dx = np.concatenate([da, db]).astype(np.float64)
    y = np.concatenate([np.ones(len(fa), int), np.zeros(len(fb), int)])
    tr, te = split(len(fa), len(fb), test_frac, seed)
    feats, acc = {}, {}
    for k in ks:
        cols = top_k_mean_diff(x[tr], y[tr], min(k, x.shape[1]))
        feats[k] = [int(c) for c in cols]
        acc[k] = fit_probe(x[tr][:, cols], y[tr], x[te][:, cols], y[te], seed)
    dense = fit_probe(dx[tr], y[tr], dx[te], y[te], seed)
    return ProbeResult(list(ks), feats, acc, dense, len(tr), len(te), test_frac, seed)


# ------------------------------------------------------------------ `saescope contrast STORE`
MAX_TEXTS = 10_000  # texts per side of an offline contrast
MAX_TEXT_TOKENS = 512  # tokens per text
TOP_TEXTS = 3  # texts listed per feature and side


def read_texts(path) -> list[str]:
    """A side's texts: a .txt file (one text per non-empty line) or .jsonl (a "text" field per row)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file (a .txt with one text per line, or a .jsonl with a \"text\" field)")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        try:
            texts = [str(json.loads(ln)["text"]) for ln in lines]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{p}: every row must be a JSON object with a \"text\" field ({err})") from err
    else:
        texts = lines
    if not texts:
        raise UserError(f"{p} holds no texts")
    if len(texts) > MAX_TEXTS:
        raise UserError(f"{p} holds {len(texts)} texts; the limit is {MAX_TEXTS} per side")
    return texts


def check_live_sets(a: Sequence[str], b: Sequence[str], max_texts: int, max_chars: int) -> None:
    """A live contrast's two sets, before any model runs: texts on both sides, at most max_texts per side, each
    at most max_chars characters; a UserError names the limit."""
    empty = [s for s, t in (("A", a), ("B", b)) if not t]
    if empty:
        which = "A and B are" if len(empty) == 2 else f"{empty[0]} is"
        raise UserError(f"a contrast needs texts on both sides and {which} empty: give 1 to {max_texts} texts per "
                        "side, one per line")
    for side, texts in (("A", a), ("B", b)):
        if len(texts) > max_texts:
            raise UserError(f"{side} has {len(texts)} texts; the live limit is {max_texts} per side (`saescope "
                            "contrast STORE --a A.txt --b B.txt` takes larger sets)")
        for i, t in enumerate(texts):
            if len(t) > max_chars:
                raise UserError(f"text {i + 1} of {side} has {len(t)} characters; the live limit is {max_chars} per text")


@dataclass
class Computed:
    """One contrast as the store keeps it: the run's numbers, the listed features' columns, the texts' token ids."""

    run: dict  # n_a, n_b, reduce, probe
    features: dict[str, list]  # CONTRAST_FEATURES columns without sae_id/name
    texts: dict[str, list]  # CONTRAST_TEXTS columns likewise
    result: ContrastResult
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per step (bench/contrast.py)


def compute(lm: HookedLM, sae: SAE, hook: str, ta: Sequence[str], tb: Sequence[str], prepend_bos: bool,
            reduce: str = "max", top: int = 50, max_tokens: int = MAX_TEXT_TOKENS, batch_size: int = 8,
            progress: Callable[[int], None] | None = None) -> Computed:
    """A contrast of texts ta against tb: ranked features on both sides with the texts where each fires most
    (and its activation on every token of them), and the sparse probes when each side has 2 texts or more.
    The one computation behind `saescope contrast` and the worker's POST /contrast."""
    if reduce not in REDUCTIONS:
        raise UserError(f"reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    if not ta or not tb:
        raise UserError(f"contrast needs at least one text on each side; got {len(ta)} (A) and {len(tb)} (B)")
    import time

    t0 = time.perf_counter()
    a = text_activations(lm, sae, hook, ta, prepend_bos, max_tokens, batch_size, "A", progress)
    b = text_activations(lm, sae, hook, tb, prepend_bos, max_tokens, batch_size, "B", progress)
    t1 = time.perf_counter()
    res = contrast(getattr(a, reduce), getattr(b, reduce), top, reduce)
    probe = None
    if len(ta) >= 2 and len(tb) >= 2:
        p = sparse_probe(a.mean, b.mean, a.dense, b.dense)
        probe = {"ks": p.ks, "features": {str(k): v for k, v in p.features.items()},
                 "sae_accuracy": {str(k): v for k, v in p.sae_accuracy.items()}, "dense_accuracy": p.dense_accuracy,
                 "n_train": p.n_train, "n_test": p.n_test, "test_frac": p.test_frac, "seed": p.seed,
                 "pooling": "mean", "classifier": "StandardScaler + LogisticRegression(C=1, max_iter=1000)"}
    listed = []  # (side, rank, feature, top text indices)
    want: dict[str, dict[int, set[int]]] = {"a": {}, "b": {}}
    for side, feats, scores in (("a", res.top_a, getattr(a, reduce)), ("b", res.top_b, getattr(b, reduce))):
        for rank, f in enumerate(feats):
            order = [int(i) for i in np.argsort(-scores[:, f], kind="stable")[:TOP_TEXTS]]
            listed.append((side, rank, int(f), order, [float(scores[i, f]) for i in order]))
            for i in order:
                want[side].setdefault(i, set()).add(int(f))
    t2 = time.perf_counter()
    values = {s: token_values(lm, sae, hook, x, want[s], batch_size) for s, x in (("a", a), ("b", b))}
    t3 = time.perf_counter()
    cols: dict[str, list] = {k: [] for k in ("side", "rank", "feature", "auroc", "mean_a", "mean_b", "diff",
                                             "top_texts", "top_values", "top_acts")}
    for side, rank, f, order, tops in listed:
        for k, v in (("side", side), ("rank", rank), ("feature", f), ("auroc", float(res.auroc[f])),
                     ("mean_a", float(res.mean_a[f])), ("mean_b", float(res.mean_b[f])), ("diff", float(res.diff[f])),
                     ("top_texts", order), ("top_values", tops), ("top_acts", [values[side][(i, f)] for i in order])):
            cols[k].append(v)
    texts = {"side": ["a"] * len(ta) + ["b"] * len(tb), "idx": list(range(len(ta))) + list(range(len(tb))),
             "token_ids": a.token_ids + b.token_ids}
    return Computed({"n_a": len(ta), "n_b": len(tb), "reduce": reduce, "probe": probe}, cols, texts, res,
                    {"encode": t1 - t0, "rank_and_probe": t2 - t1, "token_values": t3 - t2})


def run_contrast(store_path, sae_id: str, a_path, b_path, name: str, reduce: str = "max", top: int = 50,
                 device: str = "auto", dtype: str = "auto", lm: HookedLM | None = None, progress: bool = False) -> dict:
    """Compute a contrast for one SAE of a store and store it under `name` (model and SAE from its provenance);
    progress: a bar over the texts on stderr."""
    import datetime as dt
    import re
    from pathlib import Path

    from tqdm.auto import tqdm

    from .models import load_model
    from .saes import load_sae
    from .store import Store
    from .store.write import write_contrast

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name or ""):
        raise UserError("--name may hold 1-64 letters, digits, '.', '_' and '-'")
    if reduce not in REDUCTIONS:
        raise UserError(f"--reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    ta, tb = read_texts(a_path), read_texts(b_path)
    with Store(store_path) as st:
        info = st.require_sae(sae_id)
    lm = lm or load_model(info.model_path, device, dtype)
    sae = load_sae(info.sae_path, info.hook).to(lm.device)
    with tqdm(total=len(ta) + len(tb), unit="text", desc="contrast", disable=not progress) as bar:
        c = compute(lm, sae, info.hook, ta, tb, info.prepend_bos, reduce, top, MAX_TEXT_TOKENS, progress=bar.update)
    run = {"sae_id": sae_id, "name": name, "a_source": str(a_path), "b_source": str(b_path), **c.run,
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_contrast(Path(store_path), run, c.features, c.texts)
    res = c.result
    return {"run": run, "top_a": [int(f) for f in res.top_a[:10]], "top_b": [int(f) for f in res.top_b[:10]],
            "auroc": res.auroc}
