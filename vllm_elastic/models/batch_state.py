"""Per-row budget schedule of the persistent batch, shared inside one worker process.

The logits processor (``logits_processor.py``) writes it in ``update_state``, which vLLM's
V1 model runner calls before every forward; the elastic model reads it in that forward.
Row ``i`` here is row ``i`` of the persistent batch, which is also the order of the rows'
tokens in the forward.

A row's budget is piecewise constant over positions: ``base`` from position 0, then a
new budget at each change position (see ``control/schedule.py``). Its *state budgets*
are constant: the budgets whose recurrent state (Mamba heads) its tokens must write (a
``reuse`` row's thinking and answer budgets; one budget otherwise); a recurrent layer
writes the union of their heads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ElasticBatchState:
    """Budget index per batch row and position."""

    def __init__(self, max_rows: int, default_budget: int) -> None:
        self.default_budget = default_budget
        # budget from the row's last change on (or from position 0 without changes)
        self.current = np.full(max_rows, default_budget, dtype=np.int64)
        self.last_change = np.full(max_rows, -1, dtype=np.int64)
        self.base = np.full(max_rows, default_budget, dtype=np.int64)
        self.state = np.full((max_rows, 2), default_budget, dtype=np.int64)
        self.changes: list[tuple[np.ndarray, np.ndarray] | None] = [None] * max_rows
        # rows whose budget changes at a marker still to come (fed tokens are checked)
        self.pending = np.zeros(max_rows, dtype=bool)
        # set by the logits processor: (rows, fed token ids, their positions) -> None;
        # called by the model with the last token each pending row feeds
        self.on_fed: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None

    def set_row(
        self,
        row: int,
        base: int,
        changes: Sequence[tuple[int, int]],
        pending: bool,
        states: tuple[int, int] | None = None,
    ) -> None:
        self.base[row] = base
        self.state[row] = (base, base) if states is None else states
        if changes:
            pos = np.array([p for p, _ in changes], dtype=np.int64)
            budgets = np.array([b for _, b in changes], dtype=np.int64)
            self.changes[row] = (pos, budgets)
            self.current[row], self.last_change[row] = budgets[-1], pos[-1]
        else:
            self.changes[row] = None
            self.current[row], self.last_change[row] = base, -1
        self.pending[row] = pending

    def add_change(self, row: int, position: int, budget: int) -> None:
        """The row runs at ``budget`` from ``position`` on (after every known change)."""
        old = self.changes[row]
        pos = np.array([position], dtype=np.int64)
        budgets = np.array([budget], dtype=np.int64)
        if old is not None:
            pos, budgets = np.concatenate([old[0], pos]), np.concatenate([old[1], budgets])
        self.changes[row] = (pos, budgets)
        self.current[row], self.last_change[row] = budget, position

    def clear_row(self, row: int) -> None:
        self.set_row(row, self.default_budget, (), False)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.current, self.last_change, self.base, self.state, self.pending)

    def move(self, src: int, dst: int) -> None:
        for arr in self._arrays():
            arr[dst] = arr[src]
        self.changes[dst] = self.changes[src]

    def swap(self, a: int, b: int) -> None:
        for arr in self._arrays():
            arr[[a, b]] = arr[[b, a]]
        self.changes[a], self.changes[b] = self.changes[b], self.changes[a]

    def token_states(self, counts: np.ndarray) -> np.ndarray:
        """``[tokens, 2]``: the state budgets of every token of a forward whose rows have
        ``counts`` tokens."""
        return np.repeat(self.state[: len(counts)], counts, axis=0)

    def token_budgets(self, counts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Budget index of every token of a forward whose rows have ``counts`` tokens."""
        n = len(counts)
        total = int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        first = positions[starts] if n else starts
        # rows whose tokens all lie after their last change: one budget each
        varying = np.flatnonzero((self.last_change[:n] > first) & (counts > 0))
        current = self.current[:n]
        if n == 0:
            return np.full(total, self.default_budget, dtype=np.int64)
        if not varying.size and (current == current[0]).all():
            return np.full(total, current[0], dtype=np.int64)
        out = np.repeat(current, counts)
        for row in varying.tolist():
            s, e = starts[row], starts[row] + counts[row]
            pos, budgets = self.changes[row]
            k = np.searchsorted(pos, positions[s:e], side="right") - 1
            out[s:e] = np.where(k >= 0, budgets[np.maximum(k, 0)], self.base[row])
        return out


# engine (model_config object) -> its batch state; weak, so a closed engine's state goes
_STATES: dict[int, tuple[weakref.ref, ElasticBatchState]] = {}
_STATES_LOCK = threading.Lock()


def register_state(vllm_config: Any, state: ElasticBatchState) -> None:
    """Publish the batch state of the engine that owns ``vllm_config`` (worker side)."""
    key = vllm_config.model_config
    with _STATES_LOCK:
        for k in [k for k, (ref, _) in _STATES.items() if ref() is None]:
            del _STATES[k]
        _STATES[id(key)] = (weakref.ref(key), state)


def lookup_state(vllm_config: Any) -> ElasticBatchState | None:
    """The batch state published for ``vllm_config``, if its logits processor exists."""
    key = vllm_config.model_config
    with _STATES_LOCK:
        entry = _STATES.get(id(key))
    if entry is None or entry[0]() is not key:
        return None
    return entry[1]
