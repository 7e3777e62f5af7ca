"""Observability: how many tokens each request generated at each budget.

A generated token is produced by the forward that fed the token before it, so by the
causal schedule (``control/schedule.py``) the budget of every generated token follows
from the output ids alone; it is counted in the frontend as outputs stream out, per
choice (``n > 1`` requests count every choice):

* offline: ``elastic_usage(request_output)``;
* server: ``usage.elastic`` in every OpenAI response that carries ``usage``
  (``compat/server.py``);
* ``/metrics``: ``vllm_elastic:generation_tokens_total{budget,phase}`` (every generated
  token, also of aborted requests) and
  ``vllm_elastic:requests_total{think_budget,answer_budget,kv_mode}`` (finished, not aborted).

Usage objects are live: reading one always gives the counts so far, so a consumer that
reads a stream slowly (vLLM merges the outputs it has not taken yet) still gets the
final numbers.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_elastic.control.schedule import Resolved, _ends_at


class PhaseCounter:
    """Counts one choice's generated tokens per phase, by the request's schedule."""

    def __init__(self, resolved: Resolved, prompt: Sequence[int]) -> None:
        self.resolved = resolved
        self.answering = resolved.answering
        self.recompute = resolved.kv_mode == "recompute"
        self.think_tokens = 0
        self.answer_tokens = 0
        self._tail = list(prompt[-8:])

    def add(self, token_ids: Sequence[int]) -> None:
        markers = self.resolved.markers
        for token in token_ids:
            if self.answering:
                self.answer_tokens += 1
            else:
                self.think_tokens += 1
            self._tail = (self._tail + [token])[-max(len(markers.start), len(markers.end), 1) :]
            last = len(self._tail) - 1
            if not self.answering and _ends_at(self._tail, last, markers.end):
                self.answering = True
            elif (
                self.answering and not self.recompute and _ends_at(self._tail, last, markers.start)
            ):
                self.answering = False  # reuse: a new thinking phase runs at the think budget


class UsageGroup:
    """The counters of one request (one per choice); ``as_dict`` sums them."""

    def __init__(self, resolved: Resolved) -> None:
        self.resolved = resolved
        self.counters: dict[str, PhaseCounter] = {}
        self.finished: set[str] = set()
        self.aborted = False

    def child(self, request_id: str, prompt: Sequence[int]) -> PhaseCounter:
        counter = self.counters.get(request_id)
        if counter is None:
            counter = self.counters[request_id] = PhaseCounter(self.resolved, prompt)
        return counter

    def finish(self, request_id: str, aborted: bool) -> bool:
        """Record a finished choice; True when this completes a request not aborted."""
        if request_id in self.finished:
            return False
        self.finished.add(request_id)
        self.aborted |= aborted
        return not self.aborted and self.finished == set(self.counters)

    def as_dict(self) -> dict[str, Any]:
        r = self.resolved
        think = sum(c.think_tokens for c in self.counters.values())
        answer = sum(c.answer_tokens for c in self.counters.values())
        tokens = {r.think: think, r.answer: answer} if r.switches else {r.think: think + answer}
        return {
            "think_budget": r.think,
            "answer_budget": r.answer,
            "kv_mode": r.kv_mode,
            "think_tokens": think,
            "answer_tokens": answer,
            "tokens": tokens,
            "choices": len(self.counters),
        }


# request id (the parent's for n > 1) -> usage group, while a choice of it is alive
_GROUPS: weakref.WeakValueDictionary[str, UsageGroup] = weakref.WeakValueDictionary()
# RequestOutput -> the usage group of its request
_OUTPUTS: weakref.WeakKeyDictionary[Any, UsageGroup] = weakref.WeakKeyDictionary()


def on_new_request(request: Any, parent_req: Any) -> tuple[UsageGroup, PhaseCounter, str] | None:
    """A new request (or ``n > 1`` choice) in the frontend: its counter, or None for a
    request of a non-elastic model (called by ``compat/outputs.py``)."""
    params = request.sampling_params
    resolved = Resolved.from_extra_args(params.extra_args if params else None)
    if resolved is None:
        return None
    key = parent_req.request_id if parent_req is not None else request.request_id
    group = _GROUPS.get(key)
    if group is None:
        group = _GROUPS[key] = UsageGroup(resolved)
    counter = group.child(request.request_id, request.prompt_token_ids or [])
    return group, counter, request.request_id


def on_output(
    handle: tuple[UsageGroup, PhaseCounter, str],
    new_token_ids: Sequence[int],
    aborted: bool,
    finished: bool,
    request_output: Any,
) -> None:
    """New tokens of a choice: count them; link the output vLLM built to the group."""
    group, counter, request_id = handle
    count_tokens(counter, new_token_ids)
    if finished and group.finish(request_id, aborted):
        count_request(group)
    if request_output is not None:
        _OUTPUTS[request_output] = group


def group_of(request_output: Any) -> UsageGroup | None:
    """The usage group of a RequestOutput (None for a non-elastic model)."""
    try:
        return _OUTPUTS.get(request_output)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def elastic_usage(request_output: Any) -> dict[str, Any] | None:
    """Tokens per budget of an (offline) ``RequestOutput`` of an elastic model."""
    group = group_of(request_output)
    return None if group is None else group.as_dict()


def merge_usages(usages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum per-request usages (several prompts in one response)."""
    tokens: dict[str, int] = {}
    think = answer = choices = 0
    for u in usages:
        think += u["think_tokens"]
        answer += u["answer_tokens"]
        choices += u.get("choices", 1)
        for name, n in u["tokens"].items():
            tokens[name] = tokens.get(name, 0) + n
    merged: dict[str, Any] = {
        "think_tokens": think,
        "answer_tokens": answer,
        "tokens": tokens,
        "choices": choices,
    }
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
            "Finished (not aborted) elastic requests, by policy.",
            ["think_budget", "answer_budget", "kv_mode"],
        )
    return _METRICS


def count_tokens(counter: PhaseCounter, token_ids: Sequence[int]) -> None:
    """Add newly generated tokens to a choice's counter and to the token metric."""
    think, answer = counter.think_tokens, counter.answer_tokens
    counter.add(token_ids)
    r = counter.resolved
    m = _metrics()["tokens"]
    if counter.think_tokens > think:
        m.labels(r.think, "think").inc(counter.think_tokens - think)
    if counter.answer_tokens > answer:
        m.labels(r.answer, "answer").inc(counter.answer_tokens - answer)


def count_request(group: UsageGroup) -> None:
    r = group.resolved
    _metrics()["requests"].labels(r.think, r.answer, r.kv_mode or "none").inc()
