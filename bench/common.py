"""Helpers shared by the benchmarks: a store to measure on, free ports, percentiles."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_store(path: Path, tokens: int) -> Path:
    """The embedded default precomputed over `tokens` tokens (built once, reused)."""
    if not path.exists():
        subprocess.run([sys.executable, "-m", "saescope.app.cli", "precompute", "--tokens", str(tokens), "--out", str(path)],
                       check=True, cwd=ROOT)
    return path


def wait_up(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def start_worker(*extra: str) -> tuple[subprocess.Popen, str]:
    """`saescope worker` on the embedded default on a free port (its own process group): (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "worker", "--port", str(port), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/health", 180)
    return proc, url


# A small launcher between the benchmark and the measured command. Linux keeps a process's peak RSS across
# fork+exec (the forked copy of the parent counts), so a benchmark that has loaded a model would inflate its
# child's ru_maxrss by its own size; this fresh interpreter (~10 MB) forks the command instead and reports the
# command's own peak.
_LAUNCHER = """
import json, os, subprocess, sys
log = open(sys.argv[1], "w")
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=log)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def peak_rss(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run cmd (stderr to `log`), return (its peak RSS in MB, wall seconds); a failure raises with the log's tail."""
    import json

    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), *cmd], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["status"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
    return r["maxrss_kb"] / 1024, time.time() - t0
