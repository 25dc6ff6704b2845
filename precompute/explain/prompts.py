"""Prompts for explaining SAE features with an LLM and for scoring the explanations, as EleutherAI's delphi does.

The method follows delphi (github.com/EleutherAI/delphi); the prompt sentences and few-shot examples are our own.

* Explainer (delphi's DefaultExplainer): each example is a short window of text in which the tokens where the
  feature is active (activation > 0.3 x the example's maximum) are wrapped in << >>; with activations on (delphi's
  default) a line follows listing those tokens with their strength on a 0-10 scale (ceil(10 * act / feature max)).
  Three invented few-shot exchanges show the format; the answer's last line is "[EXPLANATION]: ...".
* Detection: unmarked held-out snippets, activating and non-activating shuffled together, five per prompt; the judge
  answers a Python list of 1/0 ("would the described feature fire somewhere here?").
* Fuzzing: held-out activating snippets with their truly active tokens marked, and non-activating snippets with as
  many randomly chosen tokens marked (the mean number of active tokens per activating window, rounded up); the
  judge answers 1 if every marked token fits the explanation.

Held-out rule: examples shown to the explainer are never scored (`split_material` dedupes by context), and the
non-activating snippets come only from the caller's contexts where the feature is 0 on every token.

Rendering: a snippet is the concatenation of its token strings, with newlines and tabs written as the two
characters "\\n" and "\\t" so every snippet stays on one line of the prompt, and special-token strings such as
BOS or "<|im_start|>" dropped (delphi filters BOS too).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ..config import EXPLAIN
from ..errors import UserError

PROMPT_VERSION = "saescope-delphi-1"  # bump whenever any prompt text, window or marking rule below changes

OPEN, CLOSE = "<<", ">>"


# ---------------------------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class Example:
    """One context: its token strings and the feature's activation on each token."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]

    def __init__(self, tokens: Sequence[str], acts: Sequence[float]):
        tokens, acts = tuple(str(t) for t in tokens), tuple(float(a) for a in acts)
        if len(tokens) != len(acts):
            raise UserError(f"an example needs one activation per token; got {len(tokens)} tokens, {len(acts)} acts")
        if not tokens:
            raise UserError("an example needs at least one token")
        if not all(math.isfinite(a) for a in acts):
            raise UserError("example activations must be finite numbers")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "acts", acts)

    @property
    def max_act(self) -> float:
        return max(self.acts)

    @property
    def argmax(self) -> int:
        return max(range(len(self.acts)), key=self.acts.__getitem__)


@dataclass(frozen=True)
class FeatureMaterial:
    """What is stored for one feature: top examples, quantile/interval samples (one list per group) and contexts
    where the feature is zero on every token (tokens only)."""

    top: list[Example]
    quantiles: list[list[Example]] = field(default_factory=list)
    non_activating: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class HeldOutSplit:
    """Examples for the explainer and disjoint ones for the scorers."""

    explain: list[Example]  # shown to the explainer
    test: list[Example]  # activating, held out (never shown to the explainer)
    test_groups: list[int]  # quantile group of each test example
    non_activating: list[list[str]]  # token strings of contexts where the feature is 0 everywhere


