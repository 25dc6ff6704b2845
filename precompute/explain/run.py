"""`saescope explain`: explain (and score) the features of one SAE of a store with an LLM, resumably.

For each feature the material is read from the store only: its top examples and quantile samples (the
explainer sees the top ones and one sample per quantile group, the rest are held out for scoring, see
`prompts.split_material`) and stored contexts on which the feature is provably 0 on every token
(`store.explanations.non_activating_contexts`) as the negatives of detection and fuzzing. Explanations are written with their
provenance (LLM, prompt version, UTC date) and scores (balanced accuracy per method, n_scored = snippets with a
parsed judgement summed over the methods; NULL scores and n_scored when not scored) through
`store.write.add_explanations` every `flush_every` features or `flush_seconds`, so a killed run loses at most
that much; a new run skips every feature that already has an explanation from the same LLM and prompt version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import EXPLAIN
from .backends import ChatBackend
from .prompts import PROMPT_VERSION, Example, ExplainConfig, FeatureMaterial
from .scoring import METHODS, ScoreResult, explain_features, score_explanation
from ..errors import UserError
from ..store.explanations import explained_features, non_activating_contexts

log = logging.getLogger(__name__)

SOURCE = "saescope explain"  # the source column of generated explanations


@dataclass
class ExplainRunResult:
    sae_id: str
    llm: str
    requested: int  # features asked for
    skipped_done: int  # already explained by this LLM and prompt version
    skipped_dead: int  # never active: nothing to explain
    explained: int  # explanations written
    empty: int  # answers without a usable explanation (not written; retried by the next run)
    scored: int  # written explanations with at least one balanced accuracy
    unscored: list[tuple[int, str]] = field(default_factory=list)  # (feature, why) when scoring could not run
    seconds: float = 0.0


def local_llm_name(model_dir: Path | str) -> str:
    """The provenance name LocalChatBackend gives a model folder (known before loading it, to skip finished runs)."""
    return f"local:{Path(model_dir).name}"


def pending_features(store_path: Path | str, sae_id: str, features: Sequence[int] | None, llm: str) -> list[int]:
    """The live features among `features` (None: all) not yet explained by `llm` with the current prompt version."""
    from ..store import Store

    with Store(store_path) as store:
        sae = store.require_sae(sae_id)
        wanted = list(range(sae.d_sae)) if features is None else sorted(set(features))
        done = explained_features(store, sae_id, llm, PROMPT_VERSION)
        rows = store.features_by_index(sae_id, [i for i in wanted if i not in done])
        return [i for i in sorted(rows) if rows[i].n_active > 0]


def material_from_store(store, sae_id: str, index: int, n_non_activating: int, seed: int = 0) -> FeatureMaterial:
    """The feature's stored top examples, quantile samples (one list per group, strongest group first) and up to
    n_non_activating stored contexts where it is 0 everywhere. Nothing is computed: it is what the store holds."""
    top = [Example(e.tokens, e.acts) for e in store.examples(sae_id, index, "top")]
    quantiles = [[Example(e.tokens, e.acts) for e in g.examples] for g in store.groups(sae_id, index, "quantile")]
    non_act = non_activating_contexts(store, sae_id, index, n_non_activating, seed)
    return FeatureMaterial(top=top, quantiles=[q for q in quantiles if q], non_activating=non_act)


def score_row(scores: dict[str, ScoreResult]) -> dict[str, Any]:
    """The store's score columns from scoring results: balanced accuracy per method and the parsed judgements."""
    return {"score_detection": scores["detection"].balanced_accuracy if "detection" in scores else None,
            "score_fuzzing": scores["fuzzing"].balanced_accuracy if "fuzzing" in scores else None,
            "n_scored": sum(r.n_judged for r in scores.values())}


def _score_one(backend: ChatBackend, text: str, material: FeatureMaterial, cfg: ExplainConfig, seed: int,
               methods: Sequence[str]) -> tuple[dict[str, Any] | None, str]:
    """(score columns, "") or (None, why it could not be scored)."""
    if not material.non_activating:
        return None, ("no stored context is provably free of this feature (its stored examples do not cover all "
                      "its active tokens)")
    try:
        return score_row(score_explanation(backend, text, material, cfg, seed, methods)), ""
    except ValueError as err:  # e.g. no held-out example left
        return None, str(err)


