"""The precompute pipeline: `run_precompute(PrecomputeSpec(...))` builds a store.

    spec.py       the run spec (every setting, with its help text; the CLI's flags are its fields) and run files
    loading.py    SAEs and model, their checks (d_in through encode.check_d_in), SAE ids, prepend_bos
    workdir.py    OUT.work/: the plan, the shards' append-only files, the sealed Parquet (crash-safe, resumable)
    stream.py     the streaming pass over one shard (`stream_shard`)
    tables.py     the feature ranges and their table builds
    executors.py  LocalExecutor (this process) and RayExecutor (--shards N): one interface
    publish.py    the store from the ranges and the weights, renamed into place when complete
    driver.py     `run_precompute`: load -> plan -> stream -> tables -> publish
"""

from .driver import run_precompute
from ..encode import check_d_in
from .spec import EventHook, PrecomputeSpec, SAESpec, load_run_file

__all__ = ["run_precompute", "PrecomputeSpec", "SAESpec", "EventHook", "load_run_file", "check_d_in"]