@dataclass(frozen=True)
class ExplainConfig:
    """Every knob of explaining and scoring, in one place (delphi's defaults where they apply)."""

    n_top: int = EXPLAIN.n_top  # top examples shown to the explainer
    per_group_explain: int = EXPLAIN.per_group_explain  # examples taken from each quantile group for the explainer
    n_test: int = EXPLAIN.n_test  # held-out activating examples scored at most (delphi: n_examples_test = 50)
    n_non_activating: int | None = None  # non-activating snippets scored; None = as many as activating ones
    left: int = 24  # tokens kept left of an example's maximum (delphi: 32-token windows)
    right: int = 8  # tokens kept right of it
    threshold: float = 0.3  # a token is "active" above this fraction of the example's maximum (delphi: 0.3)
    show_activations: bool = True  # list active tokens with 0-10 strengths (delphi's default explainer)
    max_listed: int = 10  # active tokens listed per example at most
    n_per_prompt: int = 5  # snippets judged per scoring prompt (delphi: num_examples_per_scorer_prompt = 5)
    explain_max_tokens: int = EXPLAIN.explain_max_tokens  # answer budget for the explainer
    judge_max_tokens: int | None = None  # answer budget per scoring prompt; None = 3 * n_per_prompt + 4

    def __post_init__(self) -> None:
        for name in ("n_top", "per_group_explain", "n_test", "left", "right", "max_listed", "n_per_prompt",
                     "explain_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UserError(f"{name} must be a non-negative integer; got {v!r}")
        if self.n_per_prompt < 1:
            raise UserError(f"n_per_prompt must be at least 1; got {self.n_per_prompt}")
        if not 0.0 <= self.threshold < 1.0:
            raise UserError(f"threshold must be in [0, 1); got {self.threshold}")
        if self.judge_max_tokens is not None and self.judge_max_tokens < 1:
            raise UserError(f"judge_max_tokens must be None or >= 1; got {self.judge_max_tokens}")
        if self.n_non_activating is not None and self.n_non_activating < 0:
            raise UserError(f"n_non_activating must be None or >= 0; got {self.n_non_activating}")

    @property
    def judge_tokens(self) -> int:
        """Answer budget of a scoring prompt: a list of n_per_prompt bits is about 2 tokens per bit."""
        return self.judge_max_tokens if self.judge_max_tokens is not None else 3 * self.n_per_prompt + 4

    @property
    def width(self) -> int:
        return self.left + self.right + 1


def zero_contexts(examples: Iterable[Example]) -> list[list[str]]:
    """Token strings of the given contexts on which the feature is 0 on every token (the others are dropped)."""
    return [list(ex.tokens) for ex in examples if all(a == 0.0 for a in ex.acts)]


def material_from_contexts(contexts: Sequence[Sequence[str]], acts: Sequence[Sequence[float]], n_top: int = EXPLAIN.n_top,
                           n_groups: int = 10, per_group: int = 5, seed: int = 0) -> FeatureMaterial:
    """Material for one feature from contexts and its activations on them (e.g. computed live): the n_top
    contexts with the highest maximum, then the other activating contexts cut by rank into n_groups equal groups
    with per_group random picks from each (delphi's quantile sampling), and every all-zero context as non-activating."""
    if len(contexts) != len(acts):
        raise UserError(f"got {len(contexts)} contexts but {len(acts)} activation rows")
    examples = [Example(toks, a) for toks, a in zip(contexts, acts)]
    active = sorted((ex for ex in examples if ex.max_act > 0), key=lambda ex: -ex.max_act)
    rest = active[n_top:]
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        chunk = rest[g * len(rest) // n_groups:(g + 1) * len(rest) // n_groups]
        if chunk:
            groups.append(rng.sample(chunk, min(per_group, len(chunk))))
    return FeatureMaterial(top=active[:n_top], quantiles=groups, non_activating=zero_contexts(examples))


def split_material(material: FeatureMaterial, cfg: ExplainConfig = ExplainConfig(), seed: int = 0) -> HeldOutSplit:
    """Top examples (and `per_group_explain` random ones per quantile group) go to the explainer; the remaining
    quantile examples are held out for scoring. A context (its exact token sequence) is used at most once, so
    nothing shown to the explainer is ever scored. Held-out examples that never activate are dropped."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    explain: list[Example] = []
    for ex in material.top[: cfg.n_top]:
        if ex.tokens not in seen:
            seen.add(ex.tokens)
            explain.append(ex)
    groups = []
    for group in material.quantiles:
        fresh = [ex for ex in group if ex.tokens not in seen]
        rng.shuffle(fresh)
        for ex in fresh[: cfg.per_group_explain]:
            seen.add(ex.tokens)
            explain.append(ex)
        groups.append(fresh[cfg.per_group_explain:])
    test: list[Example] = []
    test_groups: list[int] = []
    for g, rest in enumerate(groups):
        for ex in rest:
            if ex.tokens in seen or ex.max_act <= 0.0:
                continue
            seen.add(ex.tokens)
            test.append(ex)
            test_groups.append(g)
    if len(test) > cfg.n_test:  # keep every group represented: take evenly spaced ones
        keep = sorted({round(i * (len(test) - 1) / max(cfg.n_test - 1, 1)) for i in range(cfg.n_test)})
        test, test_groups = [test[i] for i in keep], [test_groups[i] for i in keep]
    non_act = [list(toks) for toks in material.non_activating if tuple(toks) not in seen]
    return HeldOutSplit(explain, test, test_groups, non_act)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def window(ex: Example, left: int, right: int) -> Example:
    """The example cut to `left` tokens before its maximum and `right` after it (delphi centres its examples)."""
    i = ex.argmax
    lo, hi = max(0, i - left), min(len(ex.tokens), i + right + 1)
    return Example(ex.tokens[lo:hi], ex.acts[lo:hi])


def random_window(tokens: Sequence[str], width: int, rng: random.Random) -> list[str]:
    """A random run of `width` tokens (all of them if shorter)."""
    if len(tokens) <= width:
        return list(tokens)
    start = rng.randrange(0, len(tokens) - width + 1)
    return list(tokens[start:start + width])


_CONTROL = re.compile(r"<\|[^|<>\s]*\|>|</?s>|<(?:bos|eos|pad|unk)>")  # chat/special token strings


def _show(tok: str) -> str:
    """A token as shown in a prompt: special-token strings (BOS, <|im_start|>, ...) removed, so a snippet can never
    open a new chat turn when the server tokenizes it; newlines, tabs and CRs written as escapes."""
    tok = _CONTROL.sub("", tok)
    return tok.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def render(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """Concatenate token strings on one line; runs of marked tokens are wrapped in << >>."""
    out: list[str] = []
    inside = False
    for i, tok in enumerate(tokens):
        m = bool(marked[i]) if marked is not None else False
        if m and not inside:
            out.append(OPEN)
        elif inside and not m:
            out.append(CLOSE)
        inside = m
        out.append(_show(tok))
    if inside:
        out.append(CLOSE)
    return "".join(out)


def active_mask(ex: Example, threshold: float) -> list[bool]:
    """Tokens at or above `threshold` x the example's maximum (delphi's scorer rule); nothing if it never fires."""
    cut = threshold * ex.max_act
    return [a > 0.0 and a >= cut for a in ex.acts]


# ---------------------------------------------------------------------------------------------------------------
# explainer prompt

EXPLAINER_SYSTEM = """You study one feature inside a language model and describe in a few words what it responds to.

You will see numbered text snippets. Tokens where the feature is active are wrapped in << and >>; neighbouring active tokens share one pair of markers. After a snippet, a line may list its active tokens with a strength from 1 (weak) to 10 (strongest).

- Say what the marked tokens have in common: a word, a kind of word, a symbol, a topic, or the context around them.
- Give one short description, not a list of options, and do not mention the << >> markers.
- The last line of your answer must be "[EXPLANATION]: " followed by the description."""

_FEW_SHOT_EXPLAIN = [
    (
        'Example 1: we waited nearly 3 <<minutes>> before the door opened\n'
        'Activations: ("minutes", 9)\n'
        'Example 2: the soup should simmer for two <<hours>> on a low heat\n'
        'Activations: ("hours", 10)\n'
        'Example 3: the alarm rang every 30 <<seconds>> until someone\n'
        'Activations: ("seconds", 8)',
        "[EXPLANATION]: Units of time that follow a number.",
    ),
    (
        'Example 1: total = len(items<<)>> + 1\n'
        'Activations: (")", 10)\n'
        'Example 2: print(name, value<<)>>\\n\n'
        'Activations: (")", 9)\n'
        'Example 3: if check(path<<):>>\\n    return\n'
        'Activations: ("):", 6)',
        "[EXPLANATION]: The closing parenthesis that ends a function call in code.",
    ),
    (
        'Example 1: she stayed home<< because>> it was raining\n'
        'Activations: (" because", 10)\n'
        'Example 2: the test failed<< because>> the file was missing\n'
        'Activations: (" because", 9)\n'
        'Example 3: <<Because>> of the delay, we\n'
        'Activations: ("Because", 7)',
        '[EXPLANATION]: The word "because".',
    ),
]


def explainer_block(examples: Sequence[Example], cfg: ExplainConfig = ExplainConfig()) -> str:
    """The examples as the explainer sees them: windows around each maximum, active tokens marked, strengths."""
    shown = [window(ex, cfg.left, cfg.right) for ex in examples]
    top = max((ex.max_act for ex in examples), default=0.0)
    lines = []
    for n, ex in enumerate(shown, 1):
        cut = cfg.threshold * ex.max_act
        mask = [a > 0.0 and a > cut for a in ex.acts]  # delphi's explainer uses a strict '>'
        lines.append(f"Example {n}: {render(ex.tokens, mask)}")
        if cfg.show_activations and top > 0:
            listed = [(t, min(10, max(0, math.ceil(10 * a / top)))) for t, a, m in zip(ex.tokens, ex.acts, mask) if m]
            if listed:
                lines.append("Activations: " + ", ".join(f'("{_show(t)}", {s})' for t, s in listed[: cfg.max_listed]))
    return "\n".join(lines)


def explainer_messages(examples: Sequence[Example], cfg: ExplainConfig = ExplainConfig()) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of the feature from these (and only these) examples."""
    if not examples:
        raise UserError("need at least one activating example to explain a feature")
    if max(ex.max_act for ex in examples) <= 0.0:
        raise UserError("none of the examples activates the feature; nothing to explain")
    messages = [{"role": "system", "content": EXPLAINER_SYSTEM}]
    for user, answer in _FEW_SHOT_EXPLAIN:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": explainer_block(examples, cfg)})
    return messages


_EXPL_RE = re.compile(r"\[?\s*explanation\s*\]?\s*:\s*(.*)", re.IGNORECASE)


def parse_explanation(text: str, max_chars: int = 300) -> tuple[str, bool]:
    """(explanation, found_marker). The text after the last "[EXPLANATION]:"; without that marker, the first
    non-empty line (a small model often answers bare). Markers, quotes around the whole and spaces are stripped."""
    found = False
    candidate = ""
    for m in _EXPL_RE.finditer(text or ""):
        line = m.group(1).strip().splitlines()[0].strip() if m.group(1).strip() else ""
        if line:
            candidate, found = line, True
    if not found:
        candidate = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    candidate = candidate.replace(OPEN, "").replace(CLOSE, "").strip()
    if len(candidate) >= 2 and candidate[0] == candidate[-1] and candidate[0] in "\"'`":
        candidate = candidate[1:-1].strip()
    return candidate[:max_chars].strip(), found


# ---------------------------------------------------------------------------------------------------------------
# scoring prompts

DETECTION_SYSTEM = """You check descriptions of features of a language model.

You get a description of one feature, such as "the word 'because'" or "text about cooking", and then numbered text snippets. For each snippet in order, answer 1 if the described feature would be active somewhere in it and 0 if not.

Reply with a Python list of 1s and 0s, one per snippet, and nothing else."""

FUZZING_SYSTEM = """You check descriptions of features of a language model.

You get a description of one feature, such as "the word 'because'" or "text about cooking", and then numbered text snippets in which some tokens are wrapped in << and >>. Some snippets are marked correctly and some are not; any mix is possible. A snippet is marked correctly only if every marked token fits the description.

For each snippet in order, answer 1 if it is marked correctly and 0 if not. Reply with a Python list of 1s and 0s, one per snippet, and nothing else."""

_FEW_SHOT_DETECTION = [
    ("Units of time that follow a number.",
     ["we waited nearly 3 minutes before the door", "the function returns a list of", "after about 2 hours the train",
      "import os, sys\\n", "blue sky over the hills"],
     "[1,0,1,0,0]"),
    ('The word "because".',
     ["the river ran fast and cold", "a table of contents", "click the button to save",
      "they sang until dawn", "the data is stored in rows"],
     "[0,0,0,0,0]"),
    ("Closing parenthesis ending a function call in code.",
     ["x = max(a, b) + 1", "print(value)\\n", "n = len(items) - 1", "return f(x)", "assert ok(path)"],
     "[1,1,1,1,1]"),
]

_FEW_SHOT_FUZZING = [
    ("Units of time that follow a number.",
     ["we waited nearly 3 <<minutes>> before the door", "the function <<returns>> a list of",
      "after about 2 <<hours>> the train", "import <<os>>, sys\\n", "every 5 <<seconds>> the light"],
     "[1,0,1,0,1]"),
    ('The word "because".',
     ["the <<river>> ran fast and cold", "a table <<of>> contents", "click the button to <<save>>",
      "they sang <<until>> dawn", "the data is <<stored>> in rows"],
     "[0,0,0,0,0]"),
    ("Closing parenthesis ending a function call in code.",
     ["x = max(a, b<<)>> + 1", "print(value<<)>>\\n", "n = len(items<<)>> - 1", "return f(x<<)>>",
      "assert ok(path<<)>>"],
     "[1,1,1,1,1]"),
]


def _judge_user(explanation: str, snippets: Sequence[str]) -> str:
    body = "\n".join(f"Example {i}: {s}" for i, s in enumerate(snippets))
    return f"Feature description: {explanation}\n\nSnippets:\n{body}"


def _judge_messages(system: str, shots, explanation: str, snippets: Sequence[str]) -> list[dict[str, str]]:
    if not snippets:
        raise UserError("a scoring prompt needs at least one snippet")
    messages = [{"role": "system", "content": system}]
    for expl, snips, answer in shots:
        messages += [{"role": "user", "content": _judge_user(expl, snips)}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": _judge_user(explanation, snippets)})
    return messages


def detection_messages(explanation: str, snippets: Sequence[str]) -> list[dict[str, str]]:
    """Ask which unmarked snippets the described feature fires on."""
    return _judge_messages(DETECTION_SYSTEM, _FEW_SHOT_DETECTION, explanation, snippets)


def fuzzing_messages(explanation: str, snippets: Sequence[str]) -> list[dict[str, str]]:
    """Ask which marked snippets have every marked token fitting the description."""
    return _judge_messages(FUZZING_SYSTEM, _FEW_SHOT_FUZZING, explanation, snippets)


_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n"}
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_BIT = re.compile(r"(?<![\w.])[01](?![\w.])")
_PER_EXAMPLE = re.compile(r"example\s*(\d+)\s*[:=\-]\s*(1|0|yes|no|true|false)\b", re.IGNORECASE)


def parse_judgements(text: str, n: int) -> list[bool | None]:
    """n predictions from a judge's answer, leniently: the first [...] list holding exactly n values read as
    1/0/true/false/yes/no; else "Example i: 1" lines naming each of 0..n-1 once; else exactly n standalone 0/1
    digits anywhere in the text; else n Nones (unparsable)."""
    text = text or ""
    for m in _BRACKET.finditer(text):
        items = [s.strip().strip("'\"`").lower() for s in re.split(r"[,\s;]+", m.group(1)) if s.strip()]
        if len(items) == n and all(s in _TRUE or s in _FALSE for s in items):
            return [s in _TRUE for s in items]
    per = {}
    for m in _PER_EXAMPLE.finditer(text):
        per.setdefault(int(m.group(1)), m.group(2).lower() in _TRUE)
    if sorted(per) == list(range(n)):
        return [per[i] for i in range(n)]
    bits = _BIT.findall(text)
    if len(bits) == n:
        return [b == "1" for b in bits]
    return [None] * n
