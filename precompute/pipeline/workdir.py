"""The work area of a running precompute: activations streamed to append-only files, then sealed into Parquet.

Layout of OUT.work/ (see docs/architecture.md):

    run.json                          the run's fingerprint and plan (shards, feature buckets); a rerun checks it
    shard-00000/                      one folder per shard while it streams (a range of contexts; one shard
      progress.json                   when nothing is sharded): contexts done and every file's length then
      tokens.bin, counted.bin         int32 token ids (contexts x T) and counted tokens per context
      acts-0.bin, acts-1.bin, ...     each SAE's nonzero activations as packed (ctx, pos, feature, value) records
    sealed/                           what a finished shard leaves behind (all a cluster node sends back)
      shard-00000.json                its manifest (contexts streamed); written last, so it marks the shard done
      contexts/shard-00000.parquet    ctx, tokens, n_counted
      counts/sae-0/shard-00000.npy    activations per feature (int64, d_sae): plans the table builder's ranges
      acts/sae-0/bucket-00003/shard-00000.parquet   activations of features [3W, 4W): a feature range is read alone
    tables/sae-0/range-00000-00511/   the table builder's output for one feature range (resumable, see write.py)

Crash safety: per batch the records are appended and flushed, then progress.json (the lengths) is replaced
atomically; a restarted shard truncates every file to the recorded length, so a kill -9 loses at most the batch
in flight. Sealing works through the activations in chunks (memory bounded by SEAL_ROWS, not by tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ..errors import UserError
from ..store.kernels import feature_order

RECORD = np.dtype([("ctx", "<i4"), ("pos", "<i2"), ("feature", "<i4"), ("value", "<f4")])  # packed: 14 bytes
SEAL_ROWS = 2_000_000  # activations per sealing chunk (~28 MB of records plus their sort and copies)
ROW_GROUP = 65_536  # Parquet row-group size of sealed activations (min/max statistics per group)
MAX_BUCKETS = 256  # feature buckets per SAE: Parquet files per SAE and shard
MIN_BUCKET = 64  # features per bucket at least
FSYNC_EVERY_S = 30.0  # data survives a kill -9 once flushed; fsync bounds what a power loss can take
PLAN_VERSION = 1


def bucket_width(d_sae: int) -> int:
    """Features per bucket: at most MAX_BUCKETS buckets, each at least MIN_BUCKET features wide."""
    return max(MIN_BUCKET, -(-d_sae // MAX_BUCKETS))


@dataclass
class Plan:
    """What a run streams and how it is split: contexts [0, n_ctx) in shards of whole batches."""

    fingerprint: dict[str, Any]
    n_ctx: int
    context_len: int
    batch_size: int
    d_sae: list[int]  # per SAE of the run
    shards: list[tuple[int, int]] = field(default_factory=list)  # context ranges [c0, c1)
    version: int = PLAN_VERSION

    @classmethod
    def make(cls, fingerprint: dict[str, Any], n_ctx: int, context_len: int, batch_size: int, d_sae: list[int],
             n_shards: int) -> "Plan":
        if n_shards < 1:
            raise UserError(f"--shards {n_shards}: give 1 (no sharding) or more")
        n_batches = -(-n_ctx // batch_size)
        n_shards = min(n_shards, n_batches)  # shard edges fall on batch edges: batches are those of one process
        edges = [min(n_ctx, (n_batches * s // n_shards) * batch_size) for s in range(n_shards + 1)]
        return cls(fingerprint, n_ctx, context_len, batch_size, list(d_sae), list(zip(edges[:-1], edges[1:])))

    @property
    def widths(self) -> list[int]:
        return [bucket_width(d) for d in self.d_sae]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class WorkDir:
    """OUT.work/: the plan, the shards' files and the sealed Parquet."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.sealed = self.root / "sealed"

    def open(self, plan: Plan, restart: bool = False) -> None:
        """Create, or check that an existing work dir was started with the same settings."""
        if restart and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / "run.json"
        if f.exists():
            have = json.loads(f.read_text())
            want = json.loads(plan.to_json())
            if have != want:
                hf, wf = have.get("fingerprint", {}), want["fingerprint"]
                diff = {k: (hf.get(k), v) for k, v in wf.items() if hf.get(k) != v}
                for k in ("n_ctx", "shards", "d_sae", "version"):
                    if have.get(k) != want[k]:
                        diff[k] = (have.get(k), want[k])
                raise UserError(f"{self.root} holds an unfinished run with other settings ({diff}: was, now); "
                                 "rerun with --restart to discard it, or repeat the original command to resume it")
        else:
            atomic_write(f, plan.to_json())

    def shard_dir(self, s: int) -> Path:
        return self.root / f"shard-{s:05d}"

    def manifest(self, s: int) -> Path:
        return self.sealed / f"shard-{s:05d}.json"

    def is_sealed(self, s: int) -> bool:
        return self.manifest(s).exists()

    def contexts_done(self, plan: Plan) -> int:
        """Contexts streamed so far, over all shards (sealed or in progress)."""
        done = 0
        for s, (c0, c1) in enumerate(plan.shards):
            if self.is_sealed(s):
                done += json.loads(self.manifest(s).read_text())["contexts"]
            else:
                p = self.shard_dir(s) / "progress.json"
                if p.exists():
                    done += json.loads(p.read_text())["contexts"]
        return done

    # ---- what the table builder reads ----
    def context_files(self) -> list[str]:
        return sorted(str(p) for p in (self.sealed / "contexts").glob("shard-*.parquet"))

    def counts(self, i: int, d_sae: int) -> np.ndarray:
        total = np.zeros(d_sae, dtype=np.int64)
        for p in sorted((self.sealed / "counts" / f"sae-{i}").glob("shard-*.npy")):
            total += np.load(p)
        return total

    def act_files(self, i: int, width: int, lo: int, hi: int) -> list[str]:
        """Sealed activation files of SAE i that may hold features lo..hi (inclusive)."""
        out = []
        for b in range(lo // width, hi // width + 1):
            out += sorted(str(p) for p in (self.sealed / "acts" / f"sae-{i}" / f"bucket-{b:05d}").glob("*.parquet"))
        return out

    def all_act_files(self, i: int) -> list[str]:
        return sorted(str(p) for p in (self.sealed / "acts" / f"sae-{i}").glob("bucket-*/*.parquet"))

    def sealed_files(self, s: int) -> list[Path]:
        """Every file shard s left under sealed/ (what a remote shard sends back), its manifest last."""
        name = f"shard-{s:05d}"
        files = [p for p in self.sealed.rglob(f"{name}.*")
                 if p != self.manifest(s) and p.suffix in (".parquet", ".npy")]
        return sorted(files) + [self.manifest(s)]


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardWriter:
    """Appends one shard's batches; resumes after the last batch whose progress was recorded."""

    def __init__(self, folder: Path, first_ctx: int, context_len: int, n_saes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.first_ctx, self.T, self.n_saes = first_ctx, context_len, n_saes
        self.names = ["tokens.bin", "counted.bin"] + [f"acts-{i}.bin" for i in range(n_saes)]
        prog = self.folder / "progress.json"
        state = json.loads(prog.read_text()) if prog.exists() else {"contexts": 0, "sizes": {}}
        self.contexts = int(state["contexts"])
        self.files = {}
        for n in self.names:
            p = self.folder / n
            f = open(p, "r+b" if p.exists() else "w+b")
            f.truncate(int(state["sizes"].get(n, 0)))  # drop a batch that was written but not recorded
            f.seek(0, os.SEEK_END)
            self.files[n] = f
        self.last_sync = time.monotonic()

    def append(self, tokens: np.ndarray, counted: np.ndarray, acts: list) -> None:
        """tokens (B, T) int, counted (B,) int; acts[i] = SAE i's SparseActs of this batch (global ctx ids)."""
        if len(acts) != self.n_saes:
            raise UserError(f"append got activations of {len(acts)} SAEs; the shard holds {self.n_saes}")
        self.files["tokens.bin"].write(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        self.files["counted.bin"].write(np.ascontiguousarray(counted, dtype="<i4").tobytes())
        for i, a in enumerate(acts):
            rec = np.empty(len(a.ctx), dtype=RECORD)
            rec["ctx"], rec["pos"], rec["feature"], rec["value"] = a.ctx, a.pos, a.feature, a.value
            self.files[f"acts-{i}.bin"].write(rec.tobytes())
        for f in self.files.values():
            f.flush()
        if time.monotonic() - self.last_sync > FSYNC_EVERY_S:
            self.sync()
        self.contexts += tokens.shape[0]
        atomic_write(self.folder / "progress.json",
                     json.dumps({"contexts": self.contexts, "sizes": {n: f.tell() for n, f in self.files.items()}}))

    def sync(self) -> None:
        for f in self.files.values():
            os.fsync(f.fileno())
        self.last_sync = time.monotonic()

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def seal(self, work: WorkDir, s: int, d_sae: list[int]) -> None:
        """Turn the finished shard into Parquet under work.sealed, write its manifest, remove the raw files."""
        self.sync()
        name = f"shard-{s:05d}"
        n = self.contexts
        tokens = np.fromfile(self.folder / "tokens.bin", dtype="<i4").reshape(n, self.T)
        counted = np.fromfile(self.folder / "counted.bin", dtype="<i4")
        ctx_dir = work.sealed / "contexts"
        ctx_dir.mkdir(parents=True, exist_ok=True)
        tbl = pa.table({"ctx": pa.array(np.arange(self.first_ctx, self.first_ctx + n, dtype=np.int32)),
                        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), self.T)
                        .cast(pa.list_(pa.int32())),
                        "n_counted": pa.array(counted, pa.int32())})
        _write_parquet(tbl, ctx_dir / f"{name}.parquet")
        for i, d in enumerate(d_sae):
            _seal_acts(self.folder / f"acts-{i}.bin", work.sealed, i, d, bucket_width(d), name)
        self.close()
        atomic_write(work.manifest(s), json.dumps({"shard": s, "first_ctx": self.first_ctx, "contexts": n}))
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_parquet(tbl: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(tbl, tmp, row_group_size=ROW_GROUP, compression="zstd")
    os.replace(tmp, path)


def _seal_acts(raw: Path, sealed: Path, i: int, d_sae: int, width: int, name: str) -> None:
    """One SAE's records of one shard -> a Parquet file per feature bucket, sorted by (feature, ctx, pos) within
    each chunk, plus per-feature counts. Reads SEAL_ROWS records at a time."""
    counts = np.zeros(d_sae, dtype=np.int64)
    writers: dict[int, pq.ParquetWriter] = {}
    paths: dict[int, Path] = {}
    schema = pa.schema([("ctx", pa.int32()), ("pos", pa.int16()), ("feature", pa.int32()), ("value", pa.float32())])
    n_rows = raw.stat().st_size // RECORD.itemsize
    try:
        with open(raw, "rb") as f:
            for start in range(0, n_rows, SEAL_ROWS):
                rec = np.fromfile(f, dtype=RECORD, count=min(SEAL_ROWS, n_rows - start))
                # by feature, then ctx, pos: the stream appends in (ctx, pos, feature) order, so one stable counting
                # sort by feature does it (kernels.feature_order checks the order; a full sort otherwise)
                order, chunk_counts, ok = feature_order(rec["ctx"], rec["pos"], rec["feature"], d_sae)
                counts += chunk_counts
                rec = rec[order if ok else np.lexsort((rec["pos"], rec["ctx"], rec["feature"]))]
                bucket = rec["feature"] // width
                cuts = np.flatnonzero(np.diff(bucket)) + 1
                for part in np.split(rec, cuts):
                    b = int(part["feature"][0]) // width
                    if b not in writers:
                        d = sealed / "acts" / f"sae-{i}" / f"bucket-{b:05d}"
                        d.mkdir(parents=True, exist_ok=True)
                        paths[b] = d / f"{name}.parquet"
                        writers[b] = pq.ParquetWriter(paths[b].with_name(paths[b].name + ".tmp"), schema,
                                                      compression="zstd")
                    writers[b].write_table(pa.table({c: part[c] for c in RECORD.names}, schema=schema),
                                           row_group_size=ROW_GROUP)
    finally:
        for w in writers.values():
            w.close()
    for b, p in paths.items():
        os.replace(p.with_name(p.name + ".tmp"), p)
    cdir = sealed / "counts" / f"sae-{i}"
    cdir.mkdir(parents=True, exist_ok=True)
    np.save(cdir / f"{name}.npy.tmp.npy", counts)
    os.replace(cdir / f"{name}.npy.tmp.npy", cdir / f"{name}.npy")
