"""Table building at stream speed (issue 19): end to end against bare forward+encode, and the table builder's
activations/s per engine, on a cheap forward (as on a GPU).

Configuration (the issue's, built by bench/memory.py): a random 2-layer Llama (d_model 576, SmolLM2's vocabulary)
and a random 16,384-feature ReLU SAE on blocks.1.hook_resid_post at L0 ~ 82, over pre-tokenized contexts.

Per token count, in one process and one run (the machine may be shared; the load average is printed):
  bare        forward to the hook + SAE encode, results dropped (before and after the run; the mean is used)
  precompute  run_precompute in this process: stream, tables (every feature range), publish; its phase times come
              from its events. The run is stopped after the stream (at the first range event, as a kill would),
              the feature ranges of the sealed activations are built once per engine into a scratch folder
              (activations/s of `build_range(engine="sql")` and of the default kernels, same rows, tables compared
              for equality), then the run resumes and finishes.
  peak RSS    of a separate `saescope precompute` child at each token count (--rss), through bench.common.peak_rss.

Usage: python bench/tables.py [--tokens 131072 524288 1048576] [--workdir /tmp/bench_tables] [--rss] [--no-sql]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import memory  # noqa: E402


class _Stop(Exception):
    pass


def _folder_tables(folder: Path) -> dict:
    from saescope.precompute.store.write import RANGE_TABLES, read_range_table

    return {n: read_range_table(folder, n).to_pylist() for n in RANGE_TABLES}


def run(n_tokens: int, work: Path, model: Path, sae_dir: Path, compare_sql: bool) -> dict:
    import torch

    from saescope.precompute.encode import encode_batch
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.pipeline.tables import range_jobs, sample_spec
    from saescope.precompute.pipeline.workdir import Plan, WorkDir
    from saescope.precompute.saes import load_sae
    from saescope.precompute.store.write import build_range

    rows = memory.token_rows(work, model, n_tokens)
    lm = load_model(str(model), "cpu", "float32")
    sae = load_sae(str(sae_dir))
    ctxs = np.array([json.loads(ln)["tokens"] for ln in itertools.islice(rows.open(), n_tokens // 128)])
    B = 16
    encode_batch(lm, sae, ctxs[:B], memory.HOOK)

    def bare() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(ctxs), B):
            encode_batch(lm, sae, ctxs[i:i + B], memory.HOOK)
        return len(ctxs) * 128 / (time.perf_counter() - t0)

    load0 = os.getloadavg()[0]
    bare_before = bare()
    print(f"  [{n_tokens:,}] bare {bare_before:.0f} tok/s", flush=True)
    out = work / f"t{n_tokens}.duckdb"
    for p in (out, out.with_name(out.name + ".work")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    tm: dict = {}
    stop = {"armed": True}

    def on_event(name, **info):
        if name == "range" and stop["armed"]:
            raise _Stop
        if name == "finished":
            tm.update(info)

    spec = PrecomputeSpec(out=out, model=str(model), tokens=n_tokens, progress=False, saes=[SAESpec(str(sae_dir))],
                          dataset=str(rows), on_event=on_event)
    t0 = time.time()
    try:
        run_precompute(spec)
    except _Stop:
        pass
    t_stopped = time.time() - t0
    wd = WorkDir(out.with_name(out.name + ".work"))
    plan = Plan(**json.loads((wd.root / "run.json").read_text()))
    jobs = range_jobs(spec, plan, wd)
    n_acts = int(wd.counts(0, plan.d_sae[0]).sum())
    res = {"tokens": n_tokens, "acts": n_acts, "ranges": len(jobs), "load_before": load0}
    scratch = work / "scratch"
    folders = {}
    for engine in (["sql"] if compare_sql else []) + ["kernel"]:
        t1 = time.perf_counter()
        for j in jobs:
            f = scratch / engine / j.folder.name
            build_range(j.files, wd.context_files(), j.lo, j.hi, f, sample_spec(spec), spec.memory_limit,
                        wd.root / "spill", engine=engine)
        res[f"build_{engine}"] = time.perf_counter() - t1
        print(f"  [{n_tokens:,}] stream {t_stopped:.1f} s (with model load); build_range {engine}: "
              f"{res[f'build_{engine}']:.1f} s for {n_acts:,} activations = "
              f"{n_acts / res[f'build_{engine}'] / 1e6:.2f} M/s, load {os.getloadavg()[0]:.1f}", flush=True)
        folders[engine] = scratch / engine
    if compare_sql:
        same = all(_folder_tables(folders["sql"] / j.folder.name) == _folder_tables(folders["kernel"] / j.folder.name)
                   for j in jobs)
        res["same"] = same
    shutil.rmtree(scratch, ignore_errors=True)
    stop["armed"] = False
    t2 = time.time()
    run_precompute(spec)  # resumes: every shard is sealed, so only tables and publish run
    res["resume_wall"] = time.time() - t2
    bare_after = bare()
    res.update(bare=(bare_before + bare_after) / 2, bare_before=bare_before, bare_after=bare_after,
               stream=t_stopped - tm["load"], load_after=os.getloadavg()[0])  # minus a model load like its own
    res["tables"] = tm["publish"]
    res["wall_e2e"] = res["stream"] + res["tables"]
    res["l0"] = n_acts / (n_tokens)
    out.unlink(missing_ok=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[131_072])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_tables"))
    ap.add_argument("--l0", type=float, default=70.0, help="bench/memory.py's calibration target (held-out ~82)")
    ap.add_argument("--no-sql", action="store_true", help="skip the SQL engine's timing and the equality check")
    ap.add_argument("--rss", action="store_true", help="also the peak RSS of a `saescope precompute` child")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = memory.make_model(a.workdir / "tiny576")
    sae_dir, _ = memory.make_sae(a.workdir / "relu16k", model, a.l0)
    for n in a.tokens:
        r = run(n, a.workdir, model, sae_dir, not a.no_sql)
        bare = r["bare"]
        print(f"{n:,} tokens ({r['acts']:,} activations, L0 {r['l0']:.1f} incl. BOS, {r['ranges']} feature ranges), "
              f"load average {r['load_before']:.1f} -> {r['load_after']:.1f}")
        print(f"  bare forward+encode : {bare:8.0f} tok/s  ({n / bare:.1f} s; before {r['bare_before']:.0f}, "
              f"after {r['bare_after']:.0f})")
        print(f"  stream              : {r['stream']:6.1f} s   ratio {n / r['stream'] / bare:.3f}")
        print(f"  tables + publish    : {r['tables']:6.1f} s")
        print(f"  end to end          : {r['wall_e2e']:6.1f} s   ratio {n / r['wall_e2e'] / bare:.3f}")
        for e in ("sql", "kernel"):
            if f"build_{e}" in r:
                print(f"  build_range {e:<7} : {r[f'build_{e}']:6.1f} s   {r['acts'] / r[f'build_{e}'] / 1e6:.2f} M acts/s")
        if "same" in r:
            print(f"  kernel tables == sql tables: {r['same']}")
        if a.rss:
            out = a.workdir / f"rss{n}.duckdb"
            rss, secs = memory.peak_rss(model, sae_dir, n, out, None)
            print(f"  peak RSS of `saescope precompute --tokens {n:,}`: {rss:.0f} MB ({secs:.0f} s)")
            out.unlink(missing_ok=True)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
