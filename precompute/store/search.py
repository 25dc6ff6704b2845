"""Okapi BM25 ranking of explanation texts, and safe highlighting of the matched words.

Implemented here in numpy (no dependency; rank-bm25's BM25Okapi clamps the IDF of common terms to a fraction of
the mean IDF, which reorders results in small collections). The formula is Lucene's BM25:

    score(d, q) = sum over distinct query terms t present in d of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))          (always > 0)

with N documents, n(t) documents containing t, |d| the document's length in terms, avgdl the mean length.
Terms are lowercased runs of letters and digits (Unicode aware); no stemming, no stop words (IDF already makes
"the" worth little).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ..errors import UserError

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # letters and digits; '_' and punctuation split words


def terms(text: str) -> list[str]:
    """The index terms of a text, in order."""
    return [w.lower() for w in _WORD.findall(text or "")]


@dataclass(frozen=True)
class Hit:
    index: int  # position of the document in the indexed list
    score: float
    matched: tuple[str, ...]  # query terms present in the document, in query order


class BM25Index:
    """Index a list of texts once; `search` ranks them for a query (best first, ties by index)."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise UserError(f"BM25 needs k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.n_docs = len(texts)
        counts = [Counter(terms(t)) for t in texts]
        self.doc_len = np.array([sum(c.values()) for c in counts], dtype=np.float64)  # (N,)
        self.avgdl = float(self.doc_len.mean()) if self.n_docs and self.doc_len.sum() > 0 else 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for d, c in enumerate(counts):
            for term, tf in c.items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(d)
                tfs.append(tf)
        # term -> (doc ids (n_t,), term frequencies (n_t,))
        self._postings = {t: (np.array(i, dtype=np.int64), np.array(f, dtype=np.float64))
                          for t, (i, f) in postings.items()}

    def idf(self, term: str) -> float:
        n = len(self._postings[term][0]) if term in self._postings else 0
        return float(np.log1p((self.n_docs - n + 0.5) / (n + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for the query. # (N,)"""
        out = np.zeros(self.n_docs, dtype=np.float64)
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / self.avgdl)  # (N,)
        for term in dict.fromkeys(terms(query)):  # distinct terms, query order
            if term not in self._postings:
                continue
            ids, tf = self._postings[term]
            out[ids] += self.idf(term) * tf * (self.k1 + 1.0) / (tf + norm[ids])
        return out

    def search(self, query: str, limit: int | None = None) -> list[Hit]:
        """Documents that contain at least one query term, best first (ties: lower index first)."""
        if limit is not None and limit < 0:
            raise UserError(f"limit must be None or >= 0; got {limit}")
        q = [t for t in dict.fromkeys(terms(query)) if t in self._postings]  # distinct known terms
        s = self.scores(query)
        present = np.zeros((len(q), self.n_docs), dtype=bool)  # (n_terms, N)
        for j, term in enumerate(q):
            present[j, self._postings[term][0]] = True
        idx = np.flatnonzero(present.any(axis=0))
        idx = idx[np.lexsort((idx, -s[idx]))]  # score descending, then index ascending
        if limit is not None:
            idx = idx[:limit]
        return [Hit(index=d, score=float(s[d]), matched=tuple(t for j, t in enumerate(q) if present[j, d]))
                for d in idx.tolist()]


def search_texts(texts: Sequence[str], query: str, limit: int | None = None) -> list[Hit]:
    """One-off BM25 search over a list of texts (build a BM25Index to search the same texts repeatedly)."""
    return BM25Index(texts).search(query, limit)


def highlight(text: str, query_or_terms: str | Sequence[str]) -> list[tuple[str, bool]]:
    """Split text into (segment, matched) pairs that concatenate back to the text exactly; a segment is matched
    when it is a word whose term is one of the query's. No markup is produced: the template escapes and wraps."""
    wanted = set(terms(query_or_terms)) if isinstance(query_or_terms, str) else {t.lower() for t in query_or_terms}
    segments: list[tuple[str, bool]] = []
    pos = 0
    for m in _WORD.finditer(text or ""):
        if m.group(0).lower() in wanted:
            if m.start() > pos:
                segments.append((text[pos:m.start()], False))
            segments.append((m.group(0), True))
            pos = m.end()
    if pos < len(text or ""):
        segments.append((text[pos:], False))
    merged: list[tuple[str, bool]] = []
    for seg, on in segments:  # join neighbouring unmatched pieces
        if merged and not on and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + seg, False)
        else:
            merged.append((seg, on))
    return merged


@dataclass
class SearchHit:
    index: int
    score: float
    density: float
    max_act: float
    matched: str
    top_tokens: list[str]


def dedup(items: list[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


class SearchQueries:
    """The Store's search questions (mixed into read.Store, which provides _q, _tok, _saes, _lock, _bm25 and
    features_by_index)."""

    def search_tokens(self, sae_id: str, text: str, limit: int = 50, offset: int = 0) -> tuple[list[SearchHit], int]:
        """Features whose top-activating tokens or top positive logits contain `text` (case-insensitive).

        Score: a match at rank r of the top-activating tokens adds 1/(r+1); in the logits, 0.5/(r+1).
        """
        model_key = self._saes[sae_id].model_key
        sql = """
            WITH hits AS (SELECT token_id, token FROM vocab WHERE model_key = ? AND contains(lower(token), lower(?))),
            scored AS (
                SELECT f.feature, u.r, u.t, 1.0 / (u.r) AS s FROM features f,
                       unnest(f.top_token_ids) WITH ORDINALITY AS u(t, r)
                WHERE f.sae_id = ? AND u.t IN (SELECT token_id FROM hits)
                UNION ALL
                SELECT f.feature, u.r, u.t, 0.5 / (u.r) FROM features f,
                       unnest(f.logit_pos_ids) WITH ORDINALITY AS u(t, r)
                WHERE f.sae_id = ? AND u.t IN (SELECT token_id FROM hits)),
            agg AS (SELECT feature, sum(s) AS score, arg_max(t, s) AS best FROM scored GROUP BY feature)
            SELECT a.feature, a.score, f.density, f.max_act, a.best, f.top_token_ids, count(*) OVER () AS total
            FROM agg a JOIN features f ON f.sae_id = ? AND f.feature = a.feature
            ORDER BY a.score DESC, a.feature LIMIT ? OFFSET ?"""
        rows = self._q(sql, [model_key, text, sae_id, sae_id, sae_id, limit, offset])
        tok = self._tok(sae_id)
        total = int(rows[0][6]) if rows else self._count_token_hits(sql, model_key, text, sae_id, offset)
        return [SearchHit(r[0], r[1], r[2], r[3], tok(r[4]), dedup([tok(i) for i in r[5]])) for r in rows], total

    def _count_token_hits(self, sql: str, model_key: str, text: str, sae_id: str, offset: int) -> int:
        if offset == 0:
            return 0
        rows = self._q(sql, [model_key, text, sae_id, sae_id, sae_id, 1, 0])
        return int(rows[0][6]) if rows else 0

    def _explanation_index(self, sae_id: str):
        """(BM25Index over the SAE's explanation texts, their features, the texts), built once per SAE."""
        with self._lock:
            hit = self._bm25.get(sae_id)
        if hit is None:
            rows = self._q("SELECT feature, text FROM explanations WHERE sae_id = ? ORDER BY feature, text", [sae_id])
            texts = [r[1] for r in rows]
            hit = (BM25Index(texts), [r[0] for r in rows], texts)
            with self._lock:
                self._bm25[sae_id] = hit
        return hit

    def search_explanations(self, sae_id: str, text: str, limit: int = 50, offset: int = 0) -> tuple[list[SearchHit], int]:
        """Explanations ranked by Okapi BM25 (store/search.py): every explanation holding at least one
        query word; a feature appears once, with its best explanation (`matched`) and that one's BM25 score."""
        index, features, texts = self._explanation_index(sae_id)
        best: dict[int, tuple[float, str]] = {}
        for h in index.search(text):  # best first, so the first hit of a feature is its best
            best.setdefault(features[h.index], (h.score, texts[h.index]))
        ranked = list(best.items())[offset:offset + limit]
        rows = self.features_by_index(sae_id, [f for f, _ in ranked])
        return [SearchHit(f, s, rows[f].density, rows[f].max_act, t, rows[f].top_tokens)
                for f, (s, t) in ranked if f in rows], len(best)

