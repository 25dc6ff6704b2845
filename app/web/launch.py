"""`saescope serve`: uvicorn for the dashboard, and a supervised model worker as a child process by default.

The supervisor restarts a worker that dies, waiting longer after each quick death (1 s, 2 s, 4 s … up to
SERVE.worker_restart_max_s), logs why it died (the last line it printed to stderr), and tells the pages that
reason, so "live inspection is unavailable" always says what went wrong.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..settings import SERVE, WORKER

log = logging.getLogger(__name__)
# a line of the worker's stderr that says what went wrong: the CLI's "error: …", a Python exception's last line,
# or a log record at ERROR/CRITICAL (format "HH:MM:SS LEVEL name: message")
_ERROR_LINE = re.compile(r"^(?:error: (?P<e>.+)|(?P<x>[A-Za-z_.]*(?:Error|Exception|Interrupt|Exit)(?::.*)?)"
                         r"|\S+ (?:ERROR|CRITICAL) \S+: (?P<l>.+))$")


class WorkerSupervisor:
    """Runs `saescope worker --store STORE` as a child that never outlives this process, and keeps it running."""

    def __init__(self, store: Path, host: str, port: int, extra: list[str] | None = None,
                 max_backoff_s: float = SERVE.worker_restart_max_s, secret: str | None = None):
        self.cmd = [sys.executable, "-m", "saescope.app.cli", "worker", "--store", str(store), "--host", host, "--port",
                    str(port), "--exit-with-parent", str(os.getpid()), *(extra or [])]
        self.url = f"http://{host}:{port}"
        self.max_backoff_s = max_backoff_s
        self.secret = secret
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: str | None = None  # why the last worker died, for the pages
        self.load_s: float | None = None  # how long the last worker took from start to "worker ready" (measured)
        self._started = time.monotonic()
        self._restart_at: float | None = None  # when the next worker starts, while waiting out the backoff
        self._ready = False
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-supervisor")

    def start(self) -> "WorkerSupervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def eta_s(self) -> float:
        """Seconds until a restarted worker should answer: the rest of the backoff plus the measured load time
        (SERVE.worker_load_guess_s before one was measured)."""
        now = time.monotonic()
        load = self.load_s if self.load_s is not None else SERVE.worker_load_guess_s
        if self._restart_at is not None and now < self._restart_at:
            return self._restart_at - now + load
        return max(1.0, load - (now - self._started))

    def reason(self) -> str | None:
        """Why the worker is not answering, when its process told us (None while it runs or starts)."""
        if self.last_exit is None or self._ready:
            return None
        return f"{self.last_exit}; restarting, about {self.eta_s():.0f} s (restarts so far: {self.restarts})"

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        if self.secret:  # through the environment, never the command line (which `ps` shows)
            env[WORKER.secret_env] = self.secret
        proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, errors="replace", env=env)
        threading.Thread(target=self._pump, args=(proc,), daemon=True, name="worker-stderr").start()
        return proc

    def _pump(self, proc: subprocess.Popen) -> None:
        """Pass the worker's stderr through to ours, keeping its last lines for the exit reason."""
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            self._tail.append(line.rstrip())
            if "worker ready on" in line and proc is self.proc:
                self.load_s, self._ready = time.monotonic() - self._started, True

    def _exit_reason(self, code: int) -> str:
        """The exit code or signal, and the worker's own last error line if it printed one (`error: …`, a
        Python exception, a log record at ERROR or CRITICAL); never an ordinary log line that happened to be last."""
        errors = [ln for ln in self._tail if _ERROR_LINE.match(ln)]
        m = _ERROR_LINE.match(errors[-1]) if errors else None
        last = (m.group("e") or m.group("x") or m.group("l")) if m else ""
        if code >= 0:
            how = f"exit code {code}"
        else:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "an unknown signal"
            how = f"killed by signal {-code}, {name}" + (": out of memory, or kill -9" if -code == signal.SIGKILL else "")
        return f"the worker process ended ({how})" + (f": {last}" if last else "")

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self._tail.clear()
            started = self._started = time.monotonic()
            self._restart_at, self._ready = None, False
            self.proc = self._spawn()
            code = self.proc.wait()
            if self._stop.is_set():
                return
            self.last_exit = self._exit_reason(code)
            log.error("model worker died: %s", self.last_exit)
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, self.max_backoff_s)
            log.info("restarting the model worker in %.0f s", backoff)
            self._restart_at = time.monotonic() + backoff
            if self._stop.wait(backoff):
                return
            self.restarts += 1


def serve_store(store: Path, host: str = SERVE.host, port: int = SERVE.port, worker_url: str | None = None,
                start_worker: bool = True, worker_port: int = WORKER.port, prewarm: bool = True,
                worker_secret: str | None = None) -> int:
    import uvicorn

    from saescope.precompute.store import Store

    from .app import create_app

    Store(store).close()  # fail now, with the store's own message, if it is missing, damaged or of another version
    supervisor = None
    worker_secret = worker_secret or os.environ.get(WORKER.secret_env) or None
    if worker_url is None and start_worker:
        supervisor = WorkerSupervisor(store, "127.0.0.1", worker_port, secret=worker_secret).start()
        worker_url = supervisor.url
        log.info("model worker starting at %s (loading the model takes a few seconds; pages work meanwhile)", worker_url)
    app = create_app(store, worker_url, cache=True, prewarm=prewarm,
                     explain_worker_down=supervisor.reason if supervisor else None, worker_secret=worker_secret)
    print(f"\n  saescope is serving {store} at http://{host}:{port}/\n", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0
