"""Where the two heavy phases run: `LocalExecutor` (this process) or `RayExecutor` (`--shards N [--ray ADDRESS]`).

Both run the same functions on the same rows (stream.stream_shard per shard of contexts, write.build_range per
feature range), so the store is identical. The driver picks one (`executor_for`) and calls

    stream(spec, run, plan, work, prepend) -> seconds in forward (NaN when not measured here)
    build_ranges(spec, work, jobs, sample_spec) -> None (each job's folder exists when it returns)

With Ray (the README's "Precompute on a cluster" says it for users):
- the driver (the machine where you type the command) plans the run, keeps OUT.work/ and writes the store;
- stream tasks, one per shard (a range of whole batches of contexts), each load the model and the SAEs on a
  worker node (one GPU each when the cluster has GPUs), stream their contexts into a node-local folder
  exactly as the one-process run does (resumable there), seal it into Parquet partitioned by feature bucket, and
  send the sealed files back through Ray's object store; the driver writes them under OUT.work/sealed/, so a
  rerun skips every shard it already holds;
- range tasks, one per feature range, get the Parquet files of their features and of the contexts, run
  `write.build_range` and send its output folder back; the driver assembles the store from those folders.
Model, SAE and dataset paths must be readable on every node (or be hub ids); nothing else needs shared storage.
Ray tasks report no events (spec.on_event stays on the driver).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import PRECOMPUTE
from ..errors import SetupError
from ..models import HookedLM
from ..store.write import SampleSpec, build_range, clear_context_cache
from .loading import LoadedSAE, load_model_for, load_saes
from .spec import PrecomputeSpec, SAESpec
from .stream import stream_shard
from .tables import RangeJob
from .workdir import Plan, WorkDir

log = logging.getLogger(__name__)
RAY_EXTRA = "pip install 'saescope[ray]'"


@dataclass
class LoadedRun:
    """What the driver loaded: the model and the run's SAEs (checked and named)."""

    lm: HookedLM
    saes: list[LoadedSAE]


class LocalExecutor:
    """Everything in this process: one shard, then the feature ranges, `threads` at a time (PRECOMPUTE.range_threads;
    the kernels, Parquet reads and sorts release the GIL). Ranges are started in order, each after its "range"
    event: a stop there lets the ranges already started finish and keeps them."""

    def __init__(self, threads: int = PRECOMPUTE.range_threads):
        self.threads = max(1, int(threads))

    def stream(self, spec: PrecomputeSpec, run: LoadedRun, plan: Plan, work: WorkDir, prepend: bool) -> float:
        return stream_shard(spec, run.lm, run.saes, plan, work, 0, prepend)

    def build_ranges(self, spec: PrecomputeSpec, work: WorkDir, jobs: list[RangeJob], sample: SampleSpec) -> None:
        ctx_files = work.context_files()

        def one(job: RangeJob) -> None:
            build_range(job.files, ctx_files, job.lo, job.hi, job.folder, sample, spec.memory_limit,
                        work.root / "spill")

        threads = min(self.threads, max(1, len(jobs)))
        with tqdm(total=len(jobs), desc="tables", unit="range", disable=not spec.progress or not jobs) as bar, \
                ThreadPoolExecutor(threads, thread_name_prefix="saescope-range") as pool:
            pending: set = set()

            def drain(until: int) -> None:
                nonlocal pending
                while len(pending) > until:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()  # a range's error is raised here
                        bar.update(1)

            for n, job in enumerate(jobs):
                drain(threads - 1)
                spec.event("range", index=n, todo=len(jobs))  # before the range: a stop here keeps the finished ones
                pending.add(pool.submit(one, job))
            drain(0)
        clear_context_cache()


def _ray():
    try:
        import ray
    except ImportError as err:
        raise SetupError(f"--shards > 1 runs on Ray, which is not installed here; {RAY_EXTRA} (or run without "
                         "--shards: one process needs no Ray)") from err
    return ray


