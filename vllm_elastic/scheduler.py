"""Engine-core scheduler hook for ``elastic_kv_mode: recompute``.

In ``recompute`` mode the answer phase must see K/V computed at the answer budget for the
whole context (prompt + thinking), as if the larger model had read the trace. When a
request's output ends with the end-of-thinking marker, this scheduler preempts it before
the next step, exactly as vLLM's own ``reset_prefix_cache(reset_running_requests=True)``
does, and re-salts its prefix-cache hashes. The request is re-prefilled from token 0; the
logits processor sees it re-added with the marker in its output and runs the whole
re-prefill at the answer budget. Already streamed tokens are unaffected; the cost is one
prefill of prompt + thinking per request, as with a second call to a separately served
large model.

``ElasticScheduler`` is a factory vLLM calls like a class: it builds the synchronous or
asynchronous variant, whichever the engine's ``async_scheduling`` asks for.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_elastic.log import get_logger
from vllm_elastic.markers import ThinkMarkers, ends_with, resolve_markers
from vllm_elastic.policy import KEY_ANSWER, KEY_KV_MODE, KEY_THINK

logger = get_logger(__name__)

RECOMPUTE_SALT = "answer-recompute"


class _RecomputeAtSwitch:
    """Preempts recompute-mode requests right after their end-of-thinking marker."""

    def _elastic_setup(self) -> None:
        hf_config = self.vllm_config.model_config.hf_config
        self._elastic = getattr(hf_config, "elastic", None) is not None
        self._thinking: dict[str, Any] = {}  # recompute requests still thinking
        self._due: set[str] = set()
        self._markers: ThinkMarkers | None = None

    def _markers_of_engine(self) -> ThinkMarkers:
        if self._markers is None:
            self._markers = resolve_markers(self.vllm_config)
        return self._markers

    @staticmethod
    def _wants_recompute(request: Any) -> bool:
        args = (request.sampling_params.extra_args or {}) if request.sampling_params else {}
        return args.get(KEY_KV_MODE) == "recompute" and args.get(KEY_THINK) != args.get(KEY_ANSWER)

    def add_request(self, request: Any) -> None:
        super().add_request(request)
        if self._elastic and self._wants_recompute(request):
            if not self._markers_of_engine().prompt_answers_from_start(request.prompt_token_ids):
                self._thinking[request.request_id] = request

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._thinking:
            end = self._markers_of_engine().end
            for req_id, request in list(self._thinking.items()):
                if request.is_finished():
                    del self._thinking[req_id]
                elif ends_with(request.output_token_ids, end):
                    del self._thinking[req_id]
                    self._due.add(req_id)
        return outputs

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._due:
            self._recompute_due()
        return super().schedule(*args, **kwargs)

    def _recompute_due(self) -> None:
        now = time.monotonic()
        due, self._due = self._due, set()
        for request in [r for r in self.running if r.request_id in due]:
            self.running.remove(request)
            self._preempt_request(request, now, drop_stale_output=True)
            self.prev_step_scheduled_req_ids.discard(request.request_id)
        for req_id in due:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            # K/V recomputed at the answer budget must neither read nor be mistaken
            # for the thinking-phase blocks cached under the request's original salt.
            request.cache_salt = f"{request.cache_salt or ''}|{RECOMPUTE_SALT}"
            request.block_hashes = []
            request.update_block_hashes()
            logger.debug("vllm-elastic: recomputing %s at the answer budget", req_id)


class ElasticSyncScheduler(_RecomputeAtSwitch, Scheduler):
    """vLLM's synchronous scheduler with the recompute-at-switch hook."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._elastic_setup()


class ElasticAsyncScheduler(_RecomputeAtSwitch, AsyncScheduler):
    """vLLM's asynchronous scheduler with the recompute-at-switch hook."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._elastic_setup()


def ElasticScheduler(*args: Any, vllm_config: Any, **kwargs: Any) -> Scheduler:  # noqa: N802
    """Build the scheduler variant matching the engine's ``async_scheduling``."""
    cls = (
        ElasticAsyncScheduler
        if vllm_config.scheduler_config.async_scheduling
        else ElasticSyncScheduler
    )
    return cls(*args, vllm_config=vllm_config, **kwargs)
