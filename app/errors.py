"""One error type for the web layer and the worker: message, title and HTTP status; rendered as HTML or as JSON."""

from __future__ import annotations

from saescope.precompute.errors import ECHO_CHARS, echo  # noqa: F401  (one echo for every error message)


class AppError(Exception):
    def __init__(self, message: str, status: int = 400, title: str | None = None, link: tuple[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.title = title or {400: "Bad request", 401: "Unauthorized", 404: "Not found", 413: "Too large",
                               422: "Invalid input", 503: "Unavailable", 504: "Timed out"}.get(status, "Error")
        self.link = link  # (href, text): where to go instead

    def as_json(self) -> dict:
        return {"error": {"status": self.status, "title": self.title, "message": self.message}}


def validation_message(errors: list[dict]) -> str:
    """pydantic/FastAPI validation errors as one readable sentence per field, never echoing a whole input."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form")]
        where = loc[-1] if loc else "the request body"
        if e.get("type") in ("json_invalid", "model_attributes_type", "dict_type"):
            parts.append(f"the request body must be a JSON object ({e.get('msg', 'invalid JSON')})")
            continue
        got = e.get("input")
        msg = e.get("msg", "is invalid").removeprefix("Value error, ")
        msg = msg.replace("Input should be", "must be").replace("Field required", "is required")
        parts.append(f"{where} {msg}" + (f" (got {echo(got)})" if got is not None and not isinstance(got, dict) else ""))
    return "; ".join(parts)
