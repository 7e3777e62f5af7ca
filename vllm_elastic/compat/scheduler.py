"""vLLM scheduler internals the ``recompute`` switch relies on (``control/scheduler.py``).

vLLM says of its scheduler interface: "not public and compatibility may not be
maintained". What is used: the ``Scheduler`` / ``AsyncScheduler`` classes as bases,
``running``, ``requests``, ``prev_step_scheduled_req_ids``, ``_preempt_request`` and a
request's ``cache_salt`` / ``block_hashes`` / ``update_block_hashes``: exactly what vLLM's
own ``reset_prefix_cache(reset_running_requests=True)`` does to re-prefill a request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


def scheduler_bases() -> tuple[type, type]:
    """vLLM's synchronous and asynchronous scheduler classes."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler, AsyncScheduler


def resolve_scheduler_cls(qualname: str) -> type:
    """A user's ``--scheduler-cls`` (``module.Class``) as a Scheduler subclass."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cls = resolve_obj_by_qualname(qualname)
    if not (isinstance(cls, type) and issubclass(cls, scheduler_bases()[0])):
        raise TypeError(f"scheduler_cls {qualname!r} is not a vLLM Scheduler subclass")
    return cls


def preempt_for_reprefill(scheduler: Any, request_ids: Iterable[str]) -> list[Any]:
    """Preempt the running requests among ``request_ids`` so they are re-prefilled from
    token 0 in a later step, as ``reset_prefix_cache(reset_running_requests=True)``
    does; returns the requests still alive (running or waiting)."""
    ids = set(request_ids)
    now = time.monotonic()
    for request in [r for r in scheduler.running if r.request_id in ids]:
        scheduler.running.remove(request)
        scheduler._preempt_request(request, now, drop_stale_output=True)
        scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
    alive = [scheduler.requests.get(i) for i in ids]
    return [r for r in alive if r is not None and not r.is_finished()]


def resalt(request: Any, salt: str) -> None:
    """Give a (preempted) request a new cache salt and recompute its block hashes, so
    its re-prefill neither reads nor publishes blocks under the old salt."""
    request.cache_salt = salt
    request.block_hashes = []
    request.update_block_hashes()
