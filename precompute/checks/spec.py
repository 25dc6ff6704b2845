"""The check file: TOML parsed with tomllib and validated against the store's SAE rows BEFORE any model loads.

    sae = "tiny"                    # optional: the SAE of every check that names none (default: the store's only SAE)
    max_tokens = 128                # optional: tokens per text (longer texts are cut; BOS included)

    [sets.code]                     # a named set of texts: exactly one of
    texts = ["def f(x):", "..."]    #   inline texts
    # file = "code.txt"             #   a file: .txt one text per line, .jsonl one {"text": ...} per line
    # dataset = "default"           #   a dataset (as --dataset), with n = how many of its texts

    [[check]]
    name = "code feature fires on code"
    kind = "fires"                  # fires | ablation | steering | monitor
    features = [12]                 # (or feature = 12) fires: ANY of them counts
    threshold = 0.5                 # active means activation >= threshold (and > 0) on some token of the text
    on = "code"                     # set A ...
    min_pct = 80                    # ... where at least this % of the texts must be active
    off = "prose"                   # optional set B ...
    max_pct = 10                    # ... where at most this % may be

    [[check]]  kind = "ablation":  features, prompts (a set), targets = [" the"] (single tokens) or target_ids,
               direction = "lower" | "raise", min_nats: mean change of log p(target) at the prompt's last position
    [[check]]  kind = "steering":  feature, strength, prompts, and either target = " the" with min_prob_increase
               (mean increase of p(target) at the last position, 0..1) or expect = "output_changes" with min_pct
               (share of prompts whose greedy continuation of max_new_tokens changes)
    [[check]]  kind = "monitor":   features, threshold, texts (a set), max_pct (and optionally min_pct): the share of
               texts on which any of the features fires must stay within bounds; the texts that trip it are reported

Every error names the file, the line, the check and what is allowed (saescope.precompute.errors.UserError).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import CHECK, LIMITS
from ..errors import UserError, echo

KINDS = ("fires", "ablation", "steering", "monitor")
TOP_KEYS = ("sae", "max_tokens", "sets", "check")
SET_SOURCES = ("texts", "file", "dataset")
DIRECTIONS = ("lower", "raise")
EXPECTS = ("prob_up", "output_changes")


@dataclass
class TextSet:
    name: str
    texts: list[str]
    source: str  # where they came from (inline, a file, a dataset)


@dataclass
class CheckSpec:
    name: str
    kind: str
    line: int  # line of its [[check]] header
    sae_id: str
    params: dict[str, Any]  # validated and normalised (features always a list)

    def sets(self) -> list[str]:
        return [self.params[k] for k in ("on", "off", "prompts", "texts") if self.params.get(k)]


@dataclass
class CheckFile:
    path: Path
    text: str  # the file as read (its sha256 goes into the provenance)
    max_tokens: int
    sets: dict[str, TextSet]
    checks: list[CheckSpec] = field(default_factory=list)


# ------------------------------------------------------------------ line lookup
class _Lines:
    """Where things are in the file text: [[check]] headers, [sets.X] headers, `key =` lines inside a block."""

    HEADER = re.compile(r"^\s*\[\[\s*check\s*\]\]")
    TABLE = re.compile(r"^\s*\[")

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.checks = [i for i, l in enumerate(self.lines) if self.HEADER.match(l)]

    def _block_end(self, start: int) -> int:
        for j in range(start + 1, len(self.lines)):
            if self.TABLE.match(self.lines[j]):
                return j
        return len(self.lines)

    def check(self, i: int) -> int:
        return self.checks[i] + 1 if i < len(self.checks) else 0

    def key(self, i: int, key: str) -> int:
        """1-based line of `key = ...` in check i (its header line when the key is absent)."""
        if i >= len(self.checks):
            return 0
        start = self.checks[i]
        pat = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for j in range(start + 1, self._block_end(start)):
            if pat.match(self.lines[j]):
                return j + 1
        return start + 1

    def top(self, key: str) -> int:
        pat = re.compile(rf"^\s*(\[\s*)?[\"']?{re.escape(key)}[\"']?\s*(=|\.|\])")
        for j, l in enumerate(self.lines):
            if self.checks and j >= self.checks[0]:
                break
            if pat.match(l):
                return j + 1
        return 0

    def set_line(self, name: str) -> int:
        pat = re.compile(rf"^\s*\[\s*sets\s*\.\s*[\"']?{re.escape(name)}[\"']?\s*\]|^\s*[\"']?{re.escape(name)}[\"']?\s*=")
        for j, l in enumerate(self.lines):
            if pat.match(l):
                return j + 1
        return self.top("sets")


# ------------------------------------------------------------------ value validators (raise ValueError(allowed))
def _num(lo: float, hi: float, *, lo_open: bool = False, nonzero: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (lo < v if lo_open else lo <= v) and v <= hi and not (nonzero and v == 0)
        if not ok:
            allowed = f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}" + (", not 0" if nonzero else "")
            raise ValueError(allowed)
        return float(v)
    return check


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"a whole number from {lo} to {hi}")
        return v
    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"one of {', '.join(repr(o) for o in options)}")
        return v
    return check


def _tokens(v: Any) -> list[str]:
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list) or not vals or not all(isinstance(t, str) and t for t in vals):
        raise ValueError("a non-empty string or list of non-empty strings (each one token of the model)")
    return list(vals)


def _ids(v: Any) -> list[int]:
    vals = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(vals, list) or not vals or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                         for t in vals):
        raise ValueError("a token id or a non-empty list of token ids (whole numbers >= 0)")
    return list(vals)


PCT = _num(0, 100)
THRESHOLD = _num(0, CHECK.max_threshold)
# per kind: key -> (validator, required); "features"/"feature" and the set keys are handled apart
FIELDS: dict[str, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    "fires": {"threshold": (THRESHOLD, True), "min_pct": (PCT, True), "max_pct": (PCT, False)},
    "ablation": {"direction": (_choice(DIRECTIONS), True), "min_nats": (_num(0, CHECK.max_nats), True),
                 "targets": (_tokens, False), "target_ids": (_ids, False)},
    "steering": {"strength": (_num(-LIMITS.max_abs_value, LIMITS.max_abs_value, nonzero=True), True),
                 "expect": (_choice(EXPECTS), False), "target": (_tokens, False), "target_ids": (_ids, False),
                 "min_prob_increase": (_num(0, 1), False), "min_pct": (PCT, False),
                 "max_new_tokens": (_int(1, LIMITS.max_new_tokens), False)},
    "monitor": {"threshold": (THRESHOLD, True), "max_pct": (PCT, True), "min_pct": (PCT, False)},
}
SET_KEYS = {"fires": ("on", "off"), "ablation": ("prompts",), "steering": ("prompts",), "monitor": ("texts",)}
REQUIRED_SETS = {"fires": ("on",), "ablation": ("prompts",), "steering": ("prompts",), "monitor": ("texts",)}
COMMON = ("name", "kind", "sae", "features", "feature", "description")


# ------------------------------------------------------------------ loading
def _read_set(name: str, raw: Any, base: Path, where: str) -> TextSet:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: set {name!r} must be a table with one of {', '.join(SET_SOURCES)}")
    given = [k for k in SET_SOURCES if k in raw]
    extra = sorted(set(raw) - set(SET_SOURCES) - {"n", "text_field"})
    if len(given) != 1 or extra:
        raise UserError(f"{where}: set {name!r} has {', '.join(sorted(raw)) or 'nothing'}; give exactly one of "
                        f"{', '.join(SET_SOURCES)} (dataset also takes n and text_field)")
    src = given[0]
    if src == "texts":
        texts = raw["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise UserError(f"{where}: set {name!r}: texts must be a non-empty list of non-empty strings")
        return TextSet(name, list(texts), "inline")
    if src == "file":
        if not isinstance(raw["file"], str):
            raise UserError(f"{where}: set {name!r}: file must be a path (relative to the check file)")
        p = (base / raw["file"]).resolve()
        if not p.is_file():
            raise UserError(f"{where}: set {name!r}: no file {p}")
        lines = [l for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
        if p.suffix == ".jsonl":
            try:
                texts = [json.loads(l)[raw.get("text_field", "text")] for l in lines]
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{where}: set {name!r}: {p} is not JSONL with a "
                                f"{raw.get('text_field', 'text')!r} field ({err})") from None
        else:
            texts = lines
        if not texts:
            raise UserError(f"{where}: set {name!r}: {p} holds no texts")
        return TextSet(name, [str(t) for t in texts], str(p))
    n = raw.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= CHECK.max_texts:
        raise UserError(f"{where}: set {name!r}: a dataset needs n = how many texts, from 1 to {CHECK.max_texts:,}")
    from ..data import iter_texts

    ds = raw["dataset"]
    if not isinstance(ds, str):
        raise UserError(f"{where}: set {name!r}: dataset must be 'default', a file or a HF dataset id")
    if ds != "default" and not ds.startswith(("hf:",)) and not Path(ds).is_absolute() and (base / ds).exists():
        ds = str((base / ds).resolve())
    texts = []
    for t in iter_texts(ds, raw.get("text_field", "text")):
        if t.strip():
            texts.append(t)
        if len(texts) >= n:
            break
    return TextSet(name, texts, f"dataset {ds} (first {len(texts)} texts)")


def load_check_file(path: Path | str, saes: dict[str, int]) -> CheckFile:
    """Parse and validate a check file. `saes`: SAE id -> d_sae of the store (its rows; no model is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no check file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {err}") from None
    L = _Lines(text)
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path} line {L.top(unknown[0])}: unknown top-level key {unknown[0]!r}; allowed: "
                        f"{', '.join(TOP_KEYS)}")
    max_tokens = doc.get("max_tokens", CHECK.max_tokens)
    try:
        max_tokens = _int(2, LIMITS.max_prompt_tokens)(max_tokens)
    except ValueError as why:
        raise UserError(f"{path} line {L.top('max_tokens')}: max_tokens {echo(max_tokens)} is out of range; "
                        f"allowed: {why}") from None
    default_sae = doc.get("sae")
    if default_sae is not None and default_sae not in saes:
        raise UserError(f"{path} line {L.top('sae')}: there is no SAE {echo(default_sae)} in the store; valid: "
                        f"{', '.join(saes) or 'none'}")
    raw_sets = doc.get("sets", {})
    if not isinstance(raw_sets, dict):
        raise UserError(f"{path} line {L.top('sets')}: sets must be tables, e.g. [sets.code] texts = [...]")
    sets = {name: _read_set(name, raw, path.parent, f"{path} line {L.set_line(name)}") for name, raw in raw_sets.items()}
    raw_checks = doc.get("check", [])
    if not isinstance(raw_checks, list) or not raw_checks:
        raise UserError(f"{path} has no checks; add [[check]] tables (kind one of {', '.join(KINDS)})")
    out = CheckFile(path, text, max_tokens, sets)
    names: set[str] = set()
    for i, raw in enumerate(raw_checks):
        out.checks.append(_check(path, L, i, raw, saes, default_sae, sets, names))
    return out


