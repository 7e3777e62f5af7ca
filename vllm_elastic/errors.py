"""The exceptions vllm-elastic raises, and how error messages quote user values.

Every error names the field it is about. Values are quoted through :func:`short` so that
a huge bad value (a 100 kB budget name) gives a short message.
"""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 80  # characters of a quoted value in an error message


def short(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters (with a note of the full length)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class ElasticConfigError(ValueError):
    """A checkpoint's ``elastic`` section, a budget or an engine option is invalid."""


class UnknownBudgetError(ElasticConfigError, KeyError):
    """The checkpoint has no budget of the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ElasticPolicyError(ValueError):
    """A request's (or the engine default) elastic policy is invalid.

    The frontend turns it into ``VLLMValidationError`` (HTTP 400 from the server)."""


class ElasticStateError(RuntimeError):
    """The engine is not set up the way the elastic model needs (a bug, never user input)."""


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not a version vllm-elastic was written and tested for."""
