"""Hook into vLLM's frontend ``InputProcessor.process_inputs`` (every request passes it).

``preparer_for(processor)`` (from ``control/frontend.py``) gives each engine's request
preparer, or None for a non-elastic model, whose requests pass through untouched. For an
elastic model the request's policy is resolved before vLLM builds the
``EngineCoreRequest`` (a bad one raises ``VLLMValidationError``: HTTP 400) and the built
request gets its schedule and cache salt. Per-engine state lives in a weak table, not on
vLLM's object.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from vllm_elastic.compat.patching import wrap

_PREPARERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_NONE = object()


def install(preparer_for: Callable[[Any], Any]) -> None:
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    def preparer_of(processor: Any) -> Any:
        found = _PREPARERS.get(processor)
        if found is None:
            found = preparer_for(processor)
            _PREPARERS[processor] = _NONE if found is None else found
        return None if found is _NONE else found

    def make(original: Any) -> Any:
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            preparer = preparer_of(self)
            if preparer is None or not isinstance(params, SamplingParams):
                return original(self, request_id, prompt, params, *args, **kwargs)
            policy = preparer.policy(params)
            request = original(self, request_id, prompt, params, *args, **kwargs)
            return preparer.prepare(request, policy)

        return process_inputs

    wrap(InputProcessor, "process_inputs", make)
