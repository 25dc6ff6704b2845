"""Sharded precompute on a local Ray vs the one-process run, same model, SAE and tokens, back to back.

The one-process run uses every core for torch (and DuckDB); the sharded run starts a local Ray with --cpus
workers, streams --shards context ranges as Ray tasks (one CPU each: each task loads its own model) and builds the
feature ranges' tables as Ray tasks. Prints wall seconds of both, the ratio, and checks that both stores hold the
same rows (the equality the tests assert, here at benchmark size).

Usage: python bench/shards.py [--tokens 65536] [--shards 2] [--cpus 2] [--sae default]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def table_rows(path: Path) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                for t in ("features", "examples", "groups", "contexts")}
    finally:
        con.close()


def same_tables(a: Path, b: Path) -> bool:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"ATTACH '{a}' AS a (READ_ONLY)")
        con.execute(f"ATTACH '{b}' AS b (READ_ONLY)")
        for t in ("features", "examples", "groups", "contexts", "vocab", "cross_matches"):
            diff = con.execute(f"SELECT count(*) FROM (SELECT * FROM a.{t} EXCEPT ALL SELECT * FROM b.{t})").fetchall()[0][0]
            diff += con.execute(f"SELECT count(*) FROM (SELECT * FROM b.{t} EXCEPT ALL SELECT * FROM a.{t})").fetchall()[0][0]
            if diff:
                print(f"table {t}: {diff} rows differ")
                return False
        return True
    finally:
        con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--sae", default="default")
    ap.add_argument("--dataset", default="default")
    a = ap.parse_args()

    import ray

    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(tokens=a.tokens, saes=[SAESpec(a.sae)], dataset=a.dataset, progress=False, feature_map=False,
                      verify_sample=0)
        one = Path(tmp) / "one.duckdb"
        t0 = time.time()
        run_precompute(PrecomputeSpec(out=one, **common))
        t_one = time.time() - t0

        t0 = time.time()
        ray.init(num_cpus=a.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        t_ray = time.time() - t0
        sharded = Path(tmp) / "sharded.duckdb"
        t0 = time.time()
        run_precompute(PrecomputeSpec(out=sharded, shards=a.shards, **common))
        t_sharded = time.time() - t0
        ray.shutdown()
        print(f"{a.tokens:,} tokens, SAE {a.sae}, feature map off, no fp32 check")
        print(f"one process            : {t_one:7.1f} s")
        print(f"{a.shards} shards on local Ray ({a.cpus} CPUs): {t_sharded:7.1f} s  (+ {t_ray:.1f} s to start Ray)")
        print(f"ratio one / sharded    : {t_one / t_sharded:.2f}  (> 1: sharding faster on this machine)")
        print(f"rows: {table_rows(one)}; identical tables: {same_tables(one, sharded)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
