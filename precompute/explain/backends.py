"""Chat LLM backends for explaining and scoring: any OpenAI-compatible server over HTTP, or a local transformers model.

Both expose `complete(messages, max_tokens) -> str` and `complete_batch(conversations, max_tokens) -> list[str]`
(answers in input order); `chat_batch` also returns token counts and the finish reason. Decoding is greedy
(temperature 0), so a backend answers the same prompt the same way every time.

HTTP settings come from arguments or, when those are None, from the environment:

    SAESCOPE_LLM_URL    base URL of the API, usually ending in /v1 (e.g. http://127.0.0.1:8080/v1 for llama.cpp's
                        server, http://127.0.0.1:11434/v1 for Ollama, http://127.0.0.1:8000/v1 for vLLM)
    SAESCOPE_LLM_MODEL  model name the server knows
    SAESCOPE_LLM_KEY    API key sent as "Authorization: Bearer ..." (OPENAI_API_KEY is used when this is unset;
                        a local server usually needs none)
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from ..errors import SaescopeError, UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ENV_URL, ENV_MODEL, ENV_KEY = "SAESCOPE_LLM_URL", "SAESCOPE_LLM_MODEL", "SAESCOPE_LLM_KEY"
ENV_OPENAI_KEY = "OPENAI_API_KEY"


class LLMError(SaescopeError, RuntimeError):
    """The LLM could not answer; the message says why and what to do."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"  # "stop" (ended by itself) or "length" (hit max_tokens)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat conversation: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise UserError(f"message {i} must be a dict with keys 'role' and 'content'; got {m!r:.80}")
        if m["role"] not in ROLES:
            raise UserError(f"message {i} has role {m['role']!r}; valid: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i} content must be a string; got {type(m['content']).__name__}")
    return messages


def _check_max_tokens(max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"max_tokens must be a positive integer; got {max_tokens!r}")


class ChatBackend(ABC):
    """A chat model answering greedily. `name` identifies it in an explanation's provenance."""

    name: str

    @abstractmethod
    def chat_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int,
                   max_time_s: float | None = None) -> list[Completion]:
        """One completion per conversation, in input order; max_time_s (where the backend can) stops each answer
        after that long (finish_reason "length")."""

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 256) -> str:
        return self.chat_batch([messages], max_tokens)[0].text

    def complete_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int = 256) -> list[str]:
        return [c.text for c in self.chat_batch(conversations, max_tokens)]


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


def _validate_base_url(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"no LLM URL given; pass one or set {ENV_URL} (e.g. http://127.0.0.1:8080/v1)")
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):  # someone pasted the full route
        url = url[: -len("/chat/completions")]
    try:
        parsed = httpx.URL(url)
    except Exception as err:  # httpx.InvalidURL and friends
        raise UserError(f"LLM URL {url!r} is not a valid URL ({err})") from err
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"LLM URL {url!r} must start with http:// or https:// and name a host, "
                         "e.g. http://127.0.0.1:8080/v1")
    if parsed.query or parsed.fragment:
        raise UserError(f"LLM URL {url!r} must not have a query string or fragment")
    return url


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    except Exception:
        return resp.text[:300]


