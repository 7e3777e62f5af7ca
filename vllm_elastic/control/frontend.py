"""Frontend: validate each request's elastic policy, resolve its schedule, salt its cache.

vLLM's ``InputProcessor.process_inputs`` turns every request (offline ``LLM`` and the
OpenAI server alike) into an ``EngineCoreRequest``; ``compat/input_processor.py`` hands
each one to :func:`prepare_request`, which for elastic models

* resolves the request's policy (request keys over the engine default over the
  checkpoint default) and rejects a bad one with ``VLLMValidationError``, which the
  server answers with HTTP 400;
* writes the resolved schedule (``control/schedule.py``) into the request's own copy of
  ``extra_args``, so the worker and the scheduler need no defaults;
* puts the schedule into ``cache_salt``: prefix caching keys blocks on token ids, and a
  block computed under one schedule must never be reused under another.
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_elastic.control import schedule
from vllm_elastic.control.markers import ThinkMarkers, resolve_markers
from vllm_elastic.control.policy import Policy, check_request_args, resolve_policy
from vllm_elastic.errors import ElasticPolicyError
from vllm_elastic.spec.budgets import ElasticSpec
from vllm_elastic.spec.engine_options import KEY_RESOLVED, POLICY_KEYS, engine_options


class RequestPreparer:
    """Per-engine frontend state: the checkpoint's budgets, default policy and markers."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.spec: ElasticSpec = vllm_config.model_config.hf_config.elastic_spec
        self.defaults = engine_options(vllm_config).policy
        self._markers: ThinkMarkers | None = None

    @property
    def markers(self) -> ThinkMarkers:
        if self._markers is None:
            self._markers = resolve_markers(self.vllm_config)
        return self._markers

    def policy(self, params: SamplingParams) -> Policy:
        """Resolve a request's policy or raise VLLMValidationError (HTTP 400)."""
        try:
            return resolve_policy(self.spec, params.extra_args, self.defaults)
        except ElasticPolicyError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs") from e

    def prepare(self, request: Any, policy: Policy) -> Any:
        """Write the resolved schedule and salt into an ``EngineCoreRequest``."""
        resolved, salt = schedule.resolve(
            policy, self.markers, request.prompt_token_ids or [], request.cache_salt
        )
        sp = request.sampling_params
        own = {k: v for k, v in (sp.extra_args or {}).items() if k not in POLICY_KEYS}
        sp.extra_args = {**own, KEY_RESOLVED: resolved.to_wire()}
        request.cache_salt = salt
        return request


def validate_request_args(spec: ElasticSpec, args: Any) -> str | None:
    """The error message for a request's bad elastic keys (or None): lets a server answer
    HTTP 400 before a streamed response starts."""
    try:
        check_request_args(spec, args)
    except ElasticPolicyError as e:
        return str(e)
    return None
