"""Fix for a vLLM 0.32 bug that elastic budget control runs into.

``ThinkingBudgetStateHolder.sync_batch`` (vLLM's ``thinking_token_budget`` state): a
one-way move ``i1 -> i2`` overwrites row ``i2`` (vLLM's BatchUpdate contract), but when
row ``i1`` has no thinking-budget state the holder keeps ``i2``'s old state. The old
state belongs to a request that left row ``i2`` without being listed in ``removed``
(``condense()`` refilled the slot). The next request moved into ``i2`` then inherits that
request's countdown and gets ``</think>`` forced into its output. It happens whenever a
preempted or finished request's slot is refilled by ``condense()``; ``recompute`` mode
preempts at every switch, so it shows up often. The fix clears the destination.
"""

from __future__ import annotations

from typing import Any

from vllm_elastic.compat.patching import wrap


def install() -> None:
    """Make one-way moves overwrite the destination row's thinking state (idempotent)."""
    from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.thinking_budget_state import ThinkingBudgetStateHolder

    def make(original: Any) -> Any:
        def sync_batch(self: Any, batch_update: BatchUpdate | None) -> None:
            if not self.is_enabled or not batch_update or not batch_update.moved:
                return original(self, batch_update)
            original(
                self,
                BatchUpdate(
                    batch_size=batch_update.batch_size,
                    removed=batch_update.removed,
                    added=batch_update.added,
                    moved=[],
                ),
            )
            for i1, i2, direction in batch_update.moved:
                first = self._state.pop(i1, None)
                second = self._state.pop(i2, None)
                if first is not None:
                    self._state[i2] = first
                if direction == MoveDirectionality.SWAP and second is not None:
                    self._state[i1] = second

        return sync_batch

    wrap(ThinkingBudgetStateHolder, "sync_batch", make)
