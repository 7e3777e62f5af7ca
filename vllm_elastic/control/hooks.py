"""Wiring: the frontend hooks of ``compat/`` call into budget control.

Installed from an elastic architecture's config hook, in the process that admits
requests (the offline ``LLM`` or each API-server process).
"""

from __future__ import annotations

from typing import Any

from vllm_elastic import compat
from vllm_elastic.control import usage
from vllm_elastic.control.frontend import RequestPreparer, validate_request_args
from vllm_elastic.spec.families import is_elastic_config


def _preparer_for(processor: Any) -> RequestPreparer | None:
    if not is_elastic_config(processor.model_config.hf_config):
        return None
    return RequestPreparer(processor.vllm_config)


def _validate(hf_config: Any, xargs: Any) -> str | None:
    return validate_request_args(hf_config.elastic_spec, xargs)


def _summarize(groups: list[usage.UsageGroup]) -> dict[str, Any]:
    return usage.merge_usages([g.as_dict() for g in groups])


def install_frontend_hooks() -> None:
    """Policy checks and cache salts, per-budget usage, ``usage.elastic`` and HTTP 400."""
    compat.check_supported()
    from vllm_elastic.compat import input_processor, outputs, server

    input_processor.install(_preparer_for)
    outputs.install(usage.on_new_request, usage.on_output)
    server.install(_validate, usage.group_of, _summarize)
