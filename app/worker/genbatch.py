"""Concurrent steering requests (/steer, /steer_chat) decoded together: the requests that arrive while a generation
runs (or within generation_wait_ms of the first one) go into ONE KV-cached batch
(precompute.interventions.generate_many: left padding, per-row seeds, sampling and stopping), so throughput grows
with concurrency while each request gets exactly what it would alone. One batch per SAE; a batch that fails is
retried one request at a time, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from saescope.precompute import interventions as iv

from ..settings import WORKER

log = logging.getLogger(__name__)


@dataclass
class _Job:
    sae_id: str
    req: iv.GenRequest
    future: asyncio.Future = field(repr=False)


class GenerationBatcher:
    def __init__(self, engine, max_requests: int = WORKER.max_generation_batch,
                 wait_ms: float = WORKER.generation_wait_ms):
        self.engine, self.max_requests, self.wait = engine, max_requests, wait_ms / 1000
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.batches = 0
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, sae_id: str, req: iv.GenRequest) -> tuple[iv.Generation, iv.strength.Scale]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(sae_id, req, fut))
        return await fut

    def _run(self, sae_id: str, reqs: list[iv.GenRequest]):
        sae = self.engine.saes[sae_id]
        with self.engine.model_lock:
            gens = iv.generate_many(self.engine.lm, sae, reqs)
            return [(g, iv.strength.measure_scale(self.engine.lm, sae, g.prompt_ids, g.watch)) for g in gens]

    async def _loop(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_requests:
                left = deadline - time.monotonic()
                try:
                    jobs.append(self.queue.get_nowait() if left <= 0 else
                                await asyncio.wait_for(self.queue.get(), timeout=left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            jobs = [j for j in jobs if not j.future.done()]
            by_sae: dict[str, list[_Job]] = {}
            for j in jobs:
                by_sae.setdefault(j.sae_id, []).append(j)
            for sae_id, group in by_sae.items():
                self.batches += 1
                try:
                    outs = await asyncio.to_thread(self._run, sae_id, [j.req for j in group])
                except Exception as err:
                    if len(group) == 1:
                        _fail(group[0], err)
                        continue
                    log.info("a generation batch of %d failed (%s); running its requests one at a time", len(group),
                             err)
                    for j in group:
                        try:
                            _done(j, (await asyncio.to_thread(self._run, sae_id, [j.req]))[0])
                        except Exception as one:
                            _fail(j, one)
                    continue
                for j, out in zip(group, outs):
                    _done(j, out)


def _done(job: _Job, out) -> None:
    if not job.future.done():
        job.future.set_result(out)


def _fail(job: _Job, err: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(err)


def batcher_of(engine) -> GenerationBatcher:
    """The engine's generation batcher, started on the running event loop at first use."""
    b = getattr(engine, "_generation_batcher", None)
    if b is None:
        b = engine._generation_batcher = GenerationBatcher(engine)
    return b
