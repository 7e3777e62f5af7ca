"""Per-row budget schedule of the persistent batch, shared inside one worker process.

The logits processor (``logits_processor.py``) writes it in ``update_state``, which vLLM's
V1 model runner calls before every forward; the elastic model (``models/elastic.py``)
reads it in that forward. Row ``i`` here is row ``i`` of the persistent batch, which is
also the order of the rows' tokens in the forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

NEVER = np.iinfo(np.int64).max


class ElasticBatchState:
    """Budget index per batch row: ``think`` before position ``answer_from``, then ``answer``."""

    def __init__(self, max_rows: int, default_budget: int) -> None:
        self.default_budget = default_budget
        self.think = np.full(max_rows, default_budget, dtype=np.int64)
        self.answer = np.full(max_rows, default_budget, dtype=np.int64)
        self.answer_from = np.full(max_rows, NEVER, dtype=np.int64)
        # rows that switch budgets but have not met their end marker yet
        self.pending = np.zeros(max_rows, dtype=bool)
        # set by the logits processor: (rows, fed token ids, their positions) -> None;
        # called by the model with the last token each pending row feeds (see
        # ElasticBudgetLogitsProcessor.confirm_switches)
        self.on_fed: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None

    def set_row(self, row: int, think: int, answer: int, answer_from: int) -> None:
        self.think[row] = think
        self.answer[row] = answer
        self.answer_from[row] = answer_from
        self.pending[row] = think != answer and answer_from == NEVER

    def clear_row(self, row: int) -> None:
        self.set_row(row, self.default_budget, self.default_budget, NEVER)

    def move(self, src: int, dst: int) -> None:
        for arr in (self.think, self.answer, self.answer_from, self.pending):
            arr[dst] = arr[src]

    def swap(self, a: int, b: int) -> None:
        for arr in (self.think, self.answer, self.answer_from, self.pending):
            arr[a], arr[b] = arr[b], arr[a]

    def token_budgets(self, counts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Budget index of every token of a forward whose rows have ``counts`` tokens."""
        n = len(counts)
        think = self.think[:n]
        if np.array_equal(think, self.answer[:n]):
            return np.repeat(think, counts)
        rows = np.repeat(np.arange(n), counts)
        total = int(counts.sum())
        return np.where(positions[:total] >= self.answer_from[rows], self.answer[rows], think[rows])


_STATES: dict[int, ElasticBatchState] = {}
_STATES_LOCK = threading.Lock()


def _key(vllm_config: Any) -> int:
    return id(vllm_config.model_config)


def register_state(vllm_config: Any, state: ElasticBatchState) -> None:
    """Publish the batch state of the engine that owns ``vllm_config`` (worker side)."""
    with _STATES_LOCK:
        _STATES[_key(vllm_config)] = state


def lookup_state(vllm_config: Any) -> ElasticBatchState | None:
    """The batch state published for ``vllm_config``, if its logits processor exists."""
    with _STATES_LOCK:
        return _STATES.get(_key(vllm_config))


def drop_state(vllm_config: Any) -> None:
    with _STATES_LOCK:
        _STATES.pop(_key(vllm_config), None)
