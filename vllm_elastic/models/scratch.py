"""Reusable CPU buffers for a forward's short-lived wide intermediates.

A fresh multi-megabyte CPU tensor is served by new pages that fault on first touch;
during a long prefill that costs as much as the copies that fill it. The elastic forward
runs strictly one step after another in a process, so a named buffer can be reused by
every layer for an intermediate that is dead before the name is asked for again (a
nested projection's band and strip outputs, the MLP's gate_up output and activation).
Other devices have caching allocators: there ``buffer`` just allocates (zeros).
"""

from __future__ import annotations

import torch

from vllm_elastic.compat.compile import is_compiling

_BUFFERS: dict[tuple[str, torch.dtype, torch.device, bool], torch.Tensor] = {}


def buffer(
    name: str, rows: int, cols: int, like: torch.Tensor, *, overwritten: bool = False
) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` tensor of ``like``'s dtype and device.

    On CPU it is a view of the buffer ``name`` (grown as needed, zero-filled when
    grown): it holds whatever the last user of ``name`` left (always finite values) and
    is overwritten by the next call with the same name. ``overwritten``: every
    element that is ever read is written first (a mixed batch's lower-budget rows may
    leave columns past their width unwritten, which nothing reads), so a compiled graph
    (which plans its own buffers) may hand out uninitialised memory instead of
    zero-filling it each step.
    """
    if like.device.type != "cpu" or is_compiling():  # a compiled graph plans its own
        return like.new_empty(rows, cols) if overwritten else like.new_zeros(rows, cols)
    # a buffer made under torch.inference_mode (vLLM's forward) is an inference tensor,
    # which may not be written outside it: one buffer per mode
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    flat = _BUFFERS.get(key)
    if flat is None or flat.numel() < rows * cols:
        flat = like.new_zeros(rows * cols)
        _BUFFERS[key] = flat
    return flat[: rows * cols].view(rows, cols)
