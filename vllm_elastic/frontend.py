"""Frontend hook: validate each request's elastic policy and salt its prefix cache.

vLLM's ``InputProcessor.process_inputs`` turns every request (offline ``LLM`` and the
OpenAI server alike) into an ``EngineCoreRequest``. For elastic models we wrap it to

* resolve the request's policy (request keys over the engine default over the
  checkpoint default) and reject a bad one with ``VLLMValidationError``, which the
  server answers with HTTP 400;
* write the resolved policy into the request's own copy of ``extra_args`` so the worker
  needs no defaults;
* put the policy into ``cache_salt``: prefix caching keys blocks on tokens only, and K/V
  computed under one budget schedule must never be reused by a request under another.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_elastic.budgets import ElasticSpec
from vllm_elastic.markers import resolve_markers
from vllm_elastic.policy import (
    POLICY_KEYS,
    ElasticPolicyError,
    Policy,
    engine_section,
    resolve_policy,
)
from vllm_elastic.usage import KEY_ANSWERING, KEY_END_IDS

_MARK = "_vllm_elastic_hook"


def request_policy(vllm_config: Any, spec: ElasticSpec, params: SamplingParams) -> Policy:
    """Resolve a request's policy or raise VLLMValidationError (HTTP 400)."""
    try:
        return resolve_policy(spec, params.extra_args, engine_section(vllm_config))
    except ElasticPolicyError as e:
        raise VLLMValidationError(str(e), parameter="vllm_xargs") from e


def _spec_of(processor: Any) -> ElasticSpec | None:
    spec = getattr(processor, "_elastic_spec", _MARK)
    if spec is _MARK:
        hf_config = processor.model_config.hf_config
        spec = hf_config.elastic_spec if getattr(hf_config, "elastic", None) else None
        processor._elastic_spec = spec
    return spec


def _phase_args(processor: Any, policy: Policy, request: Any) -> dict[str, Any]:
    """End-marker ids and whether the request starts in its answer phase.

    A switching policy thinks until the end marker unless the prompt already closed
    thinking; a single-budget request thinks only if its prompt opened thinking.
    """
    markers = getattr(processor, "_elastic_markers", None)
    if markers is None:
        markers = processor._elastic_markers = resolve_markers(processor.vllm_config)
    prompt = request.prompt_token_ids or []
    if policy.switches:
        answering = markers.prompt_answers_from_start(prompt)
    else:
        answering = not markers.prompt_opens_thinking(prompt)
    return {KEY_END_IDS: list(markers.end), KEY_ANSWERING: answering}


def install_frontend_hook() -> None:
    """Wrap ``InputProcessor.process_inputs`` once per process (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        spec = _spec_of(self)
        if spec is None or not isinstance(params, SamplingParams):
            return original(self, request_id, prompt, params, *args, **kwargs)
        policy = request_policy(self.vllm_config, spec, params)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        sp = request.sampling_params
        own = {k: v for k, v in (sp.extra_args or {}).items() if k not in POLICY_KEYS}
        sp.extra_args = {**own, **policy.to_extra_args(), **_phase_args(self, policy, request)}
        salt = policy.cache_salt()
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    setattr(process_inputs, _MARK, True)
    InputProcessor.process_inputs = process_inputs
