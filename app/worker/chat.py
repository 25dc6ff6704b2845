"""OpenAI-compatible chat-completions routes for any ChatBackend (the model worker mounts them).

    app.include_router(make_chat_router(LocalChatBackend(), model_name="smollm2-135m-instruct"))

gives POST /v1/chat/completions and GET /v1/models in OpenAI's JSON shapes, so any OpenAI client (and saescope's
own OpenAIChatBackend) can talk to the worker's model. Decoding is greedy; `temperature` and other sampling fields
are accepted and ignored, `stream` and n > 1 are refused. Errors use OpenAI's {"error": {...}} body. max_tokens is
capped (LIMITS.max_chat_tokens) and so is the wall time of one answer (LIMITS.generation_time_s, like /steer): an
answer cut by either says finish_reason "length".
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from saescope.precompute.config import LIMITS
from saescope.precompute.explain.backends import ChatBackend, LLMError

from ..errors import echo


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send top_p, stop, user, ...; they are ignored

    model: str = Field(description="Model name; must be the one this server lists at GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest message first.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default and largest: "
                                   f"{LIMITS.max_chat_tokens}; more is refused with HTTP 400).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens; wins if both.")
    temperature: float | None = Field(None, ge=0, le=2, description="Accepted and ignored: decoding is greedy.")
    n: int = Field(1, description="Number of choices; only 1 is supported.")
    stream: bool = Field(False, description="Streaming is not supported; must be false.")
    seed: int | None = Field(None, description="Accepted and ignored: greedy decoding is deterministic.")


class ChatChoice(BaseModel):
    index: int = Field(description="Position of this choice (always 0).")
    message: ChatMessage = Field(description="The assistant's answer.")
    finish_reason: Literal["stop", "length"] = Field(description="'stop' if the model ended, 'length' if cut off.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt after the chat template.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class ChatCompletion(BaseModel):
    id: str = Field(description="Unique id of this completion.")
    object: Literal["chat.completion"] = Field("chat.completion", description="Always 'chat.completion'.")
    created: int = Field(description="Unix time the completion was made.")
    model: str = Field(description="The model that answered.")
    choices: list[ChatChoice] = Field(description="One choice.")
    usage: Usage = Field(description="Token counts.")


class ModelCard(BaseModel):
    id: str = Field(description="Model name to pass as 'model'.")
    object: Literal["model"] = Field("model", description="Always 'model'.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field(description="Always 'saescope'.")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always 'list'.")
    data: list[ModelCard] = Field(description="The models served (one).")


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def make_chat_router(backend: ChatBackend, model_name: str | None = None, api_key: str | None = None,
                     max_tokens_limit: int = LIMITS.max_chat_tokens,
                     time_limit_s: float | None = LIMITS.generation_time_s) -> APIRouter:
    """Routes serving `backend` under the OpenAI API. With api_key set, requests must send
    "Authorization: Bearer <api_key>". One answer stops after max_tokens_limit tokens or time_limit_s seconds."""
    name = model_name or backend.name
    started = int(time.time())
    router = APIRouter(tags=["openai"])

    def _auth(authorization: str | None) -> JSONResponse | None:
        if api_key is None:
            return None
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            return _error(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'", "invalid_api_key")
        return None

    @router.get("/v1/models", response_model=ModelList, summary="The model this server answers with")
    def list_models(authorization: str | None = Header(None)):
        if (denied := _auth(authorization)) is not None:
            return denied
        return ModelList(data=[ModelCard(id=name, created=started, owned_by="saescope")])

    @router.post("/v1/chat/completions", response_model=ChatCompletion, summary="Answer a conversation (greedy)")
    def chat_completions(req: ChatCompletionRequest, authorization: str | None = Header(None)):
        if (denied := _auth(authorization)) is not None:
            return denied
        if req.model != name:
            return _error(404, f"the model {echo(req.model)} does not exist; this server serves {name!r}",
                          "model_not_found", "model")
        if req.stream:
            return _error(400, "streaming is not supported; send stream=false", "unsupported_value", "stream")
        if req.n != 1:
            return _error(400, f"n={req.n} is not supported; only n=1", "unsupported_value", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_limit
        if max_tokens > max_tokens_limit:
            return _error(400, f"max_tokens is {max_tokens}; the limit is {max_tokens_limit}", "too_large",
                          "max_tokens")
        messages = [m.model_dump() for m in req.messages]
        try:
            done = backend.chat_batch([messages], max_tokens, max_time_s=time_limit_s)[0]
        except ValueError as err:  # e.g. the prompt is longer than the model accepts
            return _error(400, str(err), "invalid_value", "messages")
        except LLMError as err:
            return _error(502, str(err), "backend_error")
        prompt, completion = done.prompt_tokens or 0, done.completion_tokens or 0
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name,
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=done.text),
                                finish_reason="length" if done.finish_reason == "length" else "stop")],
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        )

    return router
