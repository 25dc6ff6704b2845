"""saescope vs SAEDashboard (the peer) on the same model, SAE and tokens, back to back on this machine.

The peer is SAEDashboard 0.8.0's NeuronpediaRunner, set up offline by ../shared/peer/setup.sh under $PEER
(default /tmp/peer): SmolLM2-135M-Instruct, a SAELens standard ReLU SAE with 4,608 features on
blocks.9.hook_resid_post, and 2,048 fixed contexts of 128 tokens. Both runs go under `/usr/bin/time -v`;
this script prints wall seconds, CPU seconds (user + sys), peak RSS and tokens/s for each, and the ratios
peer / saescope (> 1 means saescope is better). Machines of this kind differ in CPU, so only ratios from one
invocation count; the load average before each run is printed too (the machine may be shared).

saescope is called through its CLI (`.venv/bin/saescope precompute ...`) on the peer's own token rows
(pre-tokenized JSONL written from $PEER/data/contexts.jsonl), so both see exactly the same contexts.

Usage:
  python bench/peer.py                       # 2,048 contexts, 4,608 features (the issue's configuration)
  python bench/peer.py --contexts 256 --features 256
  python bench/peer.py --skip-peer           # reuse the last peer result for this configuration
Results are written as JSON to --work (default /tmp/peerrun): peer_c<C>_f<F>.json, saescope_c<C>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPTS = ROOT.parent / "shared" / "peer"
CTX_LEN = 128


def parse_time_v(text: str) -> dict[str, float]:
    """Wall, user, sys seconds and peak RSS (MB) from GNU time's -v report."""
    def grab(label: str) -> str:
        m = re.search(re.escape(label) + r":\s*(\S+)", text)
        if not m:
            raise ValueError(f"no {label!r} in the /usr/bin/time -v output:\n{text[-2000:]}")
        return m.group(1)

    parts = [float(p) for p in grab("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    user, sys_ = float(grab("User time (seconds)")), float(grab("System time (seconds)"))
    return {"wall_s": wall, "user_s": user, "sys_s": sys_, "cpu_s": user + sys_,
            "peak_rss_mb": int(grab("Maximum resident set size (kbytes)")) / 1024}


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_info() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"flags\s*:\s*(.*)", text)
    fl = set(flags.group(1).split()) if flags else set()
    simd = "avx512_bf16" if "avx512_bf16" in fl else "avx512f" if "avx512f" in fl else "avx2" if "avx2" in fl else "other"
    return f"{name.group(1).strip() if name else '?'}, {os.cpu_count()} cores, best SIMD {simd}"


def run_peer(peer: Path, contexts: int, features: int) -> dict:
    env = dict(os.environ, PEER=str(peer), N_CONTEXTS=str(contexts), N_FEATURES=str(features))
    load = load_avg()
    proc = subprocess.run(["bash", str(PEER_SCRIPTS / "run_saedashboard.sh")], env=env, capture_output=True,
                          text=True, cwd=PEER_SCRIPTS.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"the peer run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    run_dir = peer / "runs" / f"c{contexts}_f{features}_b128_p32"
    res = parse_time_v((run_dir / "time.txt").read_text())
    timings = re.search(r"^TIMINGS (.*)$", proc.stdout, re.M)
    res.update(tool="saedashboard", contexts=contexts, features=features, last_line=last, load_before=load,
               run_dir=str(run_dir), timings=json.loads(timings.group(1)) if timings else None,
               when=time.strftime("%Y-%m-%d %H:%M:%S"))
    return res


def saescope_input_args(peer: Path, contexts: int, work: Path) -> list[str]:
    """The flags that say which tokens saescope reads: the peer's own token rows (BOS + 127 tokens each),
    pre-tokenized, so both tools see exactly the same contexts."""
    rows = work / f"peer_tokens_c{contexts}.jsonl"
    with (peer / "data" / "contexts.jsonl").open() as src, rows.open("w") as dst:
        for n, line in enumerate(src):
            if n >= contexts:
                break
            dst.write(json.dumps({"tokens": json.loads(line)["tokens"]}) + "\n")
    return ["--dataset", str(rows)]


def run_saescope(cmd: list[str], peer: Path, contexts: int, work: Path, extra: list[str], tag: str = "") -> dict:
    out = work / f"saescope_c{contexts}{tag}.duckdb"
    for p in (out, out.with_name(out.name + ".tmp"), out.with_name(out.name + ".tmp.wal"), out.with_name(out.name + ".wal")):
        p.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
    time_file = work / f"saescope_c{contexts}{tag}.time.txt"
    log_file = work / f"saescope_c{contexts}{tag}.log"
    args = [*cmd, "precompute", "--model", "default", "--sae", str(peer / "sae"),
            *saescope_input_args(peer, contexts, work), "--tokens", str(contexts * CTX_LEN),
            "--context-len", str(CTX_LEN), "--out", str(out), "--sae-id", "peer", "--restart", *extra]
    load = load_avg()
    with log_file.open("w") as log:
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), *args], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))
    text = log_file.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"saescope failed ({shlex.join(args)}):\n{text[-4000:]}")
    res = parse_time_v(time_file.read_text())
    split = re.search(r"\(load (\d+) s, stream (\d+) s, tables (\d+) s[;)]", text)
    ran_out = re.search(r"ran out after (\d+) contexts", text)
    res.update(tool="saescope", contexts=contexts, features="all", command=shlex.join(args), load_before=load,
               phases=dict(zip(("load_s", "stream_s", "tables_s"), map(int, split.groups()))) if split else None,
               contexts_done=int(ran_out.group(1)) if ran_out else contexts, when=time.strftime("%Y-%m-%d %H:%M:%S"))
    return res


