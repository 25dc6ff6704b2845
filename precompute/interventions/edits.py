"""The edit model (one intervention on one SAE feature) and the validation of every input an intervention takes:
edits, token ids, the prompt's length. Every refusal is a UserError naming what is allowed (limits: config.LIMITS)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import LIMITS
from ..errors import UserError
from ..models import HookedLM

EDIT_MODES = ("ablate", "clamp", "add", "orthogonal", "cap")
EditMode = Literal["ablate", "clamp", "add", "orthogonal", "cap"]
STEER_MODES = ("add", "orthogonal", "cap")  # the three steering methods of Neuronpedia's inference server
# Neuronpedia's names (its schemas/steer.py NPSteerMethod) -> ours
NEURONPEDIA_METHODS = {"SIMPLE_ADDITIVE": "add", "ORTHOGONAL_DECOMP": "orthogonal", "PROJECTION_CAP": "cap"}
# the strength at which each mode leaves the activation exactly as it is (add 0, orthogonal 1, cap +inf: a cap no
# projection reaches); ablate and clamp always change it
NEUTRAL_VALUE = {"add": 0.0, "orthogonal": 1.0, "cap": math.inf}


@dataclass(frozen=True)
class Edit:
    """One intervention on one SAE feature. positions: absolute token positions (0 = first prompt token); None = all.

    ablate      z_f := 0                          (latent space; un-normalised by the SAE, see splice.py)
    clamp       z_f := value                      (latent space)
    add         h += value * v                    (raw space; Neuronpedia's SIMPLE_ADDITIVE)
    orthogonal  h := (I - P) h + value * P h      (raw space; ORTHOGONAL_DECOMP, P = v v^T / |v|^2)
    cap         h += (min(h.u, value) - h.u) u    (raw space; PROJECTION_CAP: the projection on u = v/|v| is
                                                   capped at value)
    with v = W_dec[f], or v / |v| when normalize (Neuronpedia's normalize_steering; it changes only `add`, since P
    and u depend on the direction alone)."""

    feature: int
    mode: EditMode = "ablate"
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    normalize: bool = False


class PromptLengthError(UserError):
    """A prompt with no token, or more than the limit: the one prompt rule of every intervention and worker route."""

    def __init__(self, n: int, limit: int, why: str = ""):
        self.n, self.limit, self.too_long = n, limit, n > 0
        if n == 0:
            msg = "the prompt is empty: it must contain at least one token after tokenization; got 0"
        else:
            msg = f"prompt has {n} tokens; the limit is {limit}{why}"
        super().__init__(msg)


def check_prompt_length(n: int, limit: int, why: str = "") -> None:
    """The prompt rule: at least one token after tokenization (BOS, when the SAE prepends one, counts), at most
    `limit`. `why` names where a limit lower than the configured one comes from."""
    if n == 0 or n > limit:
        raise PromptLengthError(n, limit, why)


def check_int(name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            ok = not isinstance(v, bool) and float(v) == int(v)  # numpy ints, 3.0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UserError(f"{name} must be an integer in {lo}..{hi}; got {v!r}")
        v = int(v)  # type: ignore[arg-type]
    if not lo <= v <= hi:
        raise UserError(f"{name} {v} is out of range; allowed: {lo}..{hi}")
    return v


def validate_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int, limit: int = LIMITS.max_prompt_tokens) -> torch.Tensor:
    """Token ids as a 1-D long tensor, or UserError naming what is wrong (empty, too long, outside the vocabulary)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise UserError(f"expected one sequence of token ids; got a tensor of shape {tuple(ids.shape)}")
        t = ids.detach().cpu().reshape(-1)
    else:
        try:
            t = torch.tensor(list(ids))
        except (TypeError, ValueError, RuntimeError):
            raise UserError("token ids must be a flat list of integers") from None
    check_prompt_length(t.numel(), limit)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1:
        raise UserError("token ids must be a flat list of integers")
    t = t.long()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UserError(f"token id {bad} is outside the vocabulary; allowed: 0..{vocab_size - 1}")
    return t


def validate_edits(edits: Sequence[Edit], d_sae: int, seq_len: int, *, allow_empty: bool = False) -> tuple[Edit, ...]:
    """Checked edits (positions as sorted tuples) or UserError saying which edit is wrong and what is allowed."""
    edits = tuple(edits)
    if not edits and not allow_empty:
        raise UserError("no edits given; give at least 1 (feature, mode, value)")
    if len(edits) > LIMITS.max_edits:
        raise UserError(f"{len(edits)} edits given; the limit is {LIMITS.max_edits}")
    bound = LIMITS.max_abs_value
    out = []
    for i, e in enumerate(edits):
        if not isinstance(e, Edit):
            raise UserError(f"edit {i} is a {type(e).__name__}; expected an Edit")
        f = check_int(f"edit {i}: feature", e.feature, 0, d_sae - 1)
        if e.mode not in EDIT_MODES:
            raise UserError(f"edit {i}: unknown mode {e.mode!r}; valid: {', '.join(EDIT_MODES)}")
        try:
            v = float(e.value)
        except (TypeError, ValueError):
            raise UserError(f"edit {i}: value must be a number; got {e.value!r}") from None
        if not math.isfinite(v):
            raise UserError(f"edit {i}: value {v} is not finite; allowed: -{bound:g}..{bound:g}")
        if abs(v) > bound:
            raise UserError(f"edit {i}: value {v:g} is too large; allowed: -{bound:g}..{bound:g}")
        pos = None
        if e.positions is not None:
            if len(e.positions) == 0:
                raise UserError(f"edit {i}: positions is empty; give positions, or none at all for every position")
            pos = tuple(sorted({check_int(f"edit {i}: position", p, 0, seq_len - 1) for p in e.positions}))
        if e.normalize and e.mode not in STEER_MODES:
            raise UserError(f"edit {i}: normalize applies to the steering modes ({', '.join(STEER_MODES)}); "
                            f"not to {e.mode}")
        out.append(Edit(f, e.mode, 0.0 if e.mode == "ablate" else v, pos, bool(e.normalize)))
    return tuple(out)


def vocab_size(lm: HookedLM) -> int:
    return int(lm.model.get_input_embeddings().weight.shape[0])


def model_positions(lm: HookedLM) -> int | None:
    """The model's own position limit (max_position_embeddings / n_positions), or None when it has none."""
    cfg = lm.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def context_limit(lm: HookedLM) -> int:
    """Longest sequence an intervention runs: the model's position limit, capped by max_prompt_tokens +
    max_new_tokens."""
    cap = LIMITS.max_prompt_tokens + LIMITS.max_new_tokens
    n = model_positions(lm)
    return min(n, cap) if n else cap


def prompt_ids(lm: HookedLM, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A validated prompt (1-D long tensor) for `lm`."""
    return validate_ids(ids, vocab_size(lm), min(LIMITS.max_prompt_tokens, context_limit(lm)))
