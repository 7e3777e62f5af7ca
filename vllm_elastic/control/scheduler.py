"""Engine-core scheduler hook for ``elastic_kv_mode: recompute`` (and, with ``kv_layout:
per-budget``, the source of each request's stored KV groups: ``compat/kv_groups.py``).

In ``recompute`` mode the answer phase must see K/V computed at the answer budget for the
whole context (prompt + thinking), as if the larger model had read the trace. When a
request's output ends with the end-of-thinking marker, this scheduler preempts it before
the next step and gives it the answer pass's cache salt (``control/schedule.py``); the
request is re-prefilled from token 0, and the logits processor, which sees it re-added
with the marker in its output, runs the whole re-prefill at the answer budget. Already
streamed tokens are unaffected; the cost is one prefill of prompt + thinking per
request, as with a second call to a separately served large model.

``ElasticScheduler`` is a factory vLLM calls like a class: it builds the hook over vLLM's
synchronous or asynchronous scheduler, or over the user's own ``--scheduler-cls``
(``additional_config.elastic.base_scheduler_cls``, set by the plugin).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_elastic.compat.scheduler import (
    preempt_for_reprefill,
    resalt,
    resolve_scheduler_cls,
    scheduler_bases,
)
from vllm_elastic.control.markers import ends_with
from vllm_elastic.control.schedule import Resolved, stored_budgets
from vllm_elastic.log import get_logger
from vllm_elastic.spec import kv_layout
from vllm_elastic.spec.engine_options import engine_options
from vllm_elastic.spec.families import is_elastic_config

logger = get_logger(__name__)
FQCN = f"{__name__}.ElasticScheduler"


class RecomputeAtSwitch:
    """Mixin: preempts recompute-mode requests right after their end-of-thinking marker."""

    def _elastic_setup(self) -> None:
        self._elastic = is_elastic_config(self.vllm_config.model_config.hf_config)
        self._thinking: dict[str, tuple[Any, Resolved]] = {}  # recompute requests thinking
        self._due: set[str] = set()
        if self._elastic and engine_options(self.vllm_config).kv_layout == "per-budget":
            from vllm_elastic.compat.kv_groups import bind_scheduler

            bind_scheduler(self, self._stored_kv_groups)

    def _stored_kv_groups(self, request: Any) -> int | None:
        """KV groups (``kv_layout: per-budget``) the request's blocks store; None: all."""
        params = request.sampling_params
        resolved = None if params is None else Resolved.from_extra_args(params.extra_args)
        names = stored_budgets(resolved, request.prompt_token_ids, request.output_token_ids)
        if names is None:
            return None
        spec = self.vllm_config.model_config.hf_config.elastic_spec
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        return max(kv_layout.stored_groups(spec, spec.get(n), tp) for n in names)

    def add_request(self, request: Any) -> None:
        super().add_request(request)
        if not self._elastic or request.sampling_params is None:
            return
        resolved = Resolved.from_extra_args(request.sampling_params.extra_args)
        if resolved is not None and resolved.kv_mode == "recompute" and not resolved.answering:
            self._thinking[request.request_id] = (request, resolved)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, (request, resolved) in list(self._thinking.items()):
            if request.is_finished():
                del self._thinking[req_id]
            elif ends_with(request.output_token_ids, resolved.end_ids):
                del self._thinking[req_id]
                self._due.add(req_id)
        return outputs

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._due:
            due, self._due = self._due, set()
            for request in preempt_for_reprefill(self, due):
                resolved = Resolved.from_extra_args(request.sampling_params.extra_args)
                resalt(request, resolved.answer_salt)
                logger.debug(
                    "vllm-elastic: recomputing %s at the answer budget", request.request_id
                )
        return super().schedule(*args, **kwargs)


@functools.cache
def _with_hook(base: type) -> type:
    """``base`` with the recompute hook in front (one class per base)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self._elastic_setup()

    return type(f"Elastic{base.__name__}", (RecomputeAtSwitch, base), {"__init__": __init__})


def ElasticScheduler(*args: Any, vllm_config: Any, **kwargs: Any) -> Any:  # noqa: N802
    """Build the scheduler: the user's ``base_scheduler_cls`` if set, else vLLM's
    synchronous or asynchronous one (``async_scheduling``), with the recompute hook."""
    sync, async_ = scheduler_bases()
    base_name = engine_options(vllm_config).base_scheduler_cls
    if base_name is not None:
        base = resolve_scheduler_cls(base_name)
    else:
        base = async_ if vllm_config.scheduler_config.async_scheduling else sync
    return _with_hook(base)(*args, vllm_config=vllm_config, **kwargs)
