"""`saescope serve`: uvicorn for the dashboard, with a model worker as a child process by default."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def start_worker_process(store: Path, host: str, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    """The model worker as a child that never outlives this process (it watches for its parent to go)."""
    cmd = [sys.executable, "-m", "app.cli", "worker", "--store", str(store), "--host", host, "--port", str(port),
           "--exit-with-parent", str(os.getpid()), *(extra or [])]
    proc = subprocess.Popen(cmd)
    atexit.register(lambda: proc.poll() is None and proc.send_signal(signal.SIGTERM))
    return proc


def serve_store(store: Path, host: str, port: int, worker_url: str | None = None, start_worker: bool = True,
                worker_port: int = 8001, prewarm: bool = True) -> int:
    import uvicorn

    from .server import create_app
    from .store import Store

    Store(store).close()  # fail now, with the store's own message, if it is missing or of another version
    if worker_url is None and start_worker:
        start_worker_process(store, "127.0.0.1", worker_port)
        worker_url = f"http://127.0.0.1:{worker_port}"
        log.info("model worker starting at %s (loading the model takes a few seconds; pages work meanwhile)", worker_url)
    app = create_app(store, worker_url, cache=True, prewarm=prewarm)
    print(f"\n  saescope is serving {store} at http://{host}:{port}/\n", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
