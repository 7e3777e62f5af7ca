"""A v1 logits processor that forces the end-of-thinking token at a fixed output index.

Random benchmark models never emit ``</think>`` by themselves. A request with
``SamplingParams(extra_args={"force_end_at": T})`` gets every logit but ``</think>``'s set
to -inf when its output index is ``T``, so its output is ``T`` thinking tokens,
``</think>``, then answer tokens. Pass the class to the engine:
``LLM(..., logits_processors=[ForceEndOfThinking])``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

KEY = "force_end_at"
END_TOKEN = "</think>"


def end_token_id(vllm_config: Any) -> int:
    """Id of ``</think>`` in the engine's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
    ids = tok.encode(END_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{END_TOKEN!r} is not a single token: {ids}")
    return ids[0]


class ForceEndOfThinking(LogitsProcessor):
    """Forces ``</think>`` at output index ``extra_args["force_end_at"]``."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.end_id = end_token_id(vllm_config)
        self.rows: dict[int, tuple[int, list[int]]] = {}  # row -> (T, live output ids)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        value = (sampling_params.extra_args or {}).get(KEY)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{KEY} must be a non-negative int, got {value!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt, output in batch_update.added:
            at = (params.extra_args or {}).get(KEY) if params is not None else None
            if at is None:
                self.rows.pop(row, None)
            else:
                self.rows[row] = (int(at), output)
        for src, dst, direction in batch_update.moved:
            a, b = self.rows.pop(src, None), self.rows.pop(dst, None)
            if a is not None:
                self.rows[dst] = a
            if b is not None and direction == MoveDirectionality.SWAP:
                self.rows[src] = b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        due = [row for row, (at, out) in self.rows.items() if len(out) == at]
        if due:
            idx = torch.tensor(due, dtype=torch.long, device=logits.device)
            logits[idx] = float("-inf")
            logits[idx, self.end_id] = 0.0
        return logits
