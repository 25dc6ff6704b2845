"""saescope's own error types. Their messages say what was wrong and what to do, so the CLI prints them as they are
(exit status 2) and the servers answer with them (4xx); any other exception is a bug and keeps its traceback.

    SaescopeError            the base: an expected failure with a readable message
      UserError (ValueError) bad input: names what was wrong and what is allowed
        UnknownSAE           an SAE id that is not there, with the valid ones
        NotFound (also FileNotFoundError)  a given path or reference that is not there
      SetupError (RuntimeError)  the environment lacks something (a package, a model, a reachable cluster)
        MissingSetup (also FileNotFoundError)  a file the installation should hold

Store damage (`store.StoreError`), bad SAE files (`saes.SAEFormatError`), unloadable models (`models.ModelLoadError`)
and LLM failures (`explain.LLMError`) are subclasses.
"""

from __future__ import annotations

from collections.abc import Iterable

ECHO_CHARS = 60  # how much of a rejected input an error message repeats


def echo(value: object) -> str:
    """A rejected input as an error message repeats it: short, with its length when cut (never the whole input)."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    size = f"{len(value):,}-character" if isinstance(value, str) else f"{len(text):,}-character"
    return f"{text[:ECHO_CHARS]}… (a {size} value, cut)"


class SaescopeError(Exception):
    """An expected failure whose message says what was wrong and what to do."""


class UserError(SaescopeError, ValueError):
    """Bad input (a flag, a file, a request field): the message names it and what is allowed."""


class SetupError(SaescopeError, RuntimeError):
    """Something the run needs is missing from the environment; the message names the fix."""


class NotFound(UserError, FileNotFoundError):
    """A path or reference that was given but is not there (a dataset file, an SAE, a hub folder offline)."""


class MissingSetup(SetupError, FileNotFoundError):
    """A file the installation should hold is missing (e.g. the embedded model's package); the message says how to
    install it."""


class UnknownSAE(UserError):
    """An SAE id that is not among the valid ones (of a store, of a worker)."""

    def __init__(self, sae_id: str, valid: Iterable[str], where: str = "this store"):
        self.sae_id, self.valid, self.where = sae_id, list(valid), where
        e = echo(sae_id)
        super().__init__(f"unknown SAE id {e} ({where} has no SAE {e}; valid: {', '.join(self.valid) or 'none'})")