class _Writer:
    """Buffers rows and writes them to the store every flush_every rows or flush_seconds."""

    def __init__(self, path: Path, sae_id: str, flush_every: int, flush_seconds: float):
        self.path, self.sae_id = path, sae_id
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.rows: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        if len(self.rows) >= self.flush_every or time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        from ..store.write import add_explanations

        if self.rows:
            add_explanations(self.path, self.sae_id, self.rows, SOURCE)
            log.debug("wrote %d explanations to %s", len(self.rows), self.path)
        self.rows = []
        self.last = time.monotonic()


def run_explain(store_path: Path | str, sae_id: str, features: Sequence[int] | None, backend: ChatBackend,
                cfg: ExplainConfig = ExplainConfig(), score: bool = True, seed: int = 0,
                concurrency: int = EXPLAIN.concurrency, methods: Sequence[str] = METHODS,
                flush_every: int = EXPLAIN.flush_every, flush_seconds: float = EXPLAIN.flush_seconds,
                progress: bool = True) -> ExplainRunResult:
    """Explain `features` (None: every feature) of `sae_id` in the store at store_path with `backend`, score them
    unless score=False, and add them to the store. `concurrency` features are explained (and scored) together:
    an HTTP backend sends their prompts at once; a local one batches them."""
    from tqdm import tqdm

    from ..store import Store

    if not isinstance(concurrency, int) or concurrency < 1:
        raise UserError(f"concurrency must be a positive integer; got {concurrency!r}")
    if not isinstance(flush_every, int) or flush_every < 1:
        raise UserError(f"flush_every must be a positive integer; got {flush_every!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown scoring method {bad[0]!r}; valid: {', '.join(METHODS)}")
    path = Path(store_path)
    t0 = time.perf_counter()
    with Store(path) as store:
        sae = store.require_sae(sae_id)
        wanted = list(range(sae.d_sae)) if features is None else sorted(set(features))
        out_of_range = [i for i in wanted if not 0 <= i < sae.d_sae]
        if out_of_range:
            raise UserError(f"features {out_of_range[:5]} are outside 0-{sae.d_sae - 1} of {sae_id}")
        done = explained_features(store, sae_id, backend.name, PROMPT_VERSION)
        rows = store.features_by_index(sae_id, wanted)
        live = [i for i in wanted if i in rows and rows[i].n_active > 0]
        todo = [i for i in live if i not in done]
        result = ExplainRunResult(sae_id=sae_id, llm=backend.name, requested=len(wanted),
                                  skipped_done=sum(i in done for i in live), skipped_dead=len(wanted) - len(live),
                                  explained=0, empty=0, scored=0)
        log.info("%s: %d features to explain with %s (%d already done, %d dead)", sae_id, len(todo), backend.name,
                 result.skipped_done, result.skipped_dead)
        writer = _Writer(path, sae_id, flush_every, flush_seconds)
        n_neg = max(cfg.n_test, cfg.n_non_activating or 0) + cfg.n_top
        bar = tqdm(total=len(todo), unit="feature", desc=f"explain {sae_id}", disable=not progress, smoothing=0.1)
        pool = ThreadPoolExecutor(max_workers=concurrency)
        try:
            for start in range(0, len(todo), concurrency):
                chunk = todo[start:start + concurrency]
                materials = [material_from_store(store, sae_id, i, n_neg, seed) for i in chunk]
                answers = explain_features(backend, materials, cfg, seed)
                keep = [(i, m, text) for i, m, (text, _) in zip(chunk, materials, answers) if text.strip()]
                result.empty += len(chunk) - len(keep)
                if score:
                    scored = list(pool.map(lambda k: _score_one(backend, k[2], k[1], cfg, seed, methods), keep))
                else:
                    scored = [(None, "")] * len(keep)
                created = datetime.now(timezone.utc).isoformat(timespec="seconds")
                new = []
                for (i, _, text), (cols, why) in zip(keep, scored):
                    if score and cols is None:
                        result.unscored.append((i, why))
                    elif cols is not None and (cols["score_detection"] is not None or cols["score_fuzzing"] is not None):
                        result.scored += 1
                    new.append({"feature": i, "text": text, "llm": backend.name, "prompt_version": PROMPT_VERSION,
                                "created": created, **(cols or {})})
                writer.add(new)
                result.explained += len(new)
                bar.update(len(chunk))
        finally:
            pool.shutdown(wait=True)
            bar.close()
            writer.flush()  # what was explained before an error or Ctrl-C is kept
    result.seconds = time.perf_counter() - t0
    return result
