"""One idiom for every runtime hook into vLLM: wrap an attribute of a class once.

A wrapped attribute carries a mark holding the original, so installing twice (vLLM loads
plugins several times per process) is a no-op and the original stays reachable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

MARK = "_vllm_elastic_original"


class _Property(property):
    """A property that can carry the mark (plain properties take no attributes)."""


def is_wrapped(owner: Any, name: str) -> bool:
    """Whether ``owner.name`` is already one of our wrappers."""
    return hasattr(owner.__dict__.get(name), MARK)


def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Replace ``owner.name`` by ``make(original)`` unless it is already wrapped.

    For a classmethod ``make`` gets (and returns) the underlying function; for a
    property, the getter. Returns True when it installed the wrapper.
    """
    if is_wrapped(owner, name):
        return False
    # an inherited attribute (e.g. a pydantic model's __init__) is wrapped on ``owner``
    raw = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    if isinstance(raw, classmethod):
        new: Any = classmethod(functools.wraps(raw.__func__)(make(raw.__func__)))
    elif isinstance(raw, property):
        getter = functools.wraps(raw.fget)(make(raw.fget))
        new = _Property(getter, raw.fset, raw.fdel, raw.__doc__)
    else:
        new = functools.wraps(raw)(make(raw))
    setattr(new, MARK, raw)
    setattr(owner, name, new)
    return True


def original(owner: Any, name: str) -> Any:
    """The attribute ``owner.name`` had before we wrapped it (itself if not wrapped)."""
    raw = owner.__dict__.get(name)
    return getattr(raw, MARK, raw)


def unwrap(owner: Any, name: str) -> None:
    """Restore the original attribute (an inherited one is inherited again)."""
    if not is_wrapped(owner, name):
        return
    raw = original(owner, name)
    if getattr(owner.__mro__[1], name, None) is raw:
        delattr(owner, name)
    else:
        setattr(owner, name, raw)
