"""The chat page (/chat) and its JSON twin (/api/chat): a conversation with the worker's instruct model, its chat
template applied, the default and the steered assistant reply side by side from the same seed.

The URL holds the whole conversation and the edits: m=ROLE:TEXT per message (ROLE user, assistant or system; at most
WORKER.max_chat_turns messages of WORKER.max_message_chars characters), say=TEXT for the next user message, and
edit=FEATURE:MODE:VALUE as on the steer page. "Continue with the steered reply" is a link that appends it.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from ..errors import AppError, echo
from ..settings import WORKER
from ..worker.wire import ChatSteerIn, ChatSteerOut, ChatTurnIn
from . import steering
from .edits import parse_edits
from .live_views import client_of as _client, worker_status
from .lookups import sae_or_first
from .pages import store_of
from .templates import page

router = APIRouter()
W = WORKER
ROLES = ("user", "assistant", "system")
MAX_M_CHARS = W.max_message_chars + len("assistant:")


def parse_turns(ms: list[str], say: str) -> list[ChatTurnIn]:
    """m=ROLE:TEXT values (and the next user message) -> checked messages."""
    out = []
    for i, m in enumerate(ms):
        role, sep, text = m.partition(":")
        if not sep or role not in ROLES:
            raise AppError(f"message {i} {echo(m)} is not ROLE:TEXT with ROLE one of {', '.join(ROLES)}", 422)
        out.append((role, text))
    if say.strip():
        out.append(("user", say))
    if len(out) > W.max_chat_turns:
        raise AppError(f"the conversation has {len(out)} messages; the limit is {W.max_chat_turns}", 422)
    for i, (_, text) in enumerate(out):
        if len(text) > W.max_message_chars:
            raise AppError(f"message {i} has {len(text)} characters; the limit is {W.max_message_chars}", 422)
    return [ChatTurnIn(role=r, content=t) for r, t in out]


def _body(info, turns, edit, n, temperature, seed) -> ChatSteerIn:
    return ChatSteerIn(sae_id=info.sae_id, messages=turns, edits=parse_edits(edit, info), max_new_tokens=n,
                       temperature=temperature, seed=seed)


@router.get("/chat", response_class=HTMLResponse)
def chat_page(request: Request, sae: str | None = None,
              m: list[str] = Query([], max_length=W.max_chat_turns), say: str = Query("", max_length=W.max_message_chars),
              edit: list[str] = Query([], max_length=W.max_edits),
              n: int = Query(W.default_new_tokens, ge=1, le=W.max_new_tokens),
              temperature: float = Query(0.0, ge=0.0, le=W.max_temperature), seed: int = Query(0, ge=0, le=W.max_seed)):
    """Steer a conversation: the default and the steered reply to its last user message."""
    store = store_of(request)
    info = sae_or_first(store, sae)
    ctx = {"sae": info, "saes": store.saes(),
           "edits": [e for e in edit if len(e) <= W.max_edit_chars],  # never refill an overlong item
           "n": n, "temperature": temperature, "seed": seed,
           "worker": worker_status(request.app), "turns": [], "result": None, "error": None, "say": ""}
    try:
        turns = parse_turns(m, say)
        ctx["turns"] = turns
        if turns and edit and turns[-1].role == "user":
            out = _client(request).steer_chat(_body(info, turns, edit, n, temperature, seed))
            ctx["result"] = out
            ctx.update(steering.steer_extras(request, store, info.sae_id, parse_edits(edit, info), out))
            keep = [(k, v) for k, v in request.query_params.multi_items() if k not in ("m", "say")]
            ms = [("m", f"{t.role}:{t.content}") for t in turns]
            ctx["continue_steered"] = "/chat?" + urlencode(ms + [("m", f"assistant:{out.steered_reply}")] + keep)
            ctx["continue_default"] = "/chat?" + urlencode(ms + [("m", f"assistant:{out.default_reply}")] + keep)
    except AppError as err:
        if err.status == 404:
            raise
        ctx["error"] = err
    return page(request, "chat.html", ctx, block="result")


@router.get("/api/chat", tags=["live"], summary="steer a conversation (live): the default and the steered assistant "
            "reply, the model's chat template applied")
def api_chat(request: Request, sae: str, m: list[str] = Query([], max_length=W.max_chat_turns),
             say: str = Query("", max_length=W.max_message_chars), edit: list[str] = Query(..., max_length=W.max_edits),
             n: int = Query(W.default_new_tokens, ge=1, le=W.max_new_tokens),
             temperature: float = Query(0.0, ge=0.0, le=W.max_temperature),
             seed: int = Query(0, ge=0, le=W.max_seed)) -> ChatSteerOut:
    info = store_of(request).require_sae(sae)
    turns = parse_turns(m, say)
    if not turns:
        raise AppError("give the conversation: m=user:TEXT (repeatable, ROLE one of user, assistant, system) or say=TEXT",
                       422)
    return _client(request).steer_chat(_body(info, turns, edit, n, temperature, seed))