class OpenAIChatBackend(ChatBackend):
    """Any server speaking OpenAI's chat-completions route (vLLM, llama.cpp's server, Ollama, hosted APIs).

    Up to `max_concurrency` requests run at once (threads sharing one connection pool). Rate limits (429) and
    server errors (5xx) are retried `retries` times with backoff; other failures raise LLMError at once.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_concurrency: int = 4, retries: int = 2, seed: int | None = 0):
        self.base_url = _validate_base_url(base_url if base_url is not None else os.environ.get(ENV_URL, ""))
        model = model if model is not None else os.environ.get(ENV_MODEL, "")
        if not isinstance(model, str) or not model.strip():
            raise UserError(f"no LLM model name given; pass one or set {ENV_MODEL} (the name the server lists "
                             "at GET /v1/models)")
        self.model = model.strip()
        if api_key is None:
            api_key = os.environ.get(ENV_KEY) or os.environ.get(ENV_OPENAI_KEY) or None
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise UserError(f"timeout must be a positive number of seconds; got {timeout!r}")
        if not isinstance(max_concurrency, int) or not 1 <= max_concurrency <= 256:
            raise UserError(f"max_concurrency must be an integer from 1 to 256; got {max_concurrency!r}")
        if not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be a non-negative integer; got {retries!r}")
        self.timeout, self.max_concurrency, self.retries, self.seed = float(timeout), max_concurrency, retries, seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                    limits=httpx.Limits(max_connections=max_concurrency))
        self.name = f"{self.model} @ {self.base_url}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIChatBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        where = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.request(method, path, **kw)
            except httpx.TimeoutException as err:
                raise LLMError(f"no answer from {where} within {self.timeout:g} s; the server may be overloaded "
                               "or the model too slow: raise the timeout or lower the concurrency") from err
            except httpx.TransportError as err:
                raise LLMError(f"could not reach {where} ({type(err).__name__}: {err}); is the server running "
                               "and the URL right?") from err
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt < self.retries:
                    time.sleep(min(8.0, 0.5 * 2 ** attempt))
                    continue
                raise LLMError(f"{where} answered HTTP {resp.status_code} after {self.retries + 1} tries: "
                               f"{_server_message(resp)}")
            if resp.status_code in (401, 403):
                raise LLMError(f"{where} refused the request (HTTP {resp.status_code}: {_server_message(resp)}); "
                               f"check the API key (--llm-key, {ENV_KEY} or {ENV_OPENAI_KEY})")
            if resp.status_code == 404:
                msg = _server_message(resp)
                if "model" in msg.lower():
                    raise LLMError(f"{where}: model {self.model!r} not found ({msg}); list the server's models "
                                   f"with GET {self.base_url}/models")
                raise LLMError(f"{where} does not exist (HTTP 404: {msg}); the base URL of an OpenAI-compatible "
                               "API usually ends in /v1")
            if resp.status_code >= 400:
                raise LLMError(f"{where} rejected the request (HTTP {resp.status_code}: {_server_message(resp)})")
            return resp
        raise AssertionError("unreachable")

    def list_models(self) -> list[str]:
        """Model ids the server lists at GET /models."""
        data = self._request("GET", "/models").json()
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    def check(self) -> None:
        """Fail early with a clear message when the server is unreachable, refuses the key, or lacks the model."""
        models = self.list_models()
        if models and self.model not in models:
            raise LLMError(f"{self.base_url} has no model {self.model!r}; it serves: {', '.join(models[:20])}")

    def _one(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": 0.0}
        if self.seed is not None:
            body["seed"] = self.seed
        resp = self._request("POST", "/chat/completions", json=body)
        try:
            data = resp.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(text=choice["message"].get("content") or "", prompt_tokens=usage.get("prompt_tokens"),
                              completion_tokens=usage.get("completion_tokens"),
                              finish_reason=choice.get("finish_reason") or "stop")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise LLMError(f"{self.base_url}/chat/completions answered something that is not a chat completion: "
                           f"{resp.text[:200]!r}") from err

    def chat_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int = 256,
                   max_time_s: float | None = None) -> list[Completion]:
        """max_time_s is not sent (the server decides); the client's timeout bounds each request."""
        _check_max_tokens(max_tokens)
        for conv in conversations:
            validate_messages(conv)
        if len(conversations) <= 1 or self.max_concurrency == 1:
            return [self._one(c, max_tokens) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations))) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens), conversations))


# ---------------------------------------------------------------------------------------------------------------
# local transformers model