def _check(path: Path, L: _Lines, i: int, raw: dict, saes: dict[str, int], default_sae: str | None,
           sets: dict[str, TextSet], names: set[str]) -> CheckSpec:
    name = raw.get("name")
    label = f"check {i + 1}" if not isinstance(name, str) else f"check {name!r}"

    def fail(key: str | None, msg: str) -> UserError:
        line = L.key(i, key) if key else L.check(i)
        return UserError(f"{path} line {line}, {label}: {msg}")

    if not isinstance(name, str) or not name.strip():
        raise fail("name", "needs name = \"...\" (a non-empty string)")
    if name in names:
        raise fail("name", f"the name {echo(name)} is used twice; every check needs its own name")
    names.add(name)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise fail("kind", f"unknown kind {echo(kind)}; allowed: {', '.join(KINDS)}")
    allowed = set(COMMON) | set(FIELDS[kind]) | set(SET_KEYS[kind])
    extra = sorted(set(raw) - allowed)
    if extra:
        raise fail(extra[0], f"unknown key {extra[0]!r} for kind {kind!r}; allowed: {', '.join(sorted(allowed))}")
    sae_id = raw.get("sae", default_sae)
    if sae_id is None:
        if len(saes) != 1:
            raise fail("sae", f"the store has {len(saes)} SAEs; say which: sae = one of {', '.join(saes)}")
        sae_id = next(iter(saes))
    if sae_id not in saes:
        raise fail("sae", f"there is no SAE {echo(sae_id)} in the store; valid: {', '.join(saes) or 'none'}")
    d_sae = saes[sae_id]
    params: dict[str, Any] = {}
    # features
    if ("features" in raw) == ("feature" in raw):
        raise fail("features", "give features = [F, ...] or feature = F (one of them)")
    key = "features" if "features" in raw else "feature"
    feats = raw[key] if key == "features" else [raw[key]]
    if not isinstance(feats, list) or not feats or len(feats) > CHECK.max_features:
        raise fail(key, f"{key} must list 1 to {CHECK.max_features} feature indices")
    for f in feats:
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae:
            raise fail(key, f"feature {echo(f)} is not a feature of {sae_id}; allowed: 0..{d_sae - 1}")
    if kind == "steering" and len(feats) != 1:
        raise fail(key, "steering adds one feature: give feature = F")
    params["features"] = list(dict.fromkeys(feats))
    for k, (check, required) in FIELDS[kind].items():
        if k not in raw:
            if required:
                raise fail(None, f"needs {k} ({_allowed(check)})")
            continue
        try:
            params[k] = check(raw[k])
        except ValueError as why:
            raise fail(k, f"{k} {echo(raw[k])} is out of range; allowed: {why}") from None
    for k in SET_KEYS[kind]:
        if k not in raw:
            if k in REQUIRED_SETS[kind]:
                raise fail(None, f"needs {k} = the name of a set of texts ([sets.NAME]); sets: "
                                 f"{', '.join(sets) or 'none defined'}")
            continue
        if raw[k] not in sets:
            raise fail(k, f"{k} names the set {echo(raw[k])}, which is not defined; sets: {', '.join(sets) or 'none'}")
        params[k] = raw[k]
    _kind_rules(kind, params, fail)
    params["description"] = str(raw.get("description", ""))
    return CheckSpec(name=name, kind=kind, line=L.check(i), sae_id=sae_id, params=params)


