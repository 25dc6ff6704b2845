"""The worker's engine: holds the model and SAEs and gathers concurrent requests into one forward pass.

Requests are admitted (the one prompt rule: at least one token, at most min(max_prompt_tokens, the model's position
limit); queue depth), queued, and a single batching loop takes up to max_batch of them, waiting at most
batch_wait_ms for company, right-pads them, and runs forward + encode in a thread through
`precompute.encode.encode_batch`: the very function precompute uses, so live activations equal stored ones. A batch
that fails is retried one request at a time, so a request that fails fails alone. Every request has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from saescope.precompute.data import bos_id
from saescope.precompute.encode import encode_batch
from saescope.precompute.errors import UserError
from saescope.precompute.interventions import PromptLengthError, check_prompt_length, model_positions
from saescope.precompute.models import HookedLM
from saescope.precompute.saes import SAE
from saescope.precompute.tokens import token_strings

from ..errors import AppError, echo
from ..settings import WORKER

log = logging.getLogger(__name__)


@dataclass
class Job:
    sae_id: str
    ids: np.ndarray  # (T,) int32
    future: asyncio.Future = field(repr=False)


class Engine:
    """Model + SAEs + the dynamic batcher."""

    def __init__(self, lm: HookedLM, saes: dict[str, SAE], max_prompt_tokens: int = WORKER.max_prompt_tokens,
                 max_batch: int = WORKER.max_batch, batch_wait_ms: float = WORKER.batch_wait_ms,
                 max_queue: int = WORKER.max_queue, timeout_s: float = WORKER.request_timeout_s):
        self.lm, self.saes = lm, saes
        self.graph_saes: dict[str, SAE] = {}  # transcoders for attribution graphs only (engine.demo_graph_transcoders)
        self.vocab = token_strings(lm.tokenizer)
        positions = model_positions(lm)
        # admission: the configured limit, capped by the model's own position limit (a longer prompt would index
        # past a learned position embedding)
        self.max_prompt_tokens = min(max_prompt_tokens, positions) if positions else max_prompt_tokens
        self.prompt_limit_why = " (the model's position limit)" if self.max_prompt_tokens < max_prompt_tokens else ""
        self.max_batch = max_batch
        self.batch_wait, self.max_queue, self.timeout = batch_wait_ms / 1000, max_queue, timeout_s
        self.queue: asyncio.Queue[Job] | None = None
        # one model, many threads: every use of it (batched encodes, interventions) holds this lock, because
        # reading an activation installs module hooks that would fire in another thread's forward pass
        self.model_lock = threading.Lock()
        self.batches = self.requests = 0  # forward passes run, requests answered
        self.admitted = 0  # requests queued for a forward pass
        self._task: asyncio.Task | None = None
        self._last_batch = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def sae(self, sae_id: str) -> SAE:
        if sae_id not in self.saes:
            raise AppError(f"unknown SAE {echo(sae_id)}; this worker has: {', '.join(self.saes)}", 404)
        return self.saes[sae_id]

    def tokenize(self, sae_id: str, text: str, given: list[int] | None = None) -> np.ndarray:
        sae = self.sae(sae_id)
        if given is not None:
            vocab = len(self.vocab)
            bad = [i for i in given if not 0 <= i < vocab]
            if bad:
                raise AppError(f"token ids {bad[:5]} are outside the vocabulary (0 to {vocab - 1})", 422)
            ids = list(given)
        else:
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            bos = bos_id(self.lm.tokenizer) if sae.cfg.prepend_bos else None
            ids = ([bos] if bos is not None else []) + list(ids)
        try:  # the one prompt rule of every route (precompute.interventions.check_prompt_length)
            check_prompt_length(len(ids), self.max_prompt_tokens, self.prompt_limit_why)
        except PromptLengthError as err:
            raise AppError(str(err), 413 if err.too_long else 422,
                           title="Prompt too long" if err.too_long else None) from None
        return np.asarray(ids, dtype=np.int32)

    async def encode(self, body) -> tuple[np.ndarray, torch.Tensor]:
        """Token ids (T,) and feature activations (T, d_sae) for one prompt, batched with whatever else waits."""
        sae_id = body.sae_id
        ids = self.tokenize(sae_id, body.text, body.ids)
        assert self.queue is not None, "engine not started"
        if self.queue.qsize() >= self.max_queue:
            raise AppError(f"the worker has {self.queue.qsize()} requests queued (limit {self.max_queue}); retry shortly",
                           503, title="Busy")
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(sae_id, ids, fut))
        self.admitted += 1
        try:
            z = await asyncio.wait_for(fut, timeout=self.timeout)
        except asyncio.TimeoutError as err:
            raise AppError(f"no answer within {self.timeout:.0f} s (the worker is overloaded)", 504) from err
        self.requests += 1
        return ids, z

    async def _loop(self) -> None:
        assert self.queue is not None
        while True:
            first = await self.queue.get()
            jobs = [first]
            # wait for company only when there is traffic: a lone request on an idle worker runs at once
            wait = self.batch_wait if (self.queue.qsize() or self._last_batch > 1) else 0.0
            deadline = time.monotonic() + wait
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 and self.queue.empty():
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), timeout=max(left, 0)) if left > 0
                                else self.queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            jobs = [j for j in jobs if not j.future.cancelled()]
            self._last_batch = len(jobs)
            by_sae: dict[str, list[Job]] = {}
            for j in jobs:
                by_sae.setdefault(j.sae_id, []).append(j)
            for sae_id, group in by_sae.items():
                try:
                    outs = await asyncio.to_thread(self._run, sae_id, [j.ids for j in group])
                    self.batches += 1
                    for j, z in zip(group, outs):
                        if not j.future.done():
                            j.future.set_result(z)
                except Exception as err:  # a failed batch fails no request but the ones that fail alone
                    self.batches += 1
                    if len(group) == 1:
                        self._fail(group[0], err)
                        continue
                    log.warning("a batch of %d failed (%s); running its requests one at a time", len(group), err)
                    for j in group:
                        try:
                            z = (await asyncio.to_thread(self._run, sae_id, [j.ids]))[0]
                            if not j.future.done():
                                j.future.set_result(z)
                        except Exception as one:
                            self._fail(j, one)
                        self.batches += 1

    def _fail(self, job: Job, err: Exception) -> None:
        """A request that failed on its own: bad input (UserError) -> 422, anything else -> 500 with the bug logged."""
        if isinstance(err, UserError):
            out = AppError(str(err), 422)
        else:
            log.error("encoding failed", exc_info=err)
            out = AppError(f"encoding failed: {err}", 500)
        if not job.future.done():
            job.future.set_exception(out)

    def _run(self, sae_id: str, seqs: list[np.ndarray]) -> list[torch.Tensor]:
        """Right-padded batch -> per-prompt (T_i, d_sae) activations. Padding sits after every real token, so the
        causal mask keeps it from touching the real positions."""
        T = max(len(s) for s in seqs)
        pad = self.lm.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.lm.tokenizer.eos_token_id or 0)
        ids = np.full((len(seqs), T), pad, dtype=np.int32)
        mask = np.zeros((len(seqs), T), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        sae = self.saes[sae_id]
        with self.model_lock:
            z = encode_batch(self.lm, sae, ids, sae.cfg.hook_name, attention_mask=torch.from_numpy(mask))
        return [z[i, :len(s)].float().cpu() for i, s in enumerate(seqs)]

    def strs(self, ids: np.ndarray) -> list[str]:
        return [self.vocab[i] if 0 <= i < len(self.vocab) else f"<id {i}>" for i in ids]
