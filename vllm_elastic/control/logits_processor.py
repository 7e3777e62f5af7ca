"""The v1 logits processor that tracks each request's budget per batch row and position.

It never changes logits. Its job is ``update_state``: vLLM's V1 model runner calls it
before every forward with the batch's adds, removals and moves, and it keeps
``ElasticBatchState`` (read by the elastic model in that same forward) in step with the
persistent batch: the budget of every position of every row, by the causal schedule of
``control/schedule.py``. A ``reuse`` row's budget changes when a thinking marker
completes in its output; that is seen in the sampled ids here or, under async scheduling
(where the last id is still a ``-1`` placeholder), in the fed input ids the model reports
(``confirm_switches``).

The plugin attaches it to elastic models only, from the architecture's config hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_elastic.control.markers import ThinkMarkers
from vllm_elastic.control.schedule import Resolved, _ends_at, budget_changes
from vllm_elastic.errors import ElasticStateError
from vllm_elastic.models.batch_state import ElasticBatchState, register_state

FQCN = f"{__name__}:ElasticBudgetLogitsProcessor"


@dataclass
class _Row:
    resolved: Resolved
    tokens: list[int]  # prompt ids, then the output ids seen so far (no placeholders)
    prompt_len: int
    output: list[int]  # vLLM's running list of output ids (by reference)
    answering: bool  # phase after the last scanned token
    watching: bool  # the budget still changes at markers (reuse)


class ElasticBudgetLogitsProcessor(LogitsProcessor):
    """Tracks per-row budget schedules; switches a ``reuse`` row at each thinking marker."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        hf_config = vllm_config.model_config.hf_config
        if getattr(hf_config, "elastic", None) is None:
            raise ElasticStateError(
                "ElasticBudgetLogitsProcessor serves elastic checkpoints only; the plugin "
                "attaches it to them (do not pass it with --logits-processors)"
            )
        self.spec = hf_config.elastic_spec
        self.index = {b.name: b.index for b in self.spec.budgets}
        self.rows: dict[int, _Row] = {}
        self.state = ElasticBatchState(
            vllm_config.scheduler_config.max_num_seqs, self.spec.default.index
        )
        self.state.on_fed = self.confirm_switches
        register_state(vllm_config, self.state)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Budget names depend on the checkpoint; the frontend hook (control/frontend.py),
        # which knows it, validates them and raises VLLMValidationError (HTTP 400).
        return None

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        self._scan_outputs()

    def _add(self, row: int, params: SamplingParams, prompt: Any, output: list[int]) -> None:
        resolved = Resolved.from_extra_args(params.extra_args)
        if resolved is None:
            raise ElasticStateError(
                "a request reached the elastic model without a resolved budget schedule "
                "(the frontend hook did not run for it)"
            )
        prompt = list(prompt or [])
        base, changes, watching = budget_changes(resolved, prompt, output)
        tokens = prompt + [t for t in output if t >= 0]
        answering = bool(changes) and changes[-1][1] == resolved.answer and resolved.switches
        self.rows[row] = _Row(resolved, tokens, len(prompt), output, answering, watching)
        self.state.set_row(
            row,
            self.index[base],
            [(p, self.index[b]) for p, b in changes],
            watching,
            self._state_budgets(resolved, base),
        )

    def _state_budgets(self, resolved: Resolved, base: str) -> tuple[int, int]:
        """The budgets whose recurrent state a row writes: a reuse row's two (its answer
        reads the state its thinking wrote), else the one it runs at (a recompute pass,
        one budget)."""
        if resolved.switches and resolved.kv_mode == "reuse":
            return self.index[resolved.think], self.index[resolved.answer]
        return self.index[base], self.index[base]

    def _apply_batch_update(self, bu: BatchUpdate) -> None:
        for row in bu.removed:
            self.rows.pop(row, None)
            self.state.clear_row(row)
        for row, params, prompt, output in bu.added:
            self._add(row, params, prompt, output)
        for src, dst, direction in bu.moved:
            if direction == MoveDirectionality.SWAP:
                a, b = self.rows.pop(src, None), self.rows.pop(dst, None)
                if a is not None:
                    self.rows[dst] = a
                if b is not None:
                    self.rows[src] = b
                self.state.swap(src, dst)
            else:  # one-way: the destination is overwritten
                moved = self.rows.pop(src, None)
                self.rows.pop(dst, None)
                if moved is not None:
                    self.rows[dst] = moved
                self.state.move(src, dst)
                self.state.clear_row(src)

    def _watched(self, r: _Row) -> tuple[int, ...]:
        markers: ThinkMarkers = r.resolved.markers
        return markers.start if r.answering else markers.end

    def _switch(self, row: int, r: _Row, position: int) -> None:
        r.answering = not r.answering
        budget = r.resolved.answer if r.answering else r.resolved.think
        self.state.add_change(row, position, self.index[budget])

    def _scan_outputs(self) -> None:
        """Extend each watching row's tokens with its new output ids; switch at markers.

        A marker completed by the last sampled token is fed in this forward, which
        therefore already runs in the phase the marker opens."""
        for row, r in self.rows.items():
            if r.watching:
                self._scan(row, r, r.output)

    def _scan(self, row: int, r: _Row, output: list[int]) -> None:
        for token in output[len(r.tokens) - r.prompt_len :]:
            if token < 0:  # async placeholder: confirmed from the fed ids
                break
            r.tokens.append(token)
            if _ends_at(r.tokens, len(r.tokens) - 1, self._watched(r)):
                self._switch(row, r, len(r.tokens) - 1)

    def confirm_switches(self, rows: np.ndarray, fed: np.ndarray, positions: np.ndarray) -> None:
        """Switch watching rows whose token fed in this forward completes a marker.

        Called by the model with the on-device input ids (the last token each pending row
        feeds) before it computes the forward's budgets."""
        for row, token, pos in zip(rows.tolist(), fed.tolist(), positions.tolist()):
            r = self.rows.get(row)
            if r is None or not r.watching or pos < len(r.tokens):
                continue  # unknown, or already scanned from the sampled ids
            if pos != len(r.tokens):
                continue  # not the next token after what is known (should not happen)
            r.tokens.append(token)
            if _ends_at(r.tokens, pos, self._watched(r)):
                self._switch(row, r, pos)
