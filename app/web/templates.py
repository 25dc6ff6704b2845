"""Jinja2 environment, cache-busted static URLs, and htmx-aware rendering of whole pages or single blocks."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..settings import SERVE, VERSION, WORKER
from .format import fmt, pct
from .plots import histogram_svg
from .tokens import alpha, delta_strip_html, shown, strip_html, untrusted, visible

# package data of the installed saescope (the checkout's templates/ and static/ through the editable install):
# real folders in both cases, since wheels install unzipped
TEMPLATES = Path(str(files("saescope.templates")))
STATIC = Path(str(files("saescope.static")))


@lru_cache(maxsize=None)
def _static_hash(name: str) -> str:
    return hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:10]


def static_url(name: str) -> str:
    """/static/<name>?v=<content hash>: a changed file gets a new URL, so long cache lifetimes are safe."""
    return f"/static/{name}?v={_static_hash(name)}"


def make_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "svg"]),
                      trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.globals.update(static_url=static_url, serve=SERVE, wk=WORKER, version=VERSION)
    env.filters.update(visible=visible, fmt=fmt, pct=pct, alpha=alpha, u=untrusted, shown=shown)
    env.globals.update(histogram_svg=histogram_svg, strip_html=strip_html, delta_strip_html=delta_strip_html)
    return env


ENV = make_env()
# macros are a global, so a block rendered on its own (an htmx fragment) sees them too
ENV.globals["m"] = ENV.get_template("_macros.html").make_module({})


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def page(request: Request, template: str, ctx: dict, block: str | None = None, status: int = 200) -> HTMLResponse:
    """The whole page, or only `block` of it when htmx asks (the fragment lives inside its page)."""
    tmpl = ENV.get_template(template)
    ctx = {"request": request, **ctx}
    if block and is_htmx(request):
        html = "".join(tmpl.blocks[block](tmpl.new_context(ctx)))
    else:
        html = tmpl.render(ctx)
    resp = HTMLResponse(html, status_code=status)
    resp.headers["Vary"] = "HX-Request"
    return resp
