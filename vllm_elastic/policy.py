"""Per-request budget policies: which budget runs the thinking phase and which the answer.

Request keys (``SamplingParams.extra_args`` offline, ``vllm_xargs`` in the OpenAI API):

* ``elastic_budget``: one budget for the whole request.
* ``elastic_think_budget`` + ``elastic_answer_budget``: think at one budget, answer at another;
  the switch happens at the end-of-thinking marker.
* ``elastic_kv_mode``: ``reuse`` (default) or ``recompute`` (see README).

Keys a request leaves out come from the server/engine default policy
(``additional_config={"elastic": {...}}``, same keys), then from the checkpoint's
``default_budget``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_elastic.budgets import ElasticSpec

KEY_BUDGET = "elastic_budget"
KEY_THINK = "elastic_think_budget"
KEY_ANSWER = "elastic_answer_budget"
KEY_KV_MODE = "elastic_kv_mode"
POLICY_KEYS = (KEY_BUDGET, KEY_THINK, KEY_ANSWER, KEY_KV_MODE)
KV_MODES = ("reuse", "recompute")


def engine_section(vllm_config: Any) -> dict[str, Any]:
    """The engine's ``additional_config["elastic"]`` (default policy, markers, packing)."""
    return dict((vllm_config.additional_config or {}).get("elastic", {}) or {})


class ElasticPolicyError(ValueError):
    """A request's (or the default) elastic policy is invalid."""


@dataclass(frozen=True)
class Policy:
    """A resolved budget schedule: budget names per phase and the KV mode at the switch."""

    think: str
    answer: str
    kv_mode: str = "reuse"

    @property
    def switches(self) -> bool:
        return self.think != self.answer

    def cache_salt(self) -> str:
        """A prefix-cache salt that separates K/V computed under different schedules."""
        if not self.switches:
            return f"elastic:{self.think}"
        return f"elastic:{self.think}>{self.answer}:{self.kv_mode}"

    def to_extra_args(self) -> dict[str, str]:
        return {KEY_THINK: self.think, KEY_ANSWER: self.answer, KEY_KV_MODE: self.kv_mode}


def _budget_name(spec: ElasticSpec, key: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ElasticPolicyError(
            f"{where}{key}: expected a budget name (string), got {value!r}; budgets: {spec.names}"
        )
    if value not in spec.names:
        raise ElasticPolicyError(
            f"{where}{key}: unknown budget {value!r}; this checkpoint's budgets are {spec.names}"
        )
    return value


def _partial(spec: ElasticSpec, args: Mapping[str, Any], where: str) -> dict[str, str]:
    """Validate the policy keys present in ``args``; return them as think/answer/mode."""
    out: dict[str, str] = {}
    if KEY_BUDGET in args:
        if KEY_THINK in args or KEY_ANSWER in args:
            raise ElasticPolicyError(
                f"{where}{KEY_BUDGET} cannot be combined with {KEY_THINK}/{KEY_ANSWER}: give "
                "either one budget for the whole request or one per phase"
            )
        name = _budget_name(spec, KEY_BUDGET, args[KEY_BUDGET], where)
        out["think"] = out["answer"] = name
    for key, field in ((KEY_THINK, "think"), (KEY_ANSWER, "answer")):
        if key in args:
            out[field] = _budget_name(spec, key, args[key], where)
    if KEY_KV_MODE in args:
        mode = args[KEY_KV_MODE]
        if mode not in KV_MODES:
            raise ElasticPolicyError(
                f"{where}{KEY_KV_MODE}: expected one of {list(KV_MODES)}, got {mode!r}"
            )
        out["kv_mode"] = mode
    return out


def resolve_policy(
    spec: ElasticSpec,
    request_args: Mapping[str, Any] | None,
    default_args: Mapping[str, Any] | None = None,
) -> Policy:
    """The request's policy: its own keys over the engine default over the checkpoint default.

    Raises ElasticPolicyError naming the offending key.
    """
    base = {"think": spec.default_budget, "answer": spec.default_budget, "kv_mode": "reuse"}
    if default_args:
        base.update(_partial(spec, default_args, "default policy: "))
    if request_args:
        own = _partial(spec, request_args, "")
        if KEY_BUDGET in request_args:
            # one budget for the whole request overrides a default think/answer split
            base["think"] = base["answer"] = own["think"]
        base.update(own)
    return Policy(**base)


def policy_from_extra_args(
    spec: ElasticSpec,
    extra_args: Mapping[str, Any] | None,
    default_args: Mapping[str, Any] | None = None,
) -> Policy:
    """Worker-side read of the policy the frontend already validated and resolved.

    Never raises: the engine must keep serving, so anything invalid that slipped past the
    frontend falls back to the defaults.
    """
    try:
        return resolve_policy(spec, extra_args, default_args)
    except ElasticPolicyError:
        try:
            return resolve_policy(spec, None, default_args)
        except ElasticPolicyError:
            return resolve_policy(spec, None)
