"""Observability: how many tokens each request generated at each budget.

A generated token is produced by the forward that fed the token before it, so with the
switch at the end marker (the marker's own forward runs at the answer budget) the
thinking budget produces every token up to and including the marker, and the answer
budget every later one. That is a function of the output ids alone, so it is counted in
the frontend as outputs stream out:

* offline: ``elastic_usage(request_output)`` (the ``elastic_usage`` attribute);
* server: ``usage.elastic`` in every OpenAI response that carries ``usage``;
* ``/metrics``: ``vllm_elastic:generation_tokens_total{budget,phase}`` and
  ``vllm_elastic:requests_total{think_budget,answer_budget,kv_mode}``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_elastic.markers import ends_with
from vllm_elastic.policy import KEY_ANSWER, KEY_KV_MODE, KEY_THINK

KEY_END_IDS = "elastic_think_end_ids"
KEY_ANSWERING = "elastic_answer_from_start"
_MARK = "_vllm_elastic_usage_hook"


class PhaseCounter:
    """Counts one request's generated tokens per phase as they stream out."""

    def __init__(
        self, think: str, answer: str, kv_mode: str, end: Sequence[int], answering: bool
    ) -> None:
        self.think, self.answer, self.kv_mode = think, answer, kv_mode
        self.end = list(end)
        self.answering = answering
        self.think_tokens = 0
        self.answer_tokens = 0
        self._tail: list[int] = []

    @classmethod
    def for_request(cls, extra_args: Mapping[str, Any] | None) -> PhaseCounter | None:
        """A counter for a request the frontend hook resolved, else None."""
        args = extra_args or {}
        if KEY_THINK not in args or KEY_ANSWER not in args:
            return None
        return cls(
            args[KEY_THINK],
            args[KEY_ANSWER],
            args.get(KEY_KV_MODE, "reuse"),
            args.get(KEY_END_IDS) or [],
            bool(args.get(KEY_ANSWERING, False)),
        )

    def add(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            if self.answering:
                self.answer_tokens += 1
                continue
            self.think_tokens += 1
            self._tail = (self._tail + [token])[-len(self.end) :] if self.end else []
            if ends_with(self._tail, self.end):
                self.answering = True

    def as_dict(self) -> dict[str, Any]:
        tokens: dict[str, int] = {}
        for name, n in ((self.think, self.think_tokens), (self.answer, self.answer_tokens)):
            if n or name not in tokens:
                tokens[name] = tokens.get(name, 0) + n
        return {
            "think_budget": self.think,
            "answer_budget": self.answer,
            "kv_mode": self.kv_mode,
            "think_tokens": self.think_tokens,
            "answer_tokens": self.answer_tokens,
            "tokens": tokens,
        }


def elastic_usage(request_output: Any) -> dict[str, Any] | None:
    """Tokens per budget of an (offline) ``RequestOutput`` of an elastic model."""
    return getattr(request_output, "elastic_usage", None)


def merge_usages(usages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum per-request usages (several prompts or choices in one response)."""
    tokens: dict[str, int] = {}
    think = answer = 0
    for u in usages:
        think += u["think_tokens"]
        answer += u["answer_tokens"]
        for name, n in u["tokens"].items():
            tokens[name] = tokens.get(name, 0) + n
    merged: dict[str, Any] = {"think_tokens": think, "answer_tokens": answer, "tokens": tokens}
    if len({(u["think_budget"], u["answer_budget"], u["kv_mode"]) for u in usages}) == 1:
        u = usages[0]
        merged.update(
            think_budget=u["think_budget"], answer_budget=u["answer_budget"], kv_mode=u["kv_mode"]
        )
    return merged


# ------------------------------------------------------------------------- metrics
_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    if not _METRICS:
        from prometheus_client import Counter

        _METRICS["tokens"] = Counter(
            "vllm_elastic:generation_tokens",
            "Generated tokens of elastic requests, by budget and phase.",
            ["budget", "phase"],
        )
        _METRICS["requests"] = Counter(
            "vllm_elastic:requests",
            "Finished elastic requests, by policy.",
            ["think_budget", "answer_budget", "kv_mode"],
        )
    return _METRICS


def _record_finished(counter: PhaseCounter) -> None:
    m = _metrics()
    m["requests"].labels(counter.think, counter.answer, counter.kv_mode).inc()
    if counter.think_tokens:
        m["tokens"].labels(counter.think, "think").inc(counter.think_tokens)
    if counter.answer_tokens:
        m["tokens"].labels(counter.answer, "answer").inc(counter.answer_tokens)


# ---------------------------------------------------------------------- frontend hooks
# The usages of the requests behind one HTTP response (shared dict per response task).
_RESPONSE_USAGES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "vllm_elastic_response_usages", default=None
)


def install_output_hook() -> None:
    """Count tokens per phase in vLLM's OutputProcessor (frontend; idempotent)."""
    from vllm.v1.engine.output_processor import RequestState

    if getattr(RequestState.make_request_output, _MARK, False):
        return
    original_new = RequestState.from_new_request.__func__
    original_make = RequestState.make_request_output

    @functools.wraps(original_new)
    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        state = original_new(cls, tokenizer, request, *args, **kwargs)
        params = request.sampling_params
        state._elastic_counter = PhaseCounter.for_request(params.extra_args if params else None)
        return state

    @functools.wraps(original_make)
    def make_request_output(self, new_token_ids, *args, **kwargs):
        counter = getattr(self, "_elastic_counter", None)
        if counter is not None:
            counter.add(new_token_ids)
        out = original_make(self, new_token_ids, *args, **kwargs)
        if counter is not None and out is not None:
            out.elastic_usage = counter.as_dict()
            if out.finished:
                _record_finished(counter)
        return out

    setattr(make_request_output, _MARK, True)
    RequestState.from_new_request = classmethod(from_new_request)
    RequestState.make_request_output = make_request_output


def install_server_hooks() -> None:
    """Report ``usage.elastic`` in OpenAI responses (API-server process; idempotent)."""
    from pydantic import model_validator
    from vllm.entrypoints.openai.chat_completion import serving as chat_serving
    from vllm.entrypoints.openai.completion import serving as completion_serving
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    if getattr(completion_serving.UsageInfo, _MARK, False):
        return

    class ElasticUsageInfo(UsageInfo):
        """UsageInfo plus ``elastic``: tokens per budget of the requests in this response."""

        @model_validator(mode="after")
        def _add_elastic(self) -> ElasticUsageInfo:
            box = _RESPONSE_USAGES.get()
            if box:
                self.elastic = merge_usages(list(box.values()))
            return self

    setattr(ElasticUsageInfo, _MARK, True)
    _wrap_generate()
    for module, cls_name, method in (
        (completion_serving, "OpenAIServingCompletion", "create_completion"),
        (chat_serving, "OpenAIServingChat", "create_chat_completion"),
    ):
        module.UsageInfo = ElasticUsageInfo
        cls = getattr(module, cls_name)
        setattr(cls, method, _with_response_usages(getattr(cls, method)))


def _wrap_generate() -> None:
    """Collect each yielded output's usage into the current response's box.

    ``AsyncLLM.generate`` runs in the HTTP request's task (the OutputProcessor does not),
    so this is where the request's context is known."""
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.generate

    @functools.wraps(original)
    async def generate(self, *args: Any, **kwargs: Any):
        async for out in original(self, *args, **kwargs):
            usage = getattr(out, "elastic_usage", None)
            box = _RESPONSE_USAGES.get()
            if usage is not None and box is not None:
                box[out.request_id] = usage
            yield out

    AsyncLLM.generate = generate


def _with_response_usages(method: Any) -> Any:
    """Give each response its own usage box, also where vLLM streams the response from
    another task than the one that ran the handler (streams are iterated elsewhere)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        box: dict[str, Any] = {}
        _RESPONSE_USAGES.set(box)
        result = await method(*args, **kwargs)
        if inspect.isasyncgen(result):
            return _stream_with_box(result, box)
        return result

    return wrapper


async def _stream_with_box(stream: Any, box: dict[str, Any]) -> Any:
    _RESPONSE_USAGES.set(box)
    async for chunk in stream:
        yield chunk
