"""`saescope worker`: holds the model and SAEs, gathers concurrent requests into one forward pass.

Requests are admitted (prompt length, queue depth), queued, and a single batching loop takes up to
max_batch of them, waiting at most batch_wait_ms for company, right-pads them, and runs forward + encode in a
thread through `precompute.run.encode_batch`: the very function precompute uses, so live activations equal
stored ones. Every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from precompute.config import DEFAULTS
from precompute.data import bos_id
from precompute.models import HookedLM, load_model
from precompute.run import encode_batch
from precompute.saes import SAE, load_sae
from precompute.tokens import token_strings

from .errors import AppError
from .wire import (FeatureActsIn, FeatureActsOut, FeatureHit, HealthOut, SAEDesc, TokenFeaturesIn, TokenFeaturesOut,
                   TokenizeIn, TokenizeOut, TopFeaturesIn, TopFeaturesOut)

log = logging.getLogger(__name__)


@dataclass
class Job:
    sae_id: str
    ids: np.ndarray  # (T,) int32
    future: asyncio.Future = field(repr=False)


class Engine:
    """Model + SAEs + the dynamic batcher."""

    def __init__(self, lm: HookedLM, saes: dict[str, SAE], max_prompt_tokens: int, max_batch: int,
                 batch_wait_ms: float, max_queue: int, timeout_s: float):
        self.lm, self.saes = lm, saes
        self.vocab = token_strings(lm.tokenizer)
        self.max_prompt_tokens, self.max_batch = max_prompt_tokens, max_batch
        self.batch_wait, self.max_queue, self.timeout = batch_wait_ms / 1000, max_queue, timeout_s
        self.queue: asyncio.Queue[Job] | None = None
        self.batches = self.requests = 0
        self._task: asyncio.Task | None = None
        self._last_batch = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def sae(self, sae_id: str) -> SAE:
        if sae_id not in self.saes:
            raise AppError(f"unknown SAE {sae_id!r}; this worker has: {', '.join(self.saes)}", 404)
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
        if not ids:
            raise AppError("the prompt is empty; type some text", 422)
        if len(ids) > self.max_prompt_tokens:
            raise AppError(f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", 413,
                           title="Prompt too long")
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
                    for j, z in zip(group, outs):
                        if not j.future.done():
                            j.future.set_result(z)
                except Exception as err:  # a failed batch fails its requests, not the worker
                    log.exception("batch failed")
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(AppError(f"encoding failed: {err}", 500))
                self.batches += 1

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
        z = encode_batch(self.lm, sae, ids, sae.cfg.hook_name, attention_mask=torch.from_numpy(mask))
        return [z[i, :len(s)].float().cpu() for i, s in enumerate(seqs)]

    def strs(self, ids: np.ndarray) -> list[str]:
        return [self.vocab[i] if 0 <= i < len(self.vocab) else f"<id {i}>" for i in ids]


def create_worker_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield

    app = FastAPI(title="saescope model worker", version="0.1.0", lifespan=lifespan,
                  description="Live SAE feature activations over a small JSON API, with dynamic batching.")

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return JSONResponse(err.as_json(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad(request: Request, err: RequestValidationError):
        msg = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in err.errors())
        return JSONResponse(AppError(msg, 422).as_json(), status_code=422)

    @app.get("/health", response_model=HealthOut)
    async def health() -> HealthOut:
        return HealthOut(status="ok", model=engine.lm.name, device=engine.lm.device,
                         saes=[SAEDesc(sae_id=k, hook=s.cfg.hook_name, d_sae=s.cfg.d_sae) for k, s in engine.saes.items()],
                         queued=engine.queue.qsize() if engine.queue else 0, max_prompt_tokens=engine.max_prompt_tokens,
                         max_batch=engine.max_batch, batches=engine.batches, requests=engine.requests)

    @app.post("/tokenize", response_model=TokenizeOut)
    async def tokenize(body: TokenizeIn) -> TokenizeOut:
        ids = engine.tokenize(body.sae_id, body.text)
        return TokenizeOut(tokens=engine.strs(ids), ids=ids.tolist())

    @app.post("/activations", response_model=FeatureActsOut)
    async def activations(body: FeatureActsIn) -> FeatureActsOut:
        sae = engine.sae(body.sae_id)
        if body.feature >= sae.cfg.d_sae:
            raise AppError(f"feature {body.feature} does not exist: {body.sae_id} has features 0 to {sae.cfg.d_sae - 1}", 404)
        ids, z = await engine.encode(body)
        v = z[:, body.feature]
        return FeatureActsOut(tokens=engine.strs(ids), values=v.tolist(), max_value=float(v.max()), max_pos=int(v.argmax()))

    @app.post("/top_features", response_model=TopFeaturesOut)
    async def top_features(body: TopFeaturesIn) -> TopFeaturesOut:
        ids, z = await engine.encode(body)
        pos = body.positions if body.positions is not None else list(range(len(ids)))
        bad = [p for p in pos if not 0 <= p < len(ids)]
        if bad or not pos:
            raise AppError(f"positions {bad or pos} are outside the prompt's {len(ids)} tokens (0 to {len(ids) - 1})", 422)
        sub = z[pos]  # (P, d_sae)
        mx, arg = sub.max(0)  # per feature: max over positions
        k = min(body.k, int((mx > 0).sum()))
        top = mx.topk(k) if k else None
        hits = [FeatureHit(index=int(i), value=float(v), pos=int(pos[int(arg[i])]))
                for v, i in zip(top.values, top.indices)] if top is not None else []
        tmax, targ = z.max(1)
        return TopFeaturesOut(tokens=engine.strs(ids), features=hits, token_max=tmax.tolist(),
                              token_argmax=[int(a) if m > 0 else -1 for m, a in zip(tmax, targ)])

    @app.post("/token_features", response_model=TokenFeaturesOut)
    async def token_features(body: TokenFeaturesIn) -> TokenFeaturesOut:
        ids, z = await engine.encode(body)
        k = min(body.k, z.shape[1])
        top = z.topk(k, dim=1)
        per = [[FeatureHit(index=int(i), value=float(v), pos=t) for v, i in zip(vals, idx) if v > 0]
               for t, (vals, idx) in enumerate(zip(top.values, top.indices))]
        return TokenFeaturesOut(tokens=engine.strs(ids), per_token=per)

    return app


def build_engine(model: str, saes: dict[str, str], hooks: dict[str, str | None], device: str, dtype: str,
                 max_prompt_tokens: int = DEFAULTS.max_prompt_tokens, max_batch: int = DEFAULTS.max_batch,
                 batch_wait_ms: float = DEFAULTS.batch_wait_ms, max_queue: int = DEFAULTS.max_queue,
                 timeout_s: float = DEFAULTS.request_timeout_s) -> Engine:
    lm = load_model(model, device, dtype)
    loaded = {}
    for sae_id, ref in saes.items():
        sae = load_sae(ref, hooks.get(sae_id))
        if sae.cfg.d_in != lm.hook_width(sae.cfg.hook_name):
            raise ValueError(f"SAE {sae_id} has d_in {sae.cfg.d_in}; {sae.cfg.hook_name} of {model} has width "
                             f"{lm.hook_width(sae.cfg.hook_name)}")
        loaded[sae_id] = sae.to(lm.device)
    return Engine(lm, loaded, max_prompt_tokens, max_batch, batch_wait_ms, max_queue, timeout_s)


def _exit_with_parent(pid: int) -> None:
    """A child worker must not outlive the dashboard that started it, even if that one is killed with -9."""
    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        log.info("parent %d is gone; the worker exits", pid)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_worker(args: argparse.Namespace) -> int:
    import uvicorn

    from precompute.embedded import resolve_model, resolve_sae

    if args.store:
        from .store import Store

        with Store(args.store) as store:
            infos = store.saes()
        if not infos:
            raise ValueError(f"store {args.store} holds no SAE")
        models = {s.model_path for s in infos}
        if len(models) > 1:
            raise ValueError(f"store {args.store} mixes models ({', '.join(sorted(models))}); start one worker per model with --model/--sae")
        model = infos[0].model_path
        saes = {s.sae_id: s.sae_path for s in infos}
        hooks = {s.sae_id: s.hook for s in infos}
        if not Path(model).exists():  # e.g. the embedded default's cache folder on another machine
            model = resolve_model("default") if "smollm2" in model.lower() else model
    else:
        model = resolve_model(args.model)
        ref = resolve_sae(args.sae)
        sae_id = Path(ref).name or ref
        saes, hooks = {sae_id: ref}, {sae_id: args.hook}
    engine = build_engine(model, saes, hooks, args.device, args.dtype, args.max_prompt_tokens, args.max_batch,
                          args.batch_wait_ms, args.max_queue, args.timeout)
    if args.exit_with_parent:
        _exit_with_parent(args.exit_with_parent)
    log.info("worker ready on http://%s:%d with %s", args.host, args.port, ", ".join(saes))
    uvicorn.run(create_worker_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0