def connect(address: str | None):
    """Use the Ray this process already joined, else join `address`, else start a local one."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            # address None: $RAY_ADDRESS if set, else a new local Ray
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SetupError(f"could not connect to the Ray cluster at {address!r}: {err}; start it with "
                             "`ray start --head` (or give --ray auto on a node of a running cluster)") from err
    return ray


def _payload(files: list[Path], base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in files}


def _unpack(payload: dict[str, bytes], base: Path) -> None:
    """Write files under base, each complete or not at all (rename)."""
    for rel, data in payload.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, p)


def _run_key(plan: Plan) -> str:
    return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]


def spec_payload(spec: PrecomputeSpec, dtype: str) -> dict[str, Any]:
    """The spec as plain data for a Ray task (no callback; the driver's dtype, so every node runs the same one)."""
    args = asdict(spec)
    args.pop("on_event")
    args["out"] = str(spec.out)
    args["dtype"] = dtype
    return args


def spec_from_payload(args: dict[str, Any]) -> PrecomputeSpec:
    args = dict(args)
    args["saes"] = [SAESpec(**x) for x in args["saes"]]
    return PrecomputeSpec(**args)


def _stream_task(args: dict[str, Any], plan_json: str, s: int, prepend: bool) -> dict[str, bytes]:
    """On a worker node: load model and SAEs, stream shard s into a node-local folder, return the sealed files."""
    spec = spec_from_payload(args)
    plan = Plan(**json.loads(plan_json))
    plan.shards = [tuple(x) for x in plan.shards]
    local = WorkDir(Path(tempfile.gettempdir()) / "saescope-shards" / _run_key(plan))
    local.root.mkdir(parents=True, exist_ok=True)
    loaded = load_saes(spec.saes)
    lm = load_model_for(spec, loaded)
    stream_shard(spec, lm, loaded, plan, local, s, prepend, progress=False)
    out = _payload(local.sealed_files(s), local.sealed)
    for f in local.sealed_files(s):  # sent: the driver holds them now
        f.unlink()
    return out


def _range_task(files: dict[str, bytes], contexts: dict[str, bytes], lo: int, hi: int, spec: SampleSpec,
                memory_limit: str) -> dict[str, bytes]:
    """On a worker node: one feature range's tables from its Parquet files; returns the output folder's files."""
    with tempfile.TemporaryDirectory(prefix="saescope-range-") as d:
        base = Path(d)
        _unpack(files, base / "in")
        _unpack(contexts, base / "in")
        out = build_range([str(base / "in" / k) for k in sorted(files)], [str(base / "in" / k) for k in sorted(contexts)],
                          lo, hi, base / "out", spec, memory_limit, base / "spill")
        return _payload(sorted(p for p in out.iterdir()), out)


class RayExecutor:
    """Shards and feature ranges as Ray tasks (module docstring)."""

    def __init__(self, address: str | None):
        self.address = address

    def stream(self, spec: PrecomputeSpec, run: LoadedRun, plan: Plan, work: WorkDir, prepend: bool) -> float:
        """Every shard not yet under OUT.work/sealed/, as Ray tasks; their sealed files are written there."""
        ray = connect(self.address)
        todo = [s for s in range(len(plan.shards)) if not work.is_sealed(s)]
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=2)(_stream_task)
        args = spec_payload(spec, plan.fingerprint["dtype"].removeprefix("torch."))
        log.info("streaming %d shard(s) of %d on Ray (%s GPU(s) in the cluster)", len(todo), len(plan.shards),
                 gpus or "no")
        pending = {task.remote(args, plan.to_json(), s, prepend): s for s in todo}
        with tqdm(total=len(todo), desc="shards", unit="shard", disable=not spec.progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ready[0])
                payload = ray.get(ready[0])
                manifest = f"shard-{s:05d}.json"
                _unpack({k: v for k, v in payload.items() if k != manifest}, work.sealed)
                _unpack({manifest: payload[manifest]}, work.sealed)  # last: it marks the shard as held
                bar.update(1)
        return float("nan")  # forward time is spent on the nodes

    def build_ranges(self, spec: PrecomputeSpec, work: WorkDir, jobs: list[RangeJob], sample: SampleSpec) -> None:
        """Feature ranges as Ray tasks; each finished range is written into its folder under OUT.work/tables/."""
        if not jobs:
            return
        ray = connect(self.address)
        task = ray.remote(num_cpus=1, max_retries=2)(_range_task)
        ctx_ref = ray.put(_payload([Path(p) for p in work.context_files()], work.sealed))
        pending = {task.remote(_payload([Path(p) for p in j.files], work.sealed), ctx_ref, j.lo, j.hi, sample,
                               spec.memory_limit): j.folder for j in jobs}
        with tqdm(total=len(jobs), desc="tables", unit="range", disable=not spec.progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                folder = pending.pop(ready[0])
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                _unpack(ray.get(ready[0]), tmp)
                os.replace(tmp, folder)
                bar.update(1)


def executor_for(spec: PrecomputeSpec) -> LocalExecutor | RayExecutor:
    return LocalExecutor() if spec.shards == 1 else RayExecutor(spec.ray)
