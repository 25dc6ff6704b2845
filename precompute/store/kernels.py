"""The table builder's compiled kernels: one feature range's tables from its activations in one pass per feature.

`build_range_arrays` turns the rows of features lo..hi, sorted by (feature, ctx, pos), into exactly what the SQL of
write.build_range(engine="sql") produces, with the SQL's own orderings and tie-breaks:

  stats      n, max, min, and the mean summed in double in (ctx, pos) order (`avg(value::DOUBLE ORDER BY ctx, pos)`)
  top        per context its strongest position (ties to the earlier pos), contexts ranked by value desc, then ctx
  interval   bin = least(floor(value::DOUBLE / max::DOUBLE * n_intervals), n_intervals - 1); per bin the rows of
             lowest priority (schema.priority: a hash of the token and feature, no ties within a feature)
  quantile   bin = ntile(n_quantiles) over (value, ctx, pos) - 1 (DuckDB's ntile: the first n % q bins one larger);
             per bin the rows of lowest priority; its lo/hi the bin's min/max value
  groups     per bin its token count; interval edges max * bin / n_intervals in float32 arithmetic (REAL * INTEGER
             / INTEGER is REAL in DuckDB)
  hist       bin = least(floor(((value - min) as REAL)::DOUBLE / greatest((max - min) as REAL, 1e-12) * bins), bins - 1)

Compiled once and cached on disk (numba cache=True), so a new process (a Ray task, a rerun) loads them instead of
compiling. Values must be finite and positive (every SAE activation kept is); write.build_range checks that and
otherwise uses the SQL.
"""

from __future__ import annotations

import numba
import numpy as np

PRIME = 4294967291
MUL_TOK = 2654435761
MUL_FEAT = 2246822519


@numba.njit(cache=True, nogil=True)
def _prio(c, p, f, T):
    return ((np.int64(c) * T + np.int64(p)) * MUL_TOK + np.int64(f) * MUL_FEAT) % PRIME


@numba.njit(cache=True, nogil=True)
def _keep_lowest(pr_buf, idx_buf, cnt, per, pr, i):
    """Insert (pr, i) into the ascending buffers of the `per` lowest priorities seen (cnt of them filled)."""
    if cnt < per:
        j = cnt
        cnt += 1
    elif pr < pr_buf[per - 1]:
        j = per - 1
    else:
        return cnt
    while j > 0 and pr_buf[j - 1] > pr:
        pr_buf[j] = pr_buf[j - 1]
        idx_buf[j] = idx_buf[j - 1]
        j -= 1
    pr_buf[j] = pr
    idx_buf[j] = i
    return cnt


