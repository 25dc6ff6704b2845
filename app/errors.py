"""One error type for the web layer: message, title and HTTP status; rendered as HTML or as JSON under /api."""

from __future__ import annotations


class AppError(Exception):
    def __init__(self, message: str, status: int = 400, title: str | None = None, link: tuple[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.title = title or {400: "Bad request", 404: "Not found", 422: "Invalid input",
                               503: "Unavailable", 504: "Timed out"}.get(status, "Error")
        self.link = link  # (href, text): where to go instead

    def as_json(self) -> dict:
        return {"error": {"status": self.status, "title": self.title, "message": self.message}}
