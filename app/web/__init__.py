"""The dashboard: a FastAPI app over a read-only store (pages, JSON API, live inspection through the worker).

app (the ASGI app and its error handling), launch (`saescope serve`: uvicorn plus a supervised child worker),
pages / api / live (routes), lookups (URL parameters to store answers), cache (whole-response cache),
templates (Jinja), tokens / plots / format (what templates draw).
"""