@numba.njit(cache=True, nogil=True)
def range_kernel(f, c, p, v, starts, T, top_k, n_int, per_int, n_q, per_q, bins):
    """Rows sorted by (feature, ctx, pos); starts: first row of each feature (len n_features + 1, last = len(f)).

    Returns per feature: n, mx, mn, mean, hist (n_f, bins); per group (interval bins, then quantile bins, of each
    feature in order): feature slot, kind (0 interval, 1 quantile), bin, lo, hi, count; and the examples in
    (feature, kind, grp, rank) order (kind 0 interval, 1 quantile, 2 top) as (feature slot, kind, grp, rank, row)."""
    nf = len(starts) - 1
    n = np.zeros(nf, np.int64)
    mx = np.zeros(nf, np.float32)
    mn = np.zeros(nf, np.float32)
    mean = np.zeros(nf, np.float64)
    hist = np.zeros((nf, bins), np.int64)
    max_g = nf * (n_int + n_q)
    g_feat = np.empty(max_g, np.int64)
    g_kind = np.empty(max_g, np.int8)
    g_bin = np.empty(max_g, np.int64)
    g_lo = np.empty(max_g, np.float32)
    g_hi = np.empty(max_g, np.float32)
    g_cnt = np.empty(max_g, np.int64)
    max_e = nf * (top_k + n_int * per_int + n_q * per_q)
    e_feat = np.empty(max_e, np.int64)
    e_kind = np.empty(max_e, np.int8)
    e_grp = np.empty(max_e, np.int64)
    e_rank = np.empty(max_e, np.int64)
    e_row = np.empty(max_e, np.int64)
    ng = 0
    ne = 0
    ipr = np.empty((n_int, per_int), np.int64)
    iidx = np.empty((n_int, per_int), np.int64)
    icnt = np.zeros(n_int, np.int64)
    itot = np.zeros(n_int, np.int64)
    qpr = np.empty((n_q, per_q), np.int64)
    qidx = np.empty((n_q, per_q), np.int64)
    for k in range(nf):
        s, e = starts[k], starts[k + 1]
        m = e - s
        n[k] = m
        # stats: max, min, the mean in row order
        hi_v = v[s]
        lo_v = v[s]
        acc = 0.0
        for i in range(s, e):
            x = v[i]
            if x > hi_v:
                hi_v = x
            if x < lo_v:
                lo_v = x
            acc += np.float64(x)
        mx[k] = hi_v
        mn[k] = lo_v
        mean[k] = acc / m
        # histogram over [min, max]
        width = max(np.float64(np.float32(hi_v - lo_v)), 1e-12)
        for i in range(s, e):
            b = np.floor(np.float64(np.float32(v[i] - lo_v)) / width * bins)
            hist[k, min(np.int64(b), bins - 1)] += 1
        # interval bins: the per_int rows of lowest priority per bin
        icnt[:] = 0
        itot[:] = 0
        pr = np.empty(m, np.int64)  # each row's priority, computed once for both kinds of sample
        for i in range(s, e):
            pr[i - s] = _prio(c[i], p[i], f[i], T)
            b = min(np.int64(np.floor(np.float64(v[i]) / np.float64(hi_v) * n_int)), n_int - 1)
            itot[b] += 1
            icnt[b] = _keep_lowest(ipr[b], iidx[b], icnt[b], per_int, pr[i - s], i)
        for b in range(n_int):
            if itot[b]:
                g_feat[ng] = k
                g_kind[ng] = 0
                g_bin[ng] = b
                g_lo[ng] = hi_v * np.float32(b) / np.float32(n_int)
                g_hi[ng] = hi_v * np.float32(b + 1) / np.float32(n_int)
                g_cnt[ng] = itot[b]
                ng += 1
        # quantile bins: ntile over (value, ctx, pos); rows are in (ctx, pos) order, so a stable sort by value
        order = np.argsort(v[s:e], kind="mergesort")
        nb = min(n_q, m)
        size = m // nb
        n_large = m - nb * size
        b0 = 0
        for b in range(nb):
            b1 = b0 + (size + 1 if b < n_large else size)
            cnt = 0
            for r in range(b0, b1):
                i = s + order[r]
                cnt = _keep_lowest(qpr[b], qidx[b], cnt, per_q, pr[order[r]], i)
            g_feat[ng] = k
            g_kind[ng] = 1
            g_bin[ng] = b
            g_lo[ng] = v[s + order[b0]]
            g_hi[ng] = v[s + order[b1 - 1]]
            g_cnt[ng] = b1 - b0
            ng += 1
            b0 = b1
        # examples: interval, quantile, top (the kinds' alphabetical order), each by bin and rank
        for b in range(n_int):
            for r in range(icnt[b]):
                e_feat[ne] = k
                e_kind[ne] = 0
                e_grp[ne] = b
                e_rank[ne] = r
                e_row[ne] = iidx[b, r]
                ne += 1
        b0 = 0
        for b in range(nb):
            b1 = b0 + (size + 1 if b < n_large else size)
            for r in range(min(per_q, b1 - b0)):
                e_feat[ne] = k
                e_kind[ne] = 1
                e_grp[ne] = b
                e_rank[ne] = r
                e_row[ne] = qidx[b, r]
                ne += 1
            b0 = b1
        # top: per context its strongest position (first maximum in pos order), contexts by value desc, then ctx
        n_ctx = 1
        for i in range(s + 1, e):
            if c[i] != c[i - 1]:
                n_ctx += 1
        best_v = np.empty(n_ctx, np.float32)
        best_i = np.empty(n_ctx, np.int64)
        j = -1
        for i in range(s, e):
            if i == s or c[i] != c[i - 1]:
                j += 1
                best_v[j] = v[i]
                best_i[j] = i
            elif v[i] > best_v[j]:
                best_v[j] = v[i]
                best_i[j] = i
        rank = np.argsort(-best_v, kind="mergesort")  # stable: equal values keep ctx order
        for r in range(min(top_k, n_ctx)):
            e_feat[ne] = k
            e_kind[ne] = 2
            e_grp[ne] = 0
            e_rank[ne] = r
            e_row[ne] = best_i[rank[r]]
            ne += 1
    return (n, mx, mn, mean, hist, g_feat[:ng], g_kind[:ng], g_bin[:ng], g_lo[:ng], g_hi[:ng], g_cnt[:ng],
            e_feat[:ne], e_kind[:ne], e_grp[:ne], e_rank[:ne], e_row[:ne])


@numba.njit(cache=True, nogil=True)
def gather_segments(values, starts, ends):
    """(offsets int32 (n+1,), values[starts[0]:ends[0]] ++ values[starts[1]:ends[1]] ++ ...): a list column."""
    n = len(starts)
    offsets = np.zeros(n + 1, np.int32)
    for i in range(n):
        offsets[i + 1] = offsets[i] + (ends[i] - starts[i])
    out = np.empty(offsets[n], values.dtype)
    for i in range(n):
        o = offsets[i]
        for j in range(starts[i], ends[i]):
            out[o] = values[j]
            o += 1
    return offsets, out


@numba.njit(cache=True, nogil=True)
def feature_order(ctx, pos, feature, d_sae):
    """The permutation that sorts records by (feature, ctx, pos), when they come in (ctx, pos, feature) order (as the
    stream appends them): a stable counting sort by feature, one pass to count and one to place. Returns
    (order, counts per feature, True), or (empty, counts, False) when a record breaks that order (the caller sorts
    fully then): the result equals np.lexsort((pos, ctx, feature)) whenever it is given."""
    n = len(feature)
    counts = np.zeros(d_sae, np.int64)
    ordered = True
    for j in range(n):
        if feature[j] < 0 or feature[j] >= d_sae:
            raise ValueError("a record's feature index is outside 0..d_sae-1")
        counts[feature[j]] += 1
        if j and ordered:
            c0, c1 = ctx[j - 1], ctx[j]
            if c1 < c0 or (c1 == c0 and (pos[j] < pos[j - 1] or (pos[j] == pos[j - 1] and feature[j] <= feature[j - 1]))):
                ordered = False
    if not ordered:
        return np.zeros(0, np.int64), counts, False
    offs = np.zeros(d_sae, np.int64)
    s = 0
    for f in range(d_sae):
        offs[f] = s
        s += counts[f]
    order = np.empty(n, np.int64)
    for j in range(n):
        f = feature[j]
        order[offs[f]] = j
        offs[f] += 1
    return order, counts, True
