"""Explain a feature with an LLM and score explanations by detection and fuzzing (delphi's classifier scorers).

A scorer shows the judge LLM held-out snippets, `n_per_prompt` at a time in a shuffled order, and reads back one
1/0 per snippet. Activating snippets are the positive class, non-activating ones the negative class; the score is
balanced accuracy = (accuracy on activating + accuracy on non-activating) / 2 over the snippets whose answer could
be parsed, so always answering "1" (or "0") scores 0.5, chance. Unparsable answers are counted, never guessed.
With the same backend, explanation, examples and seed the snippets, their order and the prompts are identical.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .backends import ChatBackend
from .prompts import (
    PROMPT_VERSION,
    Example,
    ExplainConfig,
    FeatureMaterial,
    active_mask,
    detection_messages,
    explainer_messages,
    fuzzing_messages,
    parse_explanation,
    parse_judgements,
    random_window,
    render,
    split_material,
    window,
)
from ..errors import UserError

log = logging.getLogger(__name__)

METHODS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Judgement:
    text: str  # the snippet exactly as the judge saw it
    activating: bool  # true class
    group: int  # quantile group of an activating snippet; -1 for a non-activating one
    prediction: bool | None  # the judge's answer; None when unparsable


@dataclass(frozen=True)
class ScoreResult:
    method: str  # "detection" or "fuzzing"
    balanced_accuracy: float | None  # None unless both classes have at least one parsed answer
    n_examples: int  # snippets shown
    n_judged: int  # snippets with a parsed answer
    n_unparsable: int  # n_examples - n_judged
    activating_accuracy: float | None  # recall on activating snippets (true positive rate)
    non_activating_accuracy: float | None  # true negative rate
    n_activating: int  # activating snippets judged
    n_non_activating: int  # non-activating snippets judged
    judgements: tuple[Judgement, ...] = ()

    def to_dict(self, judgements: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not judgements:
            d.pop("judgements")
        return d


def balanced_accuracy(judgements: Sequence[Judgement], method: str) -> ScoreResult:
    """delphi's accuracy: (TP / P + TN / N) / 2 over the parsed answers, with P, N the judged class sizes."""
    judged = [j for j in judgements if j.prediction is not None]
    pos = [j for j in judged if j.activating]
    neg = [j for j in judged if not j.activating]
    tpr = sum(j.prediction for j in pos) / len(pos) if pos else None
    tnr = sum(not j.prediction for j in neg) / len(neg) if neg else None
    ba = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
    return ScoreResult(method=method, balanced_accuracy=ba, n_examples=len(judgements), n_judged=len(judged),
                       n_unparsable=len(judgements) - len(judged), activating_accuracy=tpr,
                       non_activating_accuracy=tnr, n_activating=len(pos), n_non_activating=len(neg),
                       judgements=tuple(judgements))


def _check_inputs(explanation: str, activating: Sequence[Example], non_activating: Sequence[Sequence[str]],
                  method: str) -> None:
    if not isinstance(explanation, str) or not explanation.strip():
        raise UserError(f"{method} scoring needs a non-empty explanation")
    if not activating:
        raise UserError(f"{method} scoring needs at least one held-out activating example")
    if not any(len(t) for t in non_activating):
        raise UserError(f"{method} scoring needs non-activating contexts (token lists where the feature is 0)")


def _pick_non_activating(non_activating: Sequence[Sequence[str]], n: int, width: int,
                         rng: random.Random) -> list[list[str]]:
    pool = [list(t) for t in non_activating if len(t)]
    if len(pool) < n:
        log.info("only %d non-activating contexts for %d activating examples; using all", len(pool), n)
        n = len(pool)
    return [random_window(toks, width, rng) for toks in rng.sample(pool, n)]


def _judge(backend: ChatBackend, explanation: str, samples: list[tuple[str, bool, int]], build, method: str,
           cfg: ExplainConfig, rng: random.Random) -> ScoreResult:
    rng.shuffle(samples)
    batches = [samples[i:i + cfg.n_per_prompt] for i in range(0, len(samples), cfg.n_per_prompt)]
    answers = backend.complete_batch([build(explanation, [s[0] for s in b]) for b in batches], cfg.judge_tokens)
    out: list[Judgement] = []
    for batch, answer in zip(batches, answers):
        preds = parse_judgements(answer, len(batch))
        if preds[0] is None:
            log.debug("unparsable %s answer: %r", method, answer[:200])
        out += [Judgement(text, act, group, p) for (text, act, group), p in zip(batch, preds)]
    return balanced_accuracy(out, method)


def _groups(activating: Sequence[Example], groups: Sequence[int] | None) -> list[int]:
    if groups is None:
        return [0] * len(activating)
    if len(groups) != len(activating):
        raise UserError(f"got {len(groups)} groups for {len(activating)} activating examples")
    return list(groups)


