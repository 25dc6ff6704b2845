"""Write the dashboard's and the worker's OpenAPI documents to docs/ (a test checks they are current)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


# dev-only: writes the checkout's docs/ (run from a clone: python -m saescope.app.openapi); no command of the
# installed package uses it, and it reads nothing through this path
ROOT = Path(__file__).resolve().parent.parent


def dashboard_doc() -> dict:
    from fastapi import FastAPI

    from .settings import VERSION
    from .web import api, chat, live, maps, pages, patching
    from .web.app import DESCRIPTION

    app = FastAPI(title="saescope", version=VERSION, description=DESCRIPTION)
    for r in (pages.router, live.router, api.router, maps.router, patching.router, chat.router):
        app.include_router(r)
    return app.openapi()


def worker_doc() -> dict:
    from .worker.routes import create_worker_app

    return create_worker_app(None).openapi()  # type: ignore[arg-type]


def main() -> int:
    out = ROOT / "docs"
    out.mkdir(exist_ok=True)
    (out / "openapi.json").write_text(json.dumps(dashboard_doc(), indent=1, sort_keys=True) + "\n")
    (out / "worker-openapi.json").write_text(json.dumps(worker_doc(), indent=1, sort_keys=True) + "\n")
    print("wrote docs/openapi.json and docs/worker-openapi.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
