"""The v1 logits processor that tracks each request's budget and phase per batch row.

It never changes logits. Its job is ``update_state``: vLLM's V1 model runner calls it
before every forward with the batch's adds, removals and moves, and it keeps
``ElasticBatchState`` (read by the elastic model in that same forward) in step with the
persistent batch: which budget each row's tokens run at, and from which position on the
answer budget applies (the end-of-thinking marker's position).

It is registered through the ``vllm.logits_processors`` entry point, so every engine
loads it; for non-elastic models it does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from vllm_elastic.batch_state import NEVER, ElasticBatchState, register_state
from vllm_elastic.log import get_logger
from vllm_elastic.markers import ThinkMarkers, ends_with, last_occurrence, resolve_markers
from vllm_elastic.policy import Policy, engine_section, policy_from_extra_args

logger = get_logger(__name__)


@dataclass
class _Row:
    policy: Policy
    prompt: list[int]
    output: list[int]  # vLLM's running list of output ids (by reference)
    answer_from: int


class ElasticBudgetLogitsProcessor(LogitsProcessor):
    """Tracks per-row budgets and switches a row's budget at the end-of-thinking marker."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        hf_config = vllm_config.model_config.hf_config
        self.enabled = getattr(hf_config, "elastic", None) is not None
        if not self.enabled:
            return
        self.spec = hf_config.elastic_spec
        self.index = {b.name: b.index for b in self.spec.budgets}
        self.defaults = engine_section(vllm_config)
        self.markers: ThinkMarkers | None = None
        self.vllm_config = vllm_config
        self.rows: dict[int, _Row] = {}
        self.state = ElasticBatchState(
            vllm_config.scheduler_config.max_num_seqs, self.spec.default.index
        )
        self.state.on_fed = self.confirm_switches
        register_state(vllm_config, self.state)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Budget names depend on the checkpoint; the frontend hook (frontend.py), which
        # knows it, validates them and raises VLLMValidationError (HTTP 400).
        return None

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _markers(self) -> ThinkMarkers:
        if self.markers is None:
            self.markers = resolve_markers(self.vllm_config)
        return self.markers

    def _initial_answer_from(self, policy: Policy, prompt: list[int], output: list[int]) -> int:
        """Where the answer budget starts for a row that (re)joins the batch."""
        if not policy.switches:
            return NEVER
        markers = self._markers()
        if markers.prompt_answers_from_start(prompt):
            return 0
        end = last_occurrence(output, markers.end)
        if end < 0:
            return NEVER
        # resumed after the switch (preemption, or the recompute pass)
        return 0 if policy.kv_mode == "recompute" else len(prompt) + end

    def _publish(self, row: int) -> None:
        r = self.rows.get(row)
        if r is None:
            self.state.clear_row(row)
            return
        self.state.set_row(
            row, self.index[r.policy.think], self.index[r.policy.answer], r.answer_from
        )

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.enabled:
            return
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        self._detect_switches()

    def _apply_batch_update(self, bu: BatchUpdate) -> None:
        for row in bu.removed:
            self.rows.pop(row, None)
            self.state.clear_row(row)
        for row, params, prompt, output in bu.added:
            policy = policy_from_extra_args(self.spec, params.extra_args, self.defaults)
            prompt = list(prompt or [])
            self.rows[row] = _Row(
                policy, prompt, output, self._initial_answer_from(policy, prompt, output)
            )
            self._publish(row)
        for src, dst, direction in bu.moved:
            if direction == MoveDirectionality.SWAP:
                a, b = self.rows.pop(src, None), self.rows.pop(dst, None)
                if a is not None:
                    self.rows[dst] = a
                if b is not None:
                    self.rows[src] = b
                self.state.swap(src, dst)
            else:
                moved = self.rows.pop(src, None)
                self.rows.pop(dst, None)
                if moved is not None:
                    self.rows[dst] = moved
                self.state.move(src, dst)
                self.state.clear_row(src)

    def confirm_switches(self, rows: np.ndarray, fed: np.ndarray, positions: np.ndarray) -> None:
        """Switch pending rows whose token fed in this forward completes the end marker.

        Called by the model with the on-device input ids. Under async scheduling (vLLM's
        GPU default) the last output id is still a ``-1`` placeholder when
        ``update_state`` runs, so the marker is only visible here, in time for its own
        forward to run at the answer budget.
        """
        end = self._markers().end
        for row, token, pos in zip(rows.tolist(), fed.tolist(), positions.tolist()):
            r = self.rows.get(row)
            if r is None or r.answer_from != NEVER or token != end[-1]:
                continue
            if len(end) == 1 or ends_with(r.output[:-1], end[:-1]):
                r.answer_from = pos
                self._publish(row)

    def _detect_switches(self) -> None:
        """Switch rows whose last sampled tokens close the thinking phase."""
        end = None
        for row, r in self.rows.items():
            if r.answer_from != NEVER or not r.policy.switches or not r.output:
                continue
            end = end or self._markers().end
            if ends_with(r.output, end):
                # the marker's last token is fed in this forward: it runs at the answer budget
                r.answer_from = len(r.prompt) + len(r.output) - 1
                self._publish(row)