def detection_score(backend: ChatBackend, explanation: str, activating: Sequence[Example],
                    non_activating: Sequence[Sequence[str]], cfg: ExplainConfig = ExplainConfig(), seed: int = 0,
                    groups: Sequence[int] | None = None) -> ScoreResult:
    """Detection: can the judge tell, from the explanation alone, which unmarked snippets make the feature fire?

    activating: held-out examples (cut to windows around their maximum); non_activating: token lists of contexts
    where the feature is 0 everywhere (a random window of the same width from each; as many as activating unless
    cfg.n_non_activating says otherwise)."""
    _check_inputs(explanation, activating, non_activating, "detection")
    rng = random.Random(seed)
    n_neg = len(activating) if cfg.n_non_activating is None else cfg.n_non_activating
    samples = [(render(window(ex, cfg.left, cfg.right).tokens), True, g)
               for ex, g in zip(activating, _groups(activating, groups))]
    samples += [(render(toks), False, -1) for toks in _pick_non_activating(non_activating, n_neg, cfg.width, rng)]
    return _judge(backend, explanation, samples, detection_messages, "detection", cfg, rng)


def fuzzing_score(backend: ChatBackend, explanation: str, activating: Sequence[Example],
                  non_activating: Sequence[Sequence[str]], cfg: ExplainConfig = ExplainConfig(), seed: int = 0,
                  groups: Sequence[int] | None = None) -> ScoreResult:
    """Fuzzing: can the judge tell correctly marked snippets from wrongly marked ones?

    Activating windows have their active tokens (>= threshold x the window's maximum) marked: the positive class.
    Non-activating windows get k tokens marked, k = the mean number of marked tokens per activating window rounded
    up (delphi's default fuzzing): the token where activating windows have their maximum (so the position gives
    nothing away) and k - 1 random others."""
    _check_inputs(explanation, activating, non_activating, "fuzzing")
    rng = random.Random(seed)
    n_neg = len(activating) if cfg.n_non_activating is None else cfg.n_non_activating
    samples: list[tuple[str, bool, int]] = []
    n_marked = []
    for ex, g in zip(activating, _groups(activating, groups)):
        w = window(ex, cfg.left, cfg.right)
        mask = active_mask(w, cfg.threshold)
        n_marked.append(sum(mask))
        samples.append((render(w.tokens, mask), True, g))
    k = max(1, math.ceil(sum(n_marked) / len(n_marked)))
    for toks in _pick_non_activating(non_activating, n_neg, cfg.width, rng):
        first = min(cfg.left, len(toks) - 1)
        others = [i for i in range(len(toks)) if i != first]
        chosen = {first, *rng.sample(others, min(k - 1, len(others)))}
        samples.append((render(toks, [i in chosen for i in range(len(toks))]), False, -1))
    return _judge(backend, explanation, samples, fuzzing_messages, "fuzzing", cfg, rng)


def _provenance(backend: ChatBackend, n_examples: int, parsed: bool, seed: int) -> dict[str, Any]:
    return {"llm": backend.name, "prompt_version": PROMPT_VERSION,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_examples": n_examples, "parsed": parsed, "seed": seed}


def explain_features(backend: ChatBackend, materials: Sequence[FeatureMaterial], cfg: ExplainConfig = ExplainConfig(),
                     seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """explain_feature for many features at once (an HTTP backend sends the prompts concurrently). A feature with
    no activating example, or whose answer has no usable text, gets "" (provenance "parsed": False, and "error"
    for the former); store only non-empty explanations."""
    prompts, where, sizes = [], [], []
    out: list[tuple[str, dict[str, Any]]] = []
    for material in materials:
        split = split_material(material, cfg, seed)
        sizes.append(len(split.explain))
        try:
            prompts.append(explainer_messages(split.explain, cfg))
            where.append(len(out))
            out.append(("", {}))
        except ValueError as err:  # a dead feature: nothing to explain
            out.append(("", {**_provenance(backend, 0, False, seed), "error": str(err)}))
    answers = backend.complete_batch(prompts, cfg.explain_max_tokens) if prompts else []
    for i, answer in zip(where, answers):
        text, found = parse_explanation(answer)
        out[i] = (text, _provenance(backend, sizes[i], found and bool(text), seed))
    return out


def explain_feature(backend: ChatBackend, material: FeatureMaterial, cfg: ExplainConfig = ExplainConfig(),
                    seed: int = 0) -> tuple[str, dict[str, Any]]:
    """(explanation, provenance {llm, prompt_version, date, n_examples, parsed, seed}) from the feature's top
    examples and one sample per quantile group; the rest stay held out for scoring."""
    return explain_features(backend, [material], cfg, seed)[0]


def score_explanation(backend: ChatBackend, explanation: str, material: FeatureMaterial,
                      cfg: ExplainConfig = ExplainConfig(), seed: int = 0,
                      methods: Sequence[str] = METHODS) -> dict[str, ScoreResult]:
    """Detection and/or fuzzing on the held-out part of the material (the part explain_feature never shows)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown scoring method {bad[0]!r}; valid: {', '.join(METHODS)}")
    split = split_material(material, cfg, seed)
    if not split.test:
        raise UserError("no held-out activating examples are left after the explainer's share; store more "
                         "quantile examples or lower n_top / per_group_explain")
    fns = {"detection": detection_score, "fuzzing": fuzzing_score}
    return {m: fns[m](backend, explanation, split.test, split.non_activating, cfg, seed, split.test_groups)
            for m in methods}
