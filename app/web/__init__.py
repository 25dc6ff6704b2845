"""The dashboard: a FastAPI app over a read-only store (pages, JSON API, live inspection through the worker).

app (the ASGI app and its error handling), launch (`saescope serve`: uvicorn plus a supervised child worker),
views / live_views (one data function per page, shared by the page and its JSON twin), pages / api / live /
live_api (routes), edits (the URL edit parser), lookups (index checks, pagination), cache (whole-response cache),
templates (Jinja), tokens / plots / format (what templates draw).
"""
