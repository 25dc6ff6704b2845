"""The four check kinds, measured through the code paths the dashboard and the worker use:

    activations   precompute.encode.encode_batch on right-padded batches with an attention mask (the worker's
                  Engine._run), texts tokenized like the worker (no special tokens, BOS when the SAE wants it)
    ablation      precompute.interventions.splice as ablation_effects (the worker's /ablate) runs it: clean and ablated
                  rows in one batch, only the last position's logits: the change of log p(target) after the prompt
    steering      precompute.interventions.run_with_edits ("prob_up": the splice with an `add` edit, the last position)
                  and precompute.interventions.generate ("output_changes": greedy default vs steered, the worker's /steer)

Every result keeps the exact texts and the numbers behind the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..config import CHECK
from ..data import bos_id
from ..encode import encode_batch
from ..errors import UserError, echo
from ..interventions import Edit, Sampling, generate, run_with_edits, splice, validate_edits
from ..models import HookedLM
from ..saes import SAE
from .spec import CheckSpec


@dataclass
class CheckResult:
    name: str
    kind: str
    sae_id: str
    line: int
    passed: bool
    summary: str  # one sentence: what was measured against what was required
    expected: dict[str, Any]
    measured: dict[str, Any]
    evidence: list[dict[str, Any]] = field(default_factory=list)  # per text: the text, its tokens, the numbers
    error: str | None = None  # the check could not run (a JUnit <error>, not a <failure>)
    seconds: float = 0.0


def tokenize(lm: HookedLM, sae: SAE, text: str, max_tokens: int) -> list[int]:
    """Like the worker's Engine.tokenize: no special tokens, BOS first when the SAE was trained with it; cut."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_id(lm.tokenizer) if sae.cfg.prepend_bos else None
    ids = ([bos] if bos is not None else []) + list(ids)
    if not ids:
        raise UserError(f"the text {echo(text)} has no tokens")
    return ids[:max_tokens]


def token_ids(lm: HookedLM, strings: list[str] | None, ids: list[int] | None, where: str) -> list[int]:
    """Target tokens: strings that must each be exactly one token of the model, or ids inside its vocabulary."""
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    if ids is not None:
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise UserError(f"{where}: target id {bad[0]} is outside the vocabulary; allowed: 0..{vocab - 1}")
        return list(ids)
    out = []
    for s in strings or []:
        t = lm.tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            pieces = [lm.tokenizer.decode([i]) for i in t]
            raise UserError(f"{where}: target {echo(s)} is {len(t)} tokens of {lm.name} ({pieces}); give one token "
                            "(e.g. with its leading space) or target_ids")
        out.append(t[0])
    return out


@dataclass
class SetActs:
    """One set's texts through one SAE: token ids and the watched features' activations per token."""

    texts: list[str]
    ids: list[list[int]]
    features: list[int]  # watched features, the columns of acts
    acts: list[np.ndarray]  # per text (T, n_features) float32

    def col(self, features: list[int]) -> list[int]:
        return [self.features.index(f) for f in features]


def encode_set(lm: HookedLM, sae: SAE, texts: list[str], features: list[int], max_tokens: int,
               tick: Callable[[int], None] = lambda n: None) -> SetActs:
    seqs = [tokenize(lm, sae, t, max_tokens) for t in texts]
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else (lm.tokenizer.eos_token_id or 0)
    acts: list[np.ndarray] = []
    for start in range(0, len(seqs), CHECK.batch_size):
        batch = seqs[start:start + CHECK.batch_size]
        T = max(len(s) for s in batch)
        ids = np.full((len(batch), T), pad, dtype=np.int32)
        mask = np.zeros((len(batch), T), dtype=np.int64)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        z = encode_batch(lm, sae, ids, sae.cfg.hook_name, attention_mask=torch.from_numpy(mask))  # (B, T, d_sae)
        sub = z[..., features].float().cpu().numpy()
        acts.extend(sub[i, :len(s)] for i, s in enumerate(batch))
        tick(len(batch))
    return SetActs(texts, seqs, list(features), acts)


