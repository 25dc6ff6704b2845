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
        subprocess.run([sys.executable, "-m", "app.cli", "precompute", "--tokens", str(tokens), "--out", str(path)],
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
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--port", str(port), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/health", 180)
    return proc, url
