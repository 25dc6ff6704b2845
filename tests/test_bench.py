"""bench/serve.py: the Python load generator (used when wrk is missing) and the Makefile target that installs wrk."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.lock:
            self.seen.append(self.path)
        status = 500 if self.path == "/fail" else 200
        body = b"ok"
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass



def test_the_python_load_generator_counts_requests_and_latencies():
    """Before: bench/serve.py exited with "needs wrk" when wrk was not installed; it now falls back to Python."""
    sys.path.insert(0, str(ROOT))
    from bench.serve import run_load, run_python

    _Counting.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        paths = ["/a", "/b", "/c", "/fail"]
        r = run_python(base, paths, "cold", clients=3, seconds=30, max_requests=40)
        assert r.tool == "python"
        assert r.requests == 40 == len(_Counting.seen)  # the bound holds, and every request reached the server
        assert r.errors == _Counting.seen.count("/fail") == 10  # cold: paths in turn, so each one 10 times
        assert sorted(_Counting.seen) == sorted(paths * 10)
        assert 0 < r.p50_ms <= r.p95_ms and r.seconds > 0
        _Counting.seen = []
        warm = run_load(base, paths[:3], "warm", clients=2, seconds=0.5, python=True)
        assert warm.tool == "python" and warm.requests == len(_Counting.seen) > 0 and warm.errors == 0
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(ValueError, match="loopback"):
        run_python("http://example.com", ["/"], "warm", 1, 1.0, max_requests=1)



def _make_targets(text: str) -> dict[str, tuple[list[str], str]]:
    """target -> (prerequisites, recipe) of a Makefile (continuation lines joined)."""
    targets: dict[str, tuple[list[str], str]] = {}
    current = None
    for line in text.replace("\\\n", " ").splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-]+):(?!=)\s*(.*)$", line)
        if m and not line.startswith("\t"):
            current = m.group(1)
            targets[current] = (m.group(2).split(), "")
        elif line.startswith("\t") and current:
            deps, recipe = targets[current]
            targets[current] = (deps, recipe + line.strip() + "\n")
        elif not line.strip() or line.startswith("#"):
            continue
        else:
            current = None
    return targets



@pytest.mark.slow  # runs make
def test_make_bench_installs_wrk_when_missing(tmp_path):
    """Before: nothing installed wrk, so `make bench` failed on a fresh machine. The bench target now depends
    on a target that installs Debian's wrk (apt-get as root, through sudo otherwise) when it is missing; the
    recipe is run here with apt-get, sudo and id replaced by scripts that record their arguments."""
    makefile = (ROOT / "Makefile").read_text()
    targets = _make_targets(makefile)
    seen, todo, installer = set(), ["bench"], None
    while todo:  # the bench target and everything it depends on
        t = todo.pop()
        if t in seen or t not in targets:
            continue
        seen.add(t)
        deps, recipe = targets[t]
        todo += deps
        if "command -v wrk" in recipe and re.search(r"apt-get install .*\bwrk\b", recipe):
            installer = t
    assert installer, "no target `make bench` depends on installs wrk"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("apt-get", "sudo"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n'
                                    + ('exec "$@"\n' if name == "sudo" else ""))
    for uid in ("0", "1000"):
        (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
        for p in bin_dir.iterdir():
            p.chmod(0o755)
        calls.write_text("")
        # PATH holds only the stubs (no wrk): make's /bin/sh runs the recipe as on a fresh machine
        r = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), installer],
                           cwd=tmp_path, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True,
                           text=True, timeout=60, executable=shutil.which("make"))
        assert r.returncode == 0, r.stderr
        lines = calls.read_text().splitlines()
        if uid == "0":
            assert "apt-get install -y -qq wrk" in lines and not any(ln.startswith("sudo") for ln in lines), lines
        else:
            assert "sudo apt-get install -y -qq wrk" in lines and "apt-get install -y -qq wrk" in lines, lines

