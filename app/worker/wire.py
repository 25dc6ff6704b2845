"""The model worker's wire format: pydantic models shared by the worker and its client (JSON, never pickle)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..settings import WORKER

MAX_TEXT_CHARS = WORKER.max_text_chars


class TextIn(BaseModel):
    sae_id: str = Field(description="which SAE to encode with (see /health for the list)")
    text: str = Field("", max_length=MAX_TEXT_CHARS, description="the prompt; BOS is prepended when the SAE expects it")
    ids: list[int] | None = Field(None, description="token ids to use verbatim instead of text (e.g. a stored context)")


class TokenizeIn(BaseModel):
    sae_id: str = Field(description="SAE whose model and BOS convention to use")
    text: str = Field(max_length=MAX_TEXT_CHARS, description="text to tokenize")


class TokenizeOut(BaseModel):
    tokens: list[str] = Field(description="display string of every token, BOS included when prepended")
    ids: list[int] = Field(description="token ids")


class FeatureActsIn(TextIn):
    feature: int = Field(ge=0, description="feature index")


class FeatureActsOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    values: list[float] = Field(description="the feature's activation on each token (0 on special tokens)")
    max_value: float = Field(description="largest value")
    max_pos: int = Field(description="position of the largest value (first if tied)")


class FeatureHit(BaseModel):
    index: int = Field(description="feature index")
    value: float = Field(description="activation (max over the chosen positions)")
    pos: int = Field(description="position where that value occurs")


class TopFeaturesIn(TextIn):
    k: int = Field(WORKER.top_k, ge=1, le=WORKER.max_k, description="how many features")
    positions: list[int] | None = Field(None, description="token positions to rank over; all positions when absent")


class TopFeaturesOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    features: list[FeatureHit] = Field(description="features ranked by their max activation over the positions")
    token_max: list[float] = Field(description="strongest feature activation at each token")
    token_argmax: list[int] = Field(description="index of the strongest feature at each token (-1 where none fires)")


class TokenFeaturesIn(TextIn):
    k: int = Field(5, ge=1, le=100, description="features per token")


class TokenFeaturesOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    per_token: list[list[FeatureHit]] = Field(description="for each token, its top-k active features")


class SAEDesc(BaseModel):
    sae_id: str = Field(description="id, as in the store")
    hook: str = Field(description="hook name")
    d_sae: int = Field(description="number of features")


class HealthOut(BaseModel):
    status: Literal["ok"] = Field(description="always ok when the worker answers")
    model: str = Field(description="model path or id")
    device: str = Field(description="cpu or cuda")
    saes: list[SAEDesc] = Field(description="SAEs this worker encodes with")
    queued: int = Field(description="requests waiting for a forward pass")
    max_prompt_tokens: int = Field(description="admission limit on prompt length")
    max_batch: int = Field(description="largest batch per forward pass")
    batches: int = Field(description="forward passes run so far")
    requests: int = Field(description="requests answered so far")


class ErrorOut(BaseModel):
    error: dict = Field(description="status, title and message")