def report(peer: dict, ours: dict) -> str:
    toks = ours["contexts"] * CTX_LEN
    rows = [f"{'':12} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'tokens/s':>9}  load before"]
    for r in (peer, ours):
        rows.append(f"{r['tool']:12} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mb']:12.0f} "
                    f"{r['contexts'] * CTX_LEN / r['wall_s']:9.0f}  {r['load_before']}")
    rows.append(f"{'ratio p/s':12} {peer['wall_s'] / ours['wall_s']:8.2f} {peer['cpu_s'] / ours['cpu_s']:8.2f} "
                f"{peer['peak_rss_mb'] / ours['peak_rss_mb']:12.2f}   (peer / saescope; > 1: saescope better)")
    if ours.get("phases"):
        rows.append(f"saescope phases: {ours['phases']}; stream {toks / max(1, ours['phases']['stream_s']):.0f} tok/s")
    if ours["contexts_done"] != ours["contexts"]:
        rows.append(f"WARNING: saescope's dataset ran out after {ours['contexts_done']} contexts")
    if peer["features"] != 4608:
        rows.append(f"note: the peer did features 0..{peer['features'] - 1}; saescope always does all 4,608")
    rows.append(f"peer: {peer['last_line']}  ({peer['when']})")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=2048, help="contexts of 128 tokens, 1..2048 (default: 2048)")
    ap.add_argument("--features", type=int, default=4608, help="features the peer does, 1..4608 (default: 4608)")
    ap.add_argument("--skip-peer", action="store_true", help="reuse the last peer result of this configuration")
    ap.add_argument("--peer", type=Path, default=Path(os.environ.get("PEER", "/tmp/peer")), help="peer setup dir")
    ap.add_argument("--work", type=Path, default=Path("/tmp/peerrun"), help="where results and the store go")
    ap.add_argument("--saescope", default=str(ROOT / ".venv" / "bin" / "saescope"),
                    help="the saescope command (default: %(default)s)")
    ap.add_argument("--order", choices=("peer-first", "saescope-first"), default="peer-first")
    ap.add_argument("--also", default=None, metavar="FLAGS",
                    help="a second saescope run with these extra flags after the peer, e.g. '--dtype bfloat16' "
                    "(reported against the same peer run)")
    ap.add_argument("saescope_args", nargs="*", help="extra flags for saescope precompute (after --)")
    a = ap.parse_args()
    if not 1 <= a.contexts <= 2048:
        raise SystemExit(f"--contexts {a.contexts}: allowed 1..2048 (the peer's fixed token set)")
    if not 1 <= a.features <= 4608:
        raise SystemExit(f"--features {a.features}: allowed 1..4608 (the peer SAE's width)")
    for need in (a.peer / "venv" / "bin" / "python", a.peer / "sae" / "cfg.json", a.peer / "data" / "contexts.jsonl"):
        if not need.exists():
            raise SystemExit(f"missing {need}: run `cd {PEER_SCRIPTS.parent} && PEER={a.peer} bash peer/setup.sh` first")
    a.work.mkdir(parents=True, exist_ok=True)
    peer_json = a.work / f"peer_c{a.contexts}_f{a.features}.json"
    print(f"machine: {cpu_info()}; load {load_avg()}", flush=True)

    def peer_step() -> dict:
        if a.skip_peer:
            if not peer_json.exists():
                raise SystemExit(f"--skip-peer: no earlier peer result {peer_json}; run once without it")
            print(f"peer: reusing {peer_json}", flush=True)
            return json.loads(peer_json.read_text())
        print(f"peer: SAEDashboard, {a.contexts} contexts x {a.features} features ...", flush=True)
        r = run_peer(a.peer, a.contexts, a.features)
        peer_json.write_text(json.dumps(r, indent=1))
        print(f"  {r['last_line']}", flush=True)
        return r

    def ours_step() -> dict:
        print(f"saescope: {a.contexts * CTX_LEN:,} tokens, all features ...", flush=True)
        r = run_saescope(shlex.split(a.saescope), a.peer, a.contexts, a.work, a.saescope_args)
        (a.work / f"saescope_c{a.contexts}.json").write_text(json.dumps(r, indent=1))
        print(f"  wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        return r

    if a.order == "peer-first":
        peer = peer_step()
        ours = ours_step()
    else:
        ours = ours_step()
        peer = peer_step()
    print(report(peer, ours))
    if a.also:
        print(f"saescope again with {a.also} ...", flush=True)
        second = run_saescope(shlex.split(a.saescope), a.peer, a.contexts, a.work, [*a.saescope_args, *shlex.split(a.also)],
                              tag="_also")
        second["tool"] = "saescope+"
        (a.work / f"saescope_c{a.contexts}_also.json").write_text(json.dumps(second, indent=1))
        print(f"with {a.also}:")
        print(report(peer, second))
    return 0


if __name__ == "__main__":
    sys.exit(main())