class LocalChatBackend(ChatBackend):
    """A local transformers instruct model, prompted through its tokenizer's chat template, decoding greedily.

    With no folder given it loads the embedded default, SmolLM2-135M-Instruct: it works fully offline, but at 135M
    parameters it is weak. Its explanations lean on the few-shot answers (often 'The word "X".' with X a marked
    token), and as a judge it answers 1 to nearly every snippet, so its detection/fuzzing scores sit at chance
    or are unparsable. Use it to try the pipeline; use a bigger model (locally, or any OpenAI-compatible server)
    for explanations and scores worth keeping.
    The KV cache of a conversation's leading messages (system prompt and few-shot exchanges, shared by every
    scoring prompt) is computed once and reused. Conversations without such a prefix are generated `batch_size`
    at a time (left-padded). Calls from several threads take turns.
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 4,
                 max_input_tokens: int = 4096):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model_dir is None:
            from saescope.precompute.embedded import convert_default_model

            model_dir = convert_default_model()
            log.warning("explaining with the embedded SmolLM2-135M-Instruct: works offline but is weak; expect "
                        "vague explanations and near-chance scores (use --llm with a bigger model for real use)")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise UserError(f"{model_dir} is not a transformers model folder (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        except Exception as err:
            raise UserError(f"could not load a chat model from {model_dir} ({type(err).__name__}: {err})") from err
        self._setup(model, tokenizer, f"local:{model_dir.name}", device, batch_size, max_input_tokens)

    @classmethod
    def from_loaded(cls, model, tokenizer, name: str, device: str = "cpu", batch_size: int = 4,
                    max_input_tokens: int = 4096) -> LocalChatBackend:
        """Wrap a model and tokenizer that are already in memory (e.g. the worker's), instead of loading a copy."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name, device, batch_size, max_input_tokens)
        return self

    def _setup(self, model, tokenizer, name: str, device: str, batch_size: int, max_input_tokens: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer; got {batch_size!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{name} has no chat template in its tokenizer; use an instruct/chat model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size, self.max_input_tokens = device, batch_size, max_input_tokens
        self.min_prefix_tokens, self.max_cached_prefixes = 32, 4
        self.name = name
        self._lock = threading.Lock()
        self._caches: OrderedDict[tuple[int, ...], Any] = OrderedDict()  # prefix ids -> DynamicCache

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Length in tokens of the conversation as the model sees it (chat template and generation prompt)."""
        return len(self._encode(messages))

    def _encode(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(validate_messages(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _shared_prefix(self, messages: list[dict[str, str]], ids: list[int]) -> tuple[int, ...] | None:
        """Token ids of every message but the last, when they begin the full prompt and are long enough to be
        worth caching (the system prompt and few-shot exchanges that all scoring prompts share)."""
        if len(messages) < 2:
            return None
        prefix = self._encode(messages[:-1], generation_prompt=False)
        if len(prefix) < self.min_prefix_tokens or len(prefix) >= len(ids) or ids[: len(prefix)] != prefix:
            return None
        return tuple(prefix)

    def _prefix_cache(self, prefix: tuple[int, ...]):
        import torch

        from ..models import output_cache

        cache = self._caches.get(prefix)
        if cache is None:
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True)
            cache = output_cache(out)
            self._caches[prefix] = cache
            while len(self._caches) > self.max_cached_prefixes:
                self._caches.popitem(last=False)
        self._caches.move_to_end(prefix)
        return copy.deepcopy(cache)  # generate() extends the cache in place

    def _finish(self, new_tokens: list[int], n_prompt: int) -> Completion:
        eos = self.tokenizer.eos_token_id
        ended = eos in new_tokens
        if ended:
            new_tokens = new_tokens[: new_tokens.index(eos)]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return Completion(text=text.strip(), prompt_tokens=n_prompt, completion_tokens=len(new_tokens) + int(ended),
                          finish_reason="stop" if ended else "length")

    def chat_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int = 256,
                   max_time_s: float | None = None) -> list[Completion]:
        """Conversations whose leading messages were seen before reuse that prefix's KV cache and run one at a
        time (greedy output is the same as without the cache); the rest run left-padded in batches. max_time_s:
        each generate call stops after that long (transformers' max_time)."""
        import torch

        from ..models import cache_kwarg

        _check_max_tokens(max_tokens)
        encoded = [self._encode(c) for c in conversations]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_input_tokens:
                raise UserError(f"conversation {i} has {len(ids)} tokens; the limit is {self.max_input_tokens}")
        out: list[Completion | None] = [None] * len(encoded)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        gen_kw = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        if max_time_s is not None:
            gen_kw["max_time"] = float(max_time_s)
        with self._lock, torch.inference_mode():
            plain = []
            for i, conv in enumerate(conversations):
                prefix = self._shared_prefix(conv, encoded[i])
                if prefix is None:
                    plain.append(i)
                    continue
                ids = torch.tensor([encoded[i]], device=self.device)  # (1, T)
                gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          **{cache_kwarg(self.model): self._prefix_cache(prefix)}, **gen_kw)
                out[i] = self._finish(gen[0, ids.shape[1]:].tolist(), len(encoded[i]))
            plain.sort(key=lambda i: len(encoded[i]))  # similar lengths share a batch
            for start in range(0, len(plain), self.batch_size):
                idx = plain[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T) left-padded
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = len(encoded[i])
                    ids[row, width - n:] = torch.tensor(encoded[i])
                    mask[row, width - n:] = 1
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **gen_kw)
                for row, i in enumerate(idx):
                    out[i] = self._finish(gen[row, width:].tolist(), len(encoded[i]))
        return out  # type: ignore[return-value]
