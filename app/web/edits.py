"""The URL form of feature edits, `edit=FEATURE:MODE:VALUE` (repeatable), parsed in one strict place for /steer,
/api/steer and /api/ablate: at most WORKER.max_edits items of at most WORKER.max_edit_chars characters each,
the value a finite decimal number (no `.`, `1.2.3`, `..5`, `nan`, `inf`) within ±WORKER.max_abs_value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from saescope.precompute.store import SAEInfo

from ..errors import AppError, echo
from ..settings import WORKER
from ..worker.wire import EditIn
from .lookups import check_index

MODES = ("ablate", "clamp", "add", "orthogonal", "cap")
STEERING = ("add", "orthogonal", "cap")  # the modes :unit applies to (normalize the decoder direction)
NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
EDIT_RE = re.compile(rf"([0-9]{{1,9}})(?::({'|'.join(MODES)}))?(?::({NUMBER}))?(:unit)?")
FORMAT = (f"FEATURE:MODE:VALUE[:unit] with MODE one of {', '.join(MODES)} and VALUE a number "
          f"(e.g. 123:add:8, 45:clamp:0.5, 9:cap:0 or 7:ablate; :unit after a steering edit normalizes the direction)")


def parse_edit(spec: str, sae: SAEInfo) -> EditIn:
    """One URL edit -> a checked wire edit (the mode defaults to add, the value to 0)."""
    if len(spec) > WORKER.max_edit_chars:
        raise AppError(f"edit {echo(spec)} is too long: an edit has at most {WORKER.max_edit_chars} characters, "
                       f"as {FORMAT}", 422)
    m = EDIT_RE.fullmatch(spec.strip())
    if not m:
        raise AppError(f"edit {echo(spec)} is not {FORMAT}", 422)
    feature, mode, value = int(m.group(1)), m.group(2) or "add", float(m.group(3) or 0)
    check_index(sae, feature)
    if not math.isfinite(value) or abs(value) > WORKER.max_abs_value:
        raise AppError(f"edit {echo(spec)}: VALUE must be a number from -{WORKER.max_abs_value:g} to "
                       f"{WORKER.max_abs_value:g}", 422)
    if m.group(4) and mode not in STEERING:
        raise AppError(f"edit {echo(spec)}: :unit applies to the steering modes {', '.join(STEERING)}", 422)
    return EditIn(feature=feature, mode=mode, value=value, normalize=bool(m.group(4)))


def parse_edits(specs: list[str], sae: SAEInfo) -> list[EditIn]:
    """URL edits 'FEATURE:MODE:VALUE' (e.g. 123:add:8, 45:clamp:0.5, 7:ablate) -> checked wire edits."""
    if not specs:
        raise AppError(f"give at least one edit as {FORMAT}", 422)
    if len(specs) > WORKER.max_edits:
        raise AppError(f"{len(specs)} edits given; the limit is {WORKER.max_edits}", 422)
    return [parse_edit(spec, sae) for spec in specs]


HTML_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?")  # what <input type=number> keeps


@dataclass(frozen=True)
class EditFields:
    """One URL edit as the steer page's row shows it: feature, mode, value (text an <input type=number> keeps)
    and :unit. Read with parse_edit's own pattern, so a row rebuilt from these fields is the same edit."""

    feature: str
    mode: str
    value: str  # "" when the edit gives none (the value then is 0)
    unit: bool


def edit_fields(spec: str) -> EditFields | None:
    """The row fields of an edit, or None when it is not FEATURE[:MODE][:VALUE][:unit] at all (its row then stays
    the raw text box, and parse_edits says what is wrong). Ranges are parse_edit's business, not checked here."""
    if not spec.strip():
        return EditFields("", "add", "", False)  # the empty row of a page without edits
    m = EDIT_RE.fullmatch(spec.strip())
    if not m:
        return None
    value = m.group(3) or ""
    if value and not HTML_NUMBER.fullmatch(value):  # "+5", "5.", "1.e3": a number input would show these empty
        value = repr(float(value))
    return EditFields(m.group(1), m.group(2) or "add", value, bool(m.group(4)))
