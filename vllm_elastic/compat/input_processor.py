"""Hook into vLLM's frontend ``InputProcessor.process_inputs`` (every request passes it).

For an elastic model the request's policy is resolved before vLLM builds the
``EngineCoreRequest`` (a bad one raises ``VLLMValidationError``: HTTP 400) and the
built request gets its schedule and cache salt (``control/frontend.py``). Other models
pass through untouched. The per-engine state lives in a weak table, not on vLLM's object.
"""

from __future__ import annotations

import weakref
from typing import Any

from vllm_elastic.compat.patching import wrap
from vllm_elastic.spec.families import is_elastic_config

_PREPARERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_NOT_ELASTIC = object()


def preparer_of(processor: Any) -> Any:
    """The ``RequestPreparer`` of an InputProcessor, or None for a non-elastic model."""
    found = _PREPARERS.get(processor)
    if found is None:
        from vllm_elastic.control.frontend import RequestPreparer

        elastic = is_elastic_config(processor.model_config.hf_config)
        found = RequestPreparer(processor.vllm_config) if elastic else _NOT_ELASTIC
        _PREPARERS[processor] = found
    return None if found is _NOT_ELASTIC else found


def install() -> None:
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

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
