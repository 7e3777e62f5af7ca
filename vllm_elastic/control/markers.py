"""The thinking-phase markers (e.g. ``<think>`` / ``</think>``) as token-id sequences.

Where they come from, first match wins:

1. the engine's ``additional_config["elastic"]``: ``think_end_ids`` / ``think_start_ids``
   (lists of ints) or ``think_end`` / ``think_start`` (strings, tokenized);
2. vLLM's ``--reasoning-config`` (its natural end ids, then its start ids);
3. the checkpoint's ``config.json`` ``elastic.think_end`` / ``elastic.think_start``;
4. ``</think>`` / ``<think>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_elastic.spec.engine_options import engine_options

DEFAULT_THINK_START = "<think>"
DEFAULT_THINK_END = "</think>"


@dataclass(frozen=True)
class ThinkMarkers:
    """Token-id sequences that open and close the thinking phase."""

    start: tuple[int, ...]
    end: tuple[int, ...]

    def prompt_answers_from_start(self, prompt: Sequence[int]) -> bool:
        """True when the prompt already closed thinking (its last end marker follows its
        last start marker), so the request answers from its first token."""
        last_end = last_occurrence(prompt, self.end)
        return last_end >= 0 and last_end > last_occurrence(prompt, self.start)

    def prompt_opens_thinking(self, prompt: Sequence[int]) -> bool:
        """True when the prompt leaves a thinking phase open (e.g. ends with ``<think>``)."""
        last_start = last_occurrence(prompt, self.start)
        return last_start >= 0 and last_start > last_occurrence(prompt, self.end)


def last_occurrence(seq: Sequence[int], pattern: Sequence[int]) -> int:
    """Index of the last token of the last occurrence of ``pattern`` in ``seq``, or -1."""
    m = len(pattern)
    if m == 0:
        return -1
    last = pattern[-1]
    for i in range(len(seq) - 1, m - 2, -1):
        if seq[i] == last and list(seq[i - m + 1 : i + 1]) == list(pattern):
            return i
    return -1


def ends_with(seq: Sequence[int], pattern: Sequence[int]) -> bool:
    m = len(pattern)
    return m > 0 and len(seq) >= m and list(seq[-m:]) == list(pattern)


def _tokenize(model_config: Any, text: str) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_config.tokenizer, trust_remote_code=model_config.trust_remote_code
    )
    ids = tuple(tok.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"the thinking marker {text!r} tokenizes to no tokens")
    return ids


def _from_section(section: dict[str, Any], which: str, model_config: Any) -> tuple[int, ...] | None:
    ids = section.get(f"think_{which}_ids")
    if ids is not None:
        if not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"elastic.think_{which}_ids must be a non-empty list of ints")
        return tuple(ids)
    text = section.get(f"think_{which}")
    if text is not None:
        return _tokenize(model_config, text)
    return None


def resolve_markers(vllm_config: Any) -> ThinkMarkers:
    """The engine's thinking markers (see the module docstring for the order)."""
    model_config = vllm_config.model_config
    section = engine_options(vllm_config).markers
    ckpt_section = getattr(model_config.hf_config, "elastic", None) or {}
    reasoning = getattr(vllm_config, "reasoning_config", None)
    found: dict[str, tuple[int, ...]] = {}
    for which, default in (("start", DEFAULT_THINK_START), ("end", DEFAULT_THINK_END)):
        ids = _from_section(section, which, model_config)
        if ids is None and reasoning is not None and getattr(reasoning, "enabled", False):
            attr = (
                "natural_reasoning_end_token_ids"
                if which == "end"
                else ("reasoning_start_token_ids")
            )
            got = getattr(reasoning, attr, None)
            ids = tuple(got) if got else None
        if ids is None:
            ids = _from_section(ckpt_section, which, model_config)
        if ids is None:
            ids = _tokenize(model_config, default)
        found[which] = ids
    return ThinkMarkers(start=found["start"], end=found["end"])
