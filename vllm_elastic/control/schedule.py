"""Which budget computes each position of a request: a causal function of its policy and tokens.

Prefix caching shares K/V (and Mamba state) between requests by token ids plus one salt
per request. A shared block is only correct if the budget that computed every position
up to the block's end follows from the salt and those tokens alone. Every schedule here
has that property, and its salt names the schedule:

``single`` (one budget ``B``; salt ``elastic:B``)
    every position runs at ``B``.
``reuse`` (think ``S``, answer ``L``; salt ``elastic:S>L``)
    the *phase* at position ``p`` is set by the last thinking marker that ends at or
    before ``p``: answering after an end marker (``</think>``), thinking after a start
    marker or before any marker. Thinking runs at ``S``, answering at ``L``. The
    marker's last position already belongs to the phase it opens: the forward that feeds
    ``</think>`` runs at ``L``, so the first answer token comes from the large model.
    A transcript resent with its closed thinking is therefore computed exactly as it was
    when it was generated, and multi-turn chat reuses its cached blocks.
``recompute`` (think ``S``, answer ``L``)
    the thinking pass runs every position at ``S`` (salt ``elastic:S``); after the first
    end marker the request is re-prefilled with every position at ``L`` (salt
    ``elastic:L``). A prompt that already ended thinking runs at ``L`` from its first
    token. Both passes are ``single`` schedules and share blocks with single-budget
    requests of the same budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_elastic.control.markers import ThinkMarkers
from vllm_elastic.control.policy import Policy
from vllm_elastic.errors import ElasticStateError
from vllm_elastic.spec.engine_options import KEY_RESOLVED

SALT_PREFIX = "elastic:"


def salt_of(policy: Policy, answering: bool) -> str:
    """The prefix-cache salt of a request's first pass (``answering``: its prompt ended
    thinking)."""
    if not policy.switches:
        return f"{SALT_PREFIX}{policy.think}"
    if policy.kv_mode == "recompute":
        return f"{SALT_PREFIX}{policy.answer if answering else policy.think}"
    return f"{SALT_PREFIX}{policy.think}>{policy.answer}"


def combine_salts(user_salt: str | None, ours: str) -> str:
    """The request's own ``cache_salt`` (if any) followed by the schedule's salt."""
    return f"{user_salt}|{ours}" if user_salt else ours


def _ends_at(tokens: Sequence[int], i: int, marker: Sequence[int]) -> bool:
    m = len(marker)
    return (
        m > 0
        and i + 1 >= m
        and tokens[i] == marker[-1]
        and list(tokens[i - m + 1 : i + 1]) == list(marker)
    )


def phase_changes(
    tokens: Sequence[int], markers: ThinkMarkers, start: int = 0, answering: bool = False
) -> tuple[list[tuple[int, bool]], bool]:
    """Phase changes ``(position, answering)`` of ``tokens[start:]`` under the reuse rule,
    starting in phase ``answering``; also returns the phase after the last token."""
    changes = []
    for i in range(start, len(tokens)):
        if not answering and _ends_at(tokens, i, markers.end):
            answering = True
            changes.append((i, True))
        elif answering and _ends_at(tokens, i, markers.start):
            answering = False
            changes.append((i, False))
    return changes, answering


def final_phase_answering(tokens: Sequence[int], markers: ThinkMarkers) -> bool:
    """Whether ``tokens`` end in the answer phase (their last marker is an end marker)."""
    return markers.prompt_answers_from_start(tokens)


@dataclass(frozen=True)
class Resolved:
    """A request's resolved schedule, as the frontend writes it into ``extra_args``."""

    think: str
    answer: str
    kv_mode: str | None  # None: a single-budget request
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    answering: bool  # the request starts in its answer phase
    answer_salt: str | None  # recompute: the salt of the answer pass

    @property
    def switches(self) -> bool:
        return self.think != self.answer

    @property
    def markers(self) -> ThinkMarkers:
        return ThinkMarkers(start=self.start_ids, end=self.end_ids)

    def to_wire(self) -> dict[str, Any]:
        return {
            "think": self.think,
            "answer": self.answer,
            "kv_mode": self.kv_mode,
            "start_ids": list(self.start_ids),
            "end_ids": list(self.end_ids),
            "answering": self.answering,
            "answer_salt": self.answer_salt,
        }

    @classmethod
    def from_extra_args(cls, extra_args: Any) -> Resolved | None:
        """The schedule the frontend resolved, or None for a request it did not see."""
        raw = (extra_args or {}).get(KEY_RESOLVED)
        if raw is None:
            return None
        try:
            return cls(
                think=raw["think"],
                answer=raw["answer"],
                kv_mode=raw["kv_mode"],
                start_ids=tuple(raw["start_ids"]),
                end_ids=tuple(raw["end_ids"]),
                answering=bool(raw["answering"]),
                answer_salt=raw["answer_salt"],
            )
        except (KeyError, TypeError) as e:
            raise ElasticStateError(f"malformed resolved elastic schedule {raw!r}") from e


def resolve(
    policy: Policy, markers: ThinkMarkers, prompt: Sequence[int], user_salt: str | None
) -> tuple[Resolved, str]:
    """The request's schedule and its first pass's full ``cache_salt``."""
    if policy.switches:
        answering = final_phase_answering(prompt, markers)
    else:  # one budget: its tokens count as thinking only inside an opened thinking phase
        answering = not markers.prompt_opens_thinking(prompt)
    answer_salt = None
    if policy.switches and policy.kv_mode == "recompute":
        answer_salt = combine_salts(user_salt, f"{SALT_PREFIX}{policy.answer}")
    resolved = Resolved(
        think=policy.think,
        answer=policy.answer,
        kv_mode=policy.reported_kv_mode,
        start_ids=tuple(markers.start),
        end_ids=tuple(markers.end),
        answering=answering,
        answer_salt=answer_salt,
    )
    return resolved, combine_salts(user_salt, salt_of(policy, answering))


def budget_changes(
    resolved: Resolved, prompt: Sequence[int], output: Sequence[int]
) -> tuple[str, list[tuple[int, str]], bool]:
    """Where a (re)joining request's known tokens change budget.

    Returns the budget at position 0, the changes ``(position, budget)`` within
    ``prompt + output`` (``-1`` placeholders excluded) and whether the request still
    watches for a marker that changes its budget (``reuse`` only).
    """
    if not resolved.switches:
        return resolved.think, [], False
    tokens = list(prompt) + [t for t in output if t >= 0]
    if resolved.kv_mode == "recompute":
        # the answer pass once the prompt or the output ended thinking, else the thinking pass
        done = resolved.answering or any(
            _ends_at(output, i, resolved.end_ids) for i in range(len(output)) if output[i] >= 0
        )
        return (resolved.answer if done else resolved.think), [], False
    changes, _ = phase_changes(tokens, resolved.markers)
    budget = {True: resolved.answer, False: resolved.think}
    return resolved.think, [(p, budget[a]) for p, a in changes], True


def stored_budgets(
    resolved: Resolved | None, prompt: Sequence[int], output: Sequence[int]
) -> tuple[str, ...] | None:
    """The budgets whose K/V a request's current blocks must serve (``kv_layout:
    per-budget`` stores the widest one's KV groups): its budget for a ``single`` schedule
    and each ``recompute`` pass, think and answer for ``reuse`` (its thinking tokens are
    read by the answer). None for a request the frontend did not resolve (store all)."""
    if resolved is None:
        return None
    if resolved.switches and resolved.kv_mode != "recompute":
        return (resolved.think, resolved.answer)
    return (budget_changes(resolved, prompt, output)[0],)