def _allowed(check: Callable[[Any], Any]) -> str:
    try:
        check(object())
    except ValueError as why:
        return str(why)
    return "a value"


def _kind_rules(kind: str, p: dict[str, Any], fail: Callable[[str | None, str], UserError]) -> None:
    if kind == "fires" and ("off" in p) != ("max_pct" in p):
        raise fail("off", "set B needs both off = SET and max_pct = P (at most P% of its texts active)")
    if kind == "monitor" and p.get("min_pct", 0) > p["max_pct"]:
        raise fail("min_pct", f"min_pct {p['min_pct']:g} is above max_pct {p['max_pct']:g}; allowed: min_pct <= max_pct")
    if kind == "ablation" and ("targets" in p) == ("target_ids" in p):
        raise fail("targets", "give targets = [\" token\", ...] or target_ids = [ID, ...] (one of them)")
    if kind == "steering":
        expect = p.setdefault("expect", "prob_up" if ("target" in p or "target_ids" in p) else "output_changes")
        if expect == "prob_up":
            if ("target" in p) == ("target_ids" in p):
                raise fail("target", "expect = \"prob_up\" needs target = \" token\" or target_ids = [ID] (one of them)")
            p.setdefault("min_prob_increase", 0.0)
        else:
            if "target" in p or "target_ids" in p or "min_prob_increase" in p:
                raise fail("expect", "expect = \"output_changes\" takes min_pct (and max_new_tokens), not a target")
            p.setdefault("min_pct", CHECK.steer_min_pct)
            p.setdefault("max_new_tokens", CHECK.steer_new_tokens)
