"""Table orchestration: the feature ranges of every SAE (from the sealed per-feature counts), which of them a killed
run had not finished, and their tables built by the executor (write.build_range: compiled kernels, one range at a
time)."""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from ..store.write import SampleSpec, feature_ranges
from .spec import PrecomputeSpec
from .workdir import Plan, WorkDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeJob:
    """One feature range's table build: SAE index i, features lo..hi (inclusive), its output folder and inputs."""

    i: int
    lo: int
    hi: int
    folder: Path
    files: list[str]


def peak_rss() -> str:
    """This process's peak resident memory so far (Linux and macOS), for the log."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{kb / 1024 / (1024 if sys.platform == 'darwin' else 1):.0f} MB"


def release_memory() -> None:
    """Give memory that was freed back to the system (glibc's malloc_trim over every arena; a no-op elsewhere).

    The phases after the stream allocate in several threads (feature ranges, co-occurrence's numba workers, the
    map); what a thread freed stays in its arena, and the peak of a run comes after co-occurrence, when quality's
    forward passes allocate on top. Measured with bench/memory.py (one run each; peaks vary by ~200 MB between runs):
    1M tokens 2,139 MB without, 1,876 MB with; 131k tokens 1,899 MB without, 2,108 MB with. Values are untouched:
    only free pages are returned."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sample_spec(spec: PrecomputeSpec) -> SampleSpec:
    return SampleSpec(spec.context_len, spec.top_k, spec.n_intervals, spec.per_interval, spec.n_quantiles,
                      spec.per_quantile, spec.hist_bins)


def range_jobs(spec: PrecomputeSpec, plan: Plan, work: WorkDir) -> list[RangeJob]:
    """Every feature range holding an activation, in store order."""
    jobs = []
    for i, (d, width) in enumerate(zip(plan.d_sae, plan.widths)):
        counts = work.counts(i, d)
        for lo, hi in feature_ranges(counts, spec.rows_per_range):
            if counts[lo:hi + 1].any():
                folder = work.root / "tables" / f"sae-{i}" / f"range-{lo:07d}-{hi:07d}"
                jobs.append(RangeJob(i, lo, hi, folder, work.act_files(i, width, lo, hi)))
    return jobs


def build_tables(spec: PrecomputeSpec, plan: Plan, work: WorkDir, executor) -> list[RangeJob]:
    """Every feature range's tables (those a killed run had not finished) through the executor; returns all jobs."""
    jobs = range_jobs(spec, plan, work)
    todo = [j for j in jobs if not j.folder.exists()]
    log.info("building per-feature tables: %d feature range(s), %d to do", len(jobs), len(todo))
    executor.build_ranges(spec, work, todo, sample_spec(spec))
    release_memory()
    log.info("feature ranges built (peak memory so far %s)", peak_rss())
    return jobs
