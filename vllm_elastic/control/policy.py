"""Per-request budget policies: which budget runs the thinking phase and which the answer.

Request keys (``SamplingParams.extra_args`` offline, ``vllm_xargs`` in the OpenAI API):

* ``elastic_budget``: one budget for the whole request.
* ``elastic_think_budget`` + ``elastic_answer_budget``: think at one budget, answer at another;
  the switch happens at the end-of-thinking marker.
* ``elastic_kv_mode``: ``reuse`` (default) or ``recompute`` (see README).

Keys a request leaves out come from the engine's default policy
(``additional_config={"elastic": {...}}``, same keys), then from the checkpoint's
``default_budget``. Any other request key starting with ``elastic`` is rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_elastic.errors import ElasticPolicyError, short
from vllm_elastic.spec.budgets import ElasticSpec
from vllm_elastic.spec.engine_options import (
    KEY_ANSWER,
    KEY_BUDGET,
    KEY_KV_MODE,
    KEY_THINK,
    KV_MODES,
    check_request_keys,
)


@dataclass(frozen=True)
class Policy:
    """A resolved budget schedule: budget names per phase and the KV mode at the switch."""

    think: str
    answer: str
    kv_mode: str = "reuse"

    @property
    def switches(self) -> bool:
        return self.think != self.answer

    @property
    def reported_kv_mode(self) -> str | None:
        """The KV mode that applies: None for a request that never switches budgets."""
        return self.kv_mode if self.switches else None


def _budget_name(spec: ElasticSpec, key: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ElasticPolicyError(
            f"{where}{key}: expected a budget name (string), got {short(value)}; "
            f"budgets: {spec.names}"
        )
    if value in spec.not_served:
        raise ElasticPolicyError(
            f"{where}{key}: budget {short(value)} is not served by this engine; it serves "
            f"{spec.names} (engine option elastic.serve_budgets)"
        )
    if value not in spec.names:
        raise ElasticPolicyError(
            f"{where}{key}: unknown budget {short(value)}; this checkpoint's budgets are "
            f"{spec.names}"
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
                f"{where}{KEY_KV_MODE}: expected one of {list(KV_MODES)}, got {short(mode)}"
            )
        out["kv_mode"] = mode
    return out


def check_request_args(spec: ElasticSpec, request_args: Mapping[str, Any] | None) -> None:
    """Validate a request's own keys (names and values); raise ElasticPolicyError."""
    check_request_keys(request_args)
    _partial(spec, request_args or {}, "")


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
        check_request_keys(request_args)
        own = _partial(spec, request_args, "")
        if KEY_BUDGET in request_args:
            # one budget for the whole request overrides a default think/answer split
            base["think"] = base["answer"] = own["think"]
        base.update(own)
    return Policy(**base)
