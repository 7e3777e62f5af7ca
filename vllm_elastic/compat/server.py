"""Hooks into vLLM's OpenAI server: ``usage.elastic`` and HTTP 400 before a stream starts.

* Each generation endpoint's handler (completions, chat, batch chat, responses,
  tokens-in-tokens-out) first checks the request's ``vllm_xargs`` with ``validate(hf_config,
  xargs)`` (an error message or None; ``hf_config`` of an elastic model only) and answers
  HTTP 400 itself, so a bad policy on a streamed request is a 400, not an error event
  inside a 200 stream; it then opens a *usage box* for the response.
* ``AsyncLLM.generate`` (run in the response's task) puts each output's usage group
  (``group_of(output)``) into the box.
* ``UsageInfo`` and ``ResponseUsage`` (every usage object vLLM builds, wherever it is
  imported) get ``elastic = summarize(groups)``, read when the object is built.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from vllm_elastic.compat.patching import wrap
from vllm_elastic.spec.families import is_elastic_config

_BOX: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "vllm_elastic_usage_box", default=None
)

# (module, class, handler method): the generation endpoints
HANDLERS = (
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion"),
    (
        "vllm.entrypoints.openai.chat_completion.serving",
        "OpenAIServingChat",
        "create_chat_completion",
    ),
    (
        "vllm.entrypoints.openai.chat_completion.batch_serving",
        "OpenAIServingChatBatch",
        "create_batch_chat_completion",
    ),
    ("vllm.entrypoints.openai.responses.serving", "OpenAIServingResponses", "create_responses"),
    ("vllm.entrypoints.scale_out.token_in_token_out.serving", "ServingTokens", "serve_tokens"),
)
USAGE_CLASSES = (
    ("vllm.entrypoints.serve.engine.protocol", "UsageInfo"),
    ("vllm.entrypoints.openai.responses.protocol", "ResponseUsage"),
)


def install(
    validate: Callable[[Any, Any], str | None],
    group_of: Callable[[Any], Any],
    summarize: Callable[[list[Any]], dict[str, Any]],
) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    def make_handler(original: Any) -> Any:
        async def handler(self, request, *args, **kwargs):
            hf_config = self.model_config.hf_config
            if not is_elastic_config(hf_config):
                return await original(self, request, *args, **kwargs)
            message = validate(hf_config, getattr(request, "vllm_xargs", None))
            if message is not None:
                return self.create_error_response(message, param="vllm_xargs")
            box: list[Any] = []
            _BOX.set(box)
            result = await original(self, request, *args, **kwargs)
            if inspect.isasyncgen(result):
                return _stream_with_box(result, box)
            return result

        return handler

    def make_generate(original: Any) -> Any:
        async def generate(self, *args: Any, **kwargs: Any):
            async for out in original(self, *args, **kwargs):
                box = _BOX.get()
                if box is not None:
                    group = group_of(out)
                    if group is not None and all(g is not group for g in box):
                        box.append(group)
                yield out

        return generate

    def make_usage_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            box = _BOX.get()
            if box:
                self.elastic = summarize(box)

        return __init__

    wrap(AsyncLLM, "generate", make_generate)
    for module, cls_name in USAGE_CLASSES:
        wrap(getattr(importlib.import_module(module), cls_name), "__init__", make_usage_init)
    for module, cls_name, method in HANDLERS:
        cls = getattr(importlib.import_module(module), cls_name)
        wrap(cls, method, make_handler)


async def _stream_with_box(stream: Any, box: list[Any]) -> Any:
    """A streamed response is iterated in another task: give it the same box."""
    _BOX.set(box)
    async for chunk in stream:
        yield chunk
