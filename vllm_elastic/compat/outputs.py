"""Hook into vLLM's frontend ``OutputProcessor``: per-request callbacks for usage.

``on_new(request, parent_req)`` runs when vLLM makes a request's (or an ``n > 1``
choice's) output state and returns a handle (None: not tracked); ``on_output(handle,
new_token_ids, aborted, finished, request_output)`` runs on every output it builds
(``request_output`` may be None). Handles live in a weak table, not on vLLM's objects.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from vllm_elastic.compat.patching import wrap

_HANDLES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def install(on_new: Callable[..., Any], on_output: Callable[..., None]) -> None:
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import RequestState

    def make_new(original: Any) -> Any:
        def from_new_request(cls, tokenizer, request, prompt, parent_req, *args, **kwargs):
            state = original(cls, tokenizer, request, prompt, parent_req, *args, **kwargs)
            handle = on_new(request, parent_req)
            if handle is not None:
                _HANDLES[state] = handle
            return state

        return from_new_request

    def make_output(original: Any) -> Any:
        def make_request_output(self, new_token_ids, pooling_output, finish_reason, *a, **kw):
            out = original(self, new_token_ids, pooling_output, finish_reason, *a, **kw)
            handle = _HANDLES.get(self)
            if handle is not None:
                aborted = finish_reason == FinishReason.ABORT
                on_output(handle, new_token_ids, aborted, finish_reason is not None, out)
            return out

        return make_request_output

    wrap(RequestState, "from_new_request", make_new)
    wrap(RequestState, "make_request_output", make_output)
