"""Questions only the explainer (precompute/explain/) asks of a store: which features are explained already, and
contexts on which a feature is provably silent (the negatives of detection and fuzzing scoring). Functions of a
Store rather than its methods, so the pages' Store stays about pages; the SQL stays in the store package."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .read import Store


def explained_features(store: "Store", sae_id: str, llm: str | None = None, prompt_version: str | None = None) -> set[int]:
    """Features with at least one explanation (only those from this LLM and prompt version, when given)."""
    where, params = ["sae_id = ?"], [sae_id]
    if llm is not None:
        where.append("llm = ?")
        params.append(llm)
    if prompt_version is not None:
        where.append("prompt_version = ?")
        params.append(prompt_version)
    return {r[0] for r in store._q(f"SELECT DISTINCT feature FROM explanations WHERE {' AND '.join(where)}", params)}

def non_activating_contexts(store: "Store", sae_id: str, index: int, n: int, seed: int = 0) -> list[list[str]]:
    """Up to n stored contexts (token strings) on which the feature is provably 0 on every token, in a
    seeded pseudo-random order. Proof: the feature's stored examples carry its activations on every token
    of their contexts; when those add up to all n_active active tokens, every other stored context has none.
    When they do not (a dense feature whose active contexts were not all kept), nothing is returned."""
    covered, n_active = store._q("""
        SELECT (SELECT coalesce(sum(len(p)), 0) FROM (SELECT any_value(act_pos) AS p FROM examples
                WHERE sae_id = ? AND feature = ? GROUP BY ctx_id)),
               (SELECT n_active FROM features WHERE sae_id = ? AND feature = ?)""", [sae_id, index, sae_id, index])[0]
    if n_active is None or int(covered) != int(n_active) or n <= 0:
        return []
    rows = store._q("""SELECT tokens FROM contexts WHERE sae_id = ? AND ctx_id NOT IN
                          (SELECT ctx_id FROM examples WHERE sae_id = ? AND feature = ?)
                      ORDER BY hash(ctx_id::BIGINT * 1000003 + ?), ctx_id LIMIT ?""",
                   [sae_id, sae_id, index, int(seed), int(n)])
    tok = store._tok(sae_id)
    return [[tok(i) for i in r[0]] for r in rows]
