"""Hook into vLLM's frontend ``OutputProcessor``: count each choice's tokens per budget.

``RequestState.from_new_request`` gives each elastic request's choice a counter in the
request's usage group (all choices of an ``n > 1`` request share one);
``make_request_output`` counts the new tokens and links the ``RequestOutput`` it builds
to the group. Groups and links live in weak tables, not on vLLM's objects.
"""

from __future__ import annotations

import weakref
from typing import Any

from vllm_elastic.compat.patching import wrap
from vllm_elastic.control.schedule import Resolved
from vllm_elastic.control.usage import (
    PhaseCounter,
    UsageGroup,
    count_request,
    count_tokens,
)

# request id (the parent's for n > 1) -> usage group, while a choice of it is alive
_GROUPS: weakref.WeakValueDictionary[str, UsageGroup] = weakref.WeakValueDictionary()
# RequestState -> (group, counter of its choice)
_STATES: weakref.WeakKeyDictionary[Any, tuple[UsageGroup, PhaseCounter]] = (
    weakref.WeakKeyDictionary()
)
# RequestOutput -> group
_OUTPUTS: weakref.WeakKeyDictionary[Any, UsageGroup] = weakref.WeakKeyDictionary()


def group_of(request_output: Any) -> UsageGroup | None:
    """The usage group of a RequestOutput (None for a non-elastic model)."""
    try:
        return _OUTPUTS.get(request_output)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def install() -> None:
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import RequestState

    def make_new(original: Any) -> Any:
        def from_new_request(cls, tokenizer, request, prompt, parent_req, *args, **kwargs):
            state = original(cls, tokenizer, request, prompt, parent_req, *args, **kwargs)
            params = request.sampling_params
            resolved = Resolved.from_extra_args(params.extra_args if params else None)
            if resolved is not None:
                key = parent_req.request_id if parent_req is not None else request.request_id
                group = _GROUPS.get(key)
                if group is None:
                    group = _GROUPS[key] = UsageGroup(resolved)
                counter = group.child(request.request_id, request.prompt_token_ids or [])
                _STATES[state] = (group, counter)
            return state

        return from_new_request

    def make_output(original: Any) -> Any:
        def make_request_output(self, new_token_ids, pooling_output, finish_reason, *a, **kw):
            entry = _STATES.get(self)
            if entry is not None:
                count_tokens(entry[1], new_token_ids)
                if finish_reason is not None:
                    aborted = finish_reason == FinishReason.ABORT
                    if entry[0].finish(self.request_id, aborted):
                        count_request(entry[0])
            out = original(self, new_token_ids, pooling_output, finish_reason, *a, **kw)
            if entry is not None and out is not None:
                _OUTPUTS[out] = entry[0]
            return out

        return make_request_output

    wrap(RequestState, "from_new_request", make_new)
    wrap(RequestState, "make_request_output", make_output)
