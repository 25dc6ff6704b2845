"""Steering a conversation with an instruct model: the model's own chat template applied (with the generation
prompt), then the default and the steered assistant reply side by side from the same seed (generate.generate).

The prompt is the template rendered to text and tokenized without added special tokens, as Neuronpedia's
completion-chat does; it equals the tokenizer's own apply_chat_template(..., tokenize=True) (tested). The SAE's BOS
convention is not applied on top: the template decides the first token. Limits: LIMITS.max_chat_turns,
LIMITS.max_message_chars, and the prompt rule of every intervention.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import LIMITS
from ..errors import UserError
from ..explain.backends import validate_messages
from ..models import HookedLM
from ..saes import SAE
from .edits import Edit, check_prompt_length, context_limit
from .generate import Generation, Sampling, generate


def has_chat_template(lm: HookedLM) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def check_conversation(messages: Sequence[dict]) -> list[dict[str, str]]:
    """A conversation to answer: 1..max_chat_turns messages, each at most max_message_chars, ending with the user."""
    msgs = validate_messages(list(messages))
    if len(msgs) > LIMITS.max_chat_turns:
        raise UserError(f"the conversation has {len(msgs)} messages; the limit is {LIMITS.max_chat_turns}")
    for i, m in enumerate(msgs):
        if len(m["content"]) > LIMITS.max_message_chars:
            raise UserError(f"message {i} has {len(m['content'])} characters; the limit is {LIMITS.max_message_chars}")
    if msgs[-1]["role"] != "user":
        raise UserError(f"the last message is the {msgs[-1]['role']}'s; the model answers a user message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def chat_prompt(lm: HookedLM, messages: Sequence[dict]) -> tuple[str, list[int]]:
    """(the rendered template, its token ids) with add_generation_prompt=True."""
    if not has_chat_template(lm):
        raise UserError(f"{lm.name} has no chat template: steer a plain prompt instead (/steer)")
    msgs = check_conversation(messages)
    text = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    check_prompt_length(len(ids), min(LIMITS.max_prompt_tokens, context_limit(lm)), " (the conversation after the "
                        "chat template)")
    return text, ids


def steer_chat(lm: HookedLM, sae: SAE, messages: Sequence[dict], edits: Sequence[Edit],
               max_new_tokens: int = LIMITS.default_new_tokens, sampling: Sampling = Sampling(), *,
               n_logprobs: int = 0, kl: bool = False, time_limit: float | None = None,
               hook: str | None = None) -> tuple[str, Generation]:
    """The default and the steered assistant reply to a conversation (stopping at the end-of-turn token)."""
    text, ids = chat_prompt(lm, messages)
    return text, generate(lm, sae, ids, edits, max_new_tokens, sampling, n_logprobs=n_logprobs, kl=kl,
                          time_limit=time_limit, hook=hook)


def reply_text(lm: HookedLM, ids: Sequence[int]) -> str:
    """A reply as a message: the new tokens decoded without special tokens (the end-of-turn token dropped)."""
    return lm.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
