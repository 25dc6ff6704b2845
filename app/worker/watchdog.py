"""A child worker must not outlive the dashboard that started it, even if that one is killed with -9."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def exit_with_parent(pid: int) -> None:
    """Exit this process as soon as process `pid` (our parent) is gone."""
    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        log.info("parent %d is gone; the worker exits", pid)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
