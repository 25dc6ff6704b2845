"""Table building at stream speed (issue 19): end to end against bare forward+encode, and the table builder's
activations/s per engine, on a cheap forward (as on a GPU).

Configuration (the issue's, built by bench/memory.py): a random 2-layer Llama (d_model 576, SmolLM2's vocabulary)
and a random 16,384-feature ReLU SAE on blocks.1.hook_resid_post at L0 ~ 82, over pre-tokenized contexts.

Per token count, in one process and one run (the machine may be shared; the load average is printed):
  bare        forward to the hook + SAE encode, results dropped (before and after the run; the mean is used), on
              the first --bare-tokens tokens (its rate does not grow with the run)
  precompute  run_precompute in this process, uninterrupted: stream, tables (every feature range), publish, the
              weights-only tables in their background threads; its phase times come from its "finished" event
              (per step of tables + publish, and the background threads' own seconds). At the first range event
              the sealed activations are hard-linked into a scratch folder; after the run their feature ranges
              are built again per engine and thread count (activations/s of `build_range(engine="sql")` and of
              the default kernels on 1 and 2 threads, same rows, tables compared for equality).
  peak RSS    of a separate `saescope precompute` child at each token count (--rss), through bench.common.peak_rss.

Usage: python bench/tables.py [--tokens 131072 524288 1048576] [--workdir /tmp/bench_tables] [--rss] [--no-sql]
                              [--bare-tokens 131072]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import memory  # noqa: E402


def _folder_tables(folder: Path) -> dict:
    from saescope.precompute.store.write import RANGE_TABLES, read_range_table

    return {n: read_range_table(folder, n).to_pylist() for n in RANGE_TABLES}


def _verify_row(out: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(out), read_only=True)
    try:
        return json.loads(con.execute("SELECT verify FROM saes").fetchall()[0][0])
    finally:
        con.close()


def run(n_tokens: int, work: Path, model: Path, sae_dir: Path, compare_sql: bool, bare_tokens: int) -> dict:
    import torch

    from saescope.precompute.encode import encode_batch
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.pipeline.tables import range_jobs, sample_spec
    from saescope.precompute.pipeline.workdir import Plan, WorkDir
    from saescope.precompute.saes import load_sae
    from saescope.precompute.store.write import build_range, clear_context_cache

    rows = memory.token_rows(work, model, n_tokens)
    lm = load_model(str(model), "cpu", "float32")
    sae = load_sae(str(sae_dir))
    ctxs = np.array([json.loads(ln)["tokens"] for ln in itertools.islice(rows.open(), n_tokens // 128)])
    B = 16
    encode_batch(lm, sae, ctxs[:B], memory.HOOK)

    bare_ctxs = ctxs[:max(B, min(n_tokens, bare_tokens) // 128)]  # its rate does not depend on the run's length

    def bare() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(bare_ctxs), B):
            encode_batch(lm, sae, bare_ctxs[i:i + B], memory.HOOK)
        return len(bare_ctxs) * 128 / (time.perf_counter() - t0)

    load0 = os.getloadavg()[0]
    bare_before = bare()
    print(f"  [{n_tokens:,}] bare {bare_before:.0f} tok/s", flush=True)
    out = work / f"t{n_tokens}.duckdb"
    for p in (out, out.with_name(out.name + ".work")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    tm: dict = {}
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    wd = WorkDir(out.with_name(out.name + ".work"))
    seen: dict = {}

    def on_event(name, **info):
        if name == "range" and not seen:
            # the sealed files are final now: hard links keep them for the engine timings after the run (no copy,
            # nothing the run waits for)
            plan = Plan(**json.loads((wd.root / "run.json").read_text()))
            seen["jobs"] = range_jobs(spec, plan, wd)
            seen["acts"] = int(wd.counts(0, plan.d_sae[0]).sum())
            for f in wd.sealed.rglob("*"):
                if f.is_file():
                    dst = scratch / "sealed" / f.relative_to(wd.sealed)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(f, dst)
        if name == "finished":
            tm.update(info)

    spec = PrecomputeSpec(out=out, model=str(model), tokens=n_tokens, progress=False, saes=[SAESpec(str(sae_dir))],
                          dataset=str(rows), on_event=on_event)
    t0 = time.time()
    run_precompute(spec)  # uninterrupted: stream, ranges, publish, with the weights-only tables beside them
    res = {"tokens": n_tokens, "acts": seen["acts"], "ranges": len(seen["jobs"]), "load_before": load0,
           "wall": time.time() - t0}
    res["verify"] = _verify_row(out)
    linked = scratch / "sealed"
    ctx_files = sorted(str(p) for p in (linked / "contexts").glob("shard-*.parquet"))
    jobs = [(j.lo, j.hi, j.folder.name, [str(linked / Path(f).relative_to(wd.sealed)) for f in j.files])
            for j in seen["jobs"]]
    n_acts = res["acts"]
    folders = {}
    for engine, threads in ([("sql", 1)] if compare_sql else []) + [("kernel", 1), ("kernel", 2)]:
        key = f"{engine}x{threads}"
        dest = scratch / key

        def one(job, dest=dest, engine=engine):
            lo, hi, name, files = job
            build_range(files, ctx_files, lo, hi, dest / name, sample_spec(spec), spec.memory_limit,
                        scratch / "spill", engine=engine)

        t1 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, jobs))
        clear_context_cache()
        res[f"build_{key}"] = time.perf_counter() - t1
        print(f"  [{n_tokens:,}] build_range {engine} on {threads} thread(s): {res[f'build_{key}']:.1f} s for "
              f"{n_acts:,} activations = {n_acts / res[f'build_{key}'] / 1e6:.2f} M/s, load {os.getloadavg()[0]:.1f}",
              flush=True)
        folders[key] = dest
    if compare_sql:
        res["same"] = all(_folder_tables(folders["sqlx1"] / j[2]) == _folder_tables(folders["kernelx1"] / j[2])
                          for j in jobs)
    res["same_threads"] = all(_folder_tables(folders["kernelx2"] / j[2]) == _folder_tables(folders["kernelx1"] / j[2])
                              for j in jobs)
    shutil.rmtree(scratch, ignore_errors=True)
    bare_after = bare()
    res.update(bare=(bare_before + bare_after) / 2, bare_before=bare_before, bare_after=bare_after,
               stream=tm["stream"], load_after=os.getloadavg()[0], phases=tm["phases"], background=tm["background"])
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
    ap.add_argument("--bare-tokens", type=int, default=131_072,
                    help="tokens of each bare forward+encode timing (its first contexts; default %(default)s)")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = memory.make_model(a.workdir / "tiny576")
    sae_dir, _ = memory.make_sae(a.workdir / "relu16k", model, a.l0)
    for n in a.tokens:
        r = run(n, a.workdir, model, sae_dir, not a.no_sql, a.bare_tokens)
        print(json.dumps(r, default=str), flush=True)  # everything measured, before the summary
        bare = r["bare"]
        print(f"{n:,} tokens ({r['acts']:,} activations, L0 {r['l0']:.1f} incl. BOS, {r['ranges']} feature ranges), "
              f"load average {r['load_before']:.1f} -> {r['load_after']:.1f}")
        print(f"  bare forward+encode : {bare:8.0f} tok/s  ({n / bare:.1f} s; before {r['bare_before']:.0f}, "
              f"after {r['bare_after']:.0f})")
        print(f"  stream              : {r['stream']:6.1f} s   ratio {n / r['stream'] / bare:.3f}")
        print(f"  tables + publish    : {r['tables']:6.1f} s   {r['acts'] / r['tables'] / 1e6:.2f} M activations/s "
              "(everything after the stream)")
        print(f"  end to end          : {r['wall_e2e']:6.1f} s   ratio {n / r['wall_e2e'] / bare:.3f}")
        print("  tables + publish by step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
        print("  background threads (s)     : " + ", ".join(f"{k} {v:.1f}" for k, v in r["background"].items()))
        v = r["verify"]
        print(f"  verify: ok {v['ok']}, max_rel_diff {v['max_rel_diff']:.3g}, worst {v.get('worst')}")
        for key in ("sqlx1", "kernelx1", "kernelx2"):
            if f"build_{key}" in r:
                print(f"  build_range {key:<9}: {r[f'build_{key}']:6.1f} s   {r['acts'] / r[f'build_{key}'] / 1e6:.2f} M acts/s")
        if "same" in r:
            print(f"  kernel tables == sql tables: {r['same']}")
        print(f"  kernel tables on 2 threads == on 1 thread: {r['same_threads']}")
        if a.rss:
            out = a.workdir / f"rss{n}.duckdb"
            rss, secs = memory.peak_rss(model, sae_dir, n, out, None)
            print(f"  peak RSS of `saescope precompute --tokens {n:,}`: {rss:.0f} MB ({secs:.0f} s)")
            out.unlink(missing_ok=True)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