def _strs(lm: HookedLM, ids: list[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def _firing(sa: SetActs, features: list[int], threshold: float) -> list[dict[str, Any]]:
    """Per text: does any of the features reach the threshold (and > 0) on any token; its max, feature, position."""
    cols = sa.col(features)
    out = []
    for i, a in enumerate(sa.acts):
        sub = a[:, cols]  # (T, n)
        on = (sub >= threshold) & (sub > 0)
        t, j = np.unravel_index(int(sub.argmax()), sub.shape)
        out.append({"index": i, "active": bool(on.any()), "max_act": float(sub[t, j]), "feature": features[j],
                    "position": int(t), "n_active_tokens": int(on.any(1).sum())})
    return out


def _evidence(lm: HookedLM, sa: SetActs, rows: list[dict[str, Any]], features: list[int], set_name: str,
              prefer_active: bool = True) -> list[dict[str, Any]]:
    """The texts shown as evidence (the active ones first, at most CHECK.evidence_texts): tokens and per-token
    activation (the max over the check's features), plus the exact text."""
    cols = sa.col(features)
    order = sorted(rows, key=lambda r: (not r["active"]) if prefer_active else r["active"])
    out = []
    for r in order[:CHECK.evidence_texts]:
        i = r["index"]
        a = sa.acts[i][:, cols]
        out.append({**r, "set": set_name, "text": sa.texts[i], "tokens": _strs(lm, sa.ids[i]),
                    "acts": [float(v) for v in a.max(1)]})
    return out


def _pct(rows: list[dict[str, Any]]) -> float:
    return 100.0 * sum(r["active"] for r in rows) / len(rows)


def run_fires(lm: HookedLM, spec: CheckSpec, get: Callable[[str], SetActs]) -> CheckResult:
    p = spec.params
    feats, thr = p["features"], p["threshold"]
    on = _firing(get(p["on"]), feats, thr)
    pct_on = _pct(on)
    measured: dict[str, Any] = {"on_pct": pct_on, "on_active": sum(r["active"] for r in on), "on_texts": len(on),
                                "per_text_on": on}
    expected: dict[str, Any] = {"features": feats, "threshold": thr, "on": p["on"], "min_pct": p["min_pct"]}
    ok = pct_on >= p["min_pct"]
    summary = f"active on {pct_on:.1f}% of {p['on']!r} (needs >= {p['min_pct']:g}%)"
    evidence = _evidence(lm, get(p["on"]), on, feats, p["on"])
    if "off" in p:
        off = _firing(get(p["off"]), feats, thr)
        pct_off = _pct(off)
        measured.update(off_pct=pct_off, off_active=sum(r["active"] for r in off), off_texts=len(off), per_text_off=off)
        expected.update(off=p["off"], max_pct=p["max_pct"])
        ok = ok and pct_off <= p["max_pct"]
        summary += f"; on {pct_off:.1f}% of {p['off']!r} (needs <= {p['max_pct']:g}%)"
        evidence += _evidence(lm, get(p["off"]), off, feats, p["off"])
    return CheckResult(spec.name, spec.kind, spec.sae_id, spec.line, ok, summary, expected, measured, evidence)


def run_monitor(lm: HookedLM, spec: CheckSpec, get: Callable[[str], SetActs]) -> CheckResult:
    p = spec.params
    rows = _firing(get(p["texts"]), p["features"], p["threshold"])
    pct = _pct(rows)
    lo = p.get("min_pct", 0.0)
    ok = lo <= pct <= p["max_pct"]
    tripped = [r["index"] for r in rows if r["active"]]
    summary = (f"fired on {pct:.1f}% of {p['texts']!r} ({len(tripped)} of {len(rows)} texts; allowed "
               f"{lo:g}%..{p['max_pct']:g}%)")
    return CheckResult(spec.name, spec.kind, spec.sae_id, spec.line, ok, summary,
                       {"features": p["features"], "threshold": p["threshold"], "texts": p["texts"], "min_pct": lo,
                        "max_pct": p["max_pct"]},
                       {"pct": pct, "tripped": tripped, "n_texts": len(rows), "per_text": rows},
                       _evidence(lm, get(p["texts"]), rows, p["features"], p["texts"]))


@torch.no_grad()
def run_ablation(lm: HookedLM, sae: SAE, spec: CheckSpec, texts: list[str], max_tokens: int,
                 tick: Callable[[int], None]) -> CheckResult:
    """Per prompt one batch of 2 through the splice (clean row, ablated row), as ablation_effects runs it, but only
    the last position's logits are computed: the prediction of the target after the prompt."""
    p = spec.params
    targets = token_ids(lm, p.get("targets"), p.get("target_ids"), f"check {spec.name!r}")
    feats = p["features"]
    rows = []
    for i, text in enumerate(texts):
        ids = tokenize(lm, sae, text, max_tokens)
        edits = validate_edits([Edit(f, "ablate") for f in feats], sae.cfg.d_sae, len(ids))
        with splice(lm, sae, [(), edits], feats) as s:
            out = lm.model(input_ids=torch.tensor(ids)[None].expand(2, -1).to(lm.device), use_cache=False,
                           logits_to_keep=1)
        lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # (2, vocab)
        acts = s.records[0][0]  # (T, n_features): the clean activations of the ablated features
        for tgt in targets:
            rows.append({"index": i, "text": text, "target_id": tgt, "target": lm.tokenizer.decode([tgt]),
                         "clean_logprob": float(lp[0, tgt]), "delta_logprob": float(lp[1, tgt] - lp[0, tgt]),
                         "tokens": _strs(lm, ids), "feature_acts": {str(f): acts[:, j].tolist() for j, f in enumerate(feats)}})
        tick(1)
    mean = float(np.mean([r["delta_logprob"] for r in rows]))
    need = -p["min_nats"] if p["direction"] == "lower" else p["min_nats"]
    ok = mean <= need if p["direction"] == "lower" else mean >= need
    word = "lowers" if p["direction"] == "lower" else "raises"
    summary = (f"ablating {feats} changes log p(target) by {mean:+.4f} nats on average over {len(rows)} "
               f"prompt-target pairs (needs: {word} it by >= {p['min_nats']:g}, i.e. {'<=' if need <= 0 else '>='} "
               f"{need:+g})")
    return CheckResult(spec.name, spec.kind, spec.sae_id, spec.line, ok, summary,
                       {"features": feats, "targets": targets, "direction": p["direction"],
                        "min_nats": p["min_nats"], "prompts": p["prompts"]},
                       {"mean_delta_logprob": mean, "n_pairs": len(rows)},
                       rows[:CHECK.evidence_texts * max(1, len(targets))])


@torch.no_grad()
def run_steering(lm: HookedLM, sae: SAE, spec: CheckSpec, texts: list[str], max_tokens: int,
                 tick: Callable[[int], None]) -> CheckResult:
    p = spec.params
    f, s = p["features"][0], p["strength"]
    edit = Edit(f, "add", s)
    rows = []
    if p["expect"] == "prob_up":
        tgt = token_ids(lm, p.get("target"), p.get("target_ids"), f"check {spec.name!r}")[0]
        for i, text in enumerate(texts):
            ids = tokenize(lm, sae, text, max_tokens)
            t = torch.tensor(ids)[None].expand(2, -1)
            logits = run_with_edits(lm, sae, t, [(), (edit,)], logits_to_keep=1)[:, -1]  # (2, vocab)
            prob = torch.softmax(logits, dim=-1)[:, tgt].tolist()
            rows.append({"index": i, "text": text, "tokens": _strs(lm, ids), "p_default": prob[0],
                         "p_steered": prob[1], "increase": prob[1] - prob[0]})
            tick(1)
        mean = float(np.mean([r["increase"] for r in rows]))
        ok = mean > 0 and mean >= p["min_prob_increase"]
        summary = (f"adding feature {f} x {s:g} changes p({lm.tokenizer.decode([tgt])!r}) by {mean:+.4g} on average "
                   f"over {len(rows)} prompts (needs > 0 and >= {p['min_prob_increase']:g})")
        measured = {"mean_increase": mean, "n_prompts": len(rows)}
        expected = {"feature": f, "strength": s, "target_id": tgt, "min_prob_increase": p["min_prob_increase"]}
    else:
        n = p["max_new_tokens"]
        for i, text in enumerate(texts):
            ids = tokenize(lm, sae, text, max_tokens)
            g = generate(lm, sae, ids, [edit], n, Sampling())
            assert g.default is not None
            rows.append({"index": i, "text": text, "tokens": _strs(lm, ids), "default": g.default.text,
                         "steered": g.steered.text, "default_ids": g.default.ids, "steered_ids": g.steered.ids,
                         "changed": g.default.ids != g.steered.ids})
            tick(1)
        pct = 100.0 * sum(r["changed"] for r in rows) / len(rows)
        ok = pct >= p["min_pct"]
        summary = (f"adding feature {f} x {s:g} changed the greedy {n}-token continuation of {pct:.1f}% of "
                   f"{len(rows)} prompts (needs >= {p['min_pct']:g}%)")
        measured = {"changed_pct": pct, "n_prompts": len(rows)}
        expected = {"feature": f, "strength": s, "max_new_tokens": n, "min_pct": p["min_pct"]}
    expected["prompts"] = p["prompts"]
    return CheckResult(spec.name, spec.kind, spec.sae_id, spec.line, ok, summary, expected, measured,
                       rows[:CHECK.evidence_texts])
