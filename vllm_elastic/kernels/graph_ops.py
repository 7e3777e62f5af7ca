"""Registration of the plugin's Python graph ops (``torch.ops.vllm_elastic.*``).

An op that a compiled forward must not trace into (attention over a budget's own heads,
the Mamba conv/scan, the routed experts) is registered the way vLLM registers its own:
``define`` + ``impl`` on one ``torch.library.Library`` fragment, plus a fake for tracing.
``torch.library.custom_op`` would wrap each call in about 15 µs of Python dispatch, which
a decode step pays once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch.library import Library, infer_schema

NAMESPACE = "vllm_elastic"
LIB = Library(NAMESPACE, "FRAGMENT")  # the C++ kernels define the namespace's other ops

Fn = TypeVar("Fn", bound=Callable)


def graph_op(
    name: str, *, mutates_args: Sequence[str] = (), writes_cache: bool = False
) -> Callable[[Fn], Fn]:
    """Register the decorated function as ``torch.ops.vllm_elastic.<name>`` (schema from
    its annotations; ``mutates_args`` names the tensors it writes in place).

    ``writes_cache``: the op also writes state outside its arguments (the KV cache, Mamba
    state). It is marked side-effecting, so a compiled graph keeps it even where its
    outputs go unused: a layer a budget skips still writes K/V and state, which the graph
    would otherwise drop as dead code (its output feeds nothing).
    """

    def register(fn: Fn) -> Fn:
        LIB.define(name + infer_schema(fn, mutates_args=tuple(mutates_args)))
        LIB.impl(name, fn, "CompositeExplicitAutograd")
        if writes_cache:
            from torch.fx.node import has_side_effect

            has_side_effect(getattr(torch.ops.vllm_elastic, name).default)
        return fn

    return register


def fake_of(name: str) -> Callable[[Fn], Fn]:
    """Register the decorated function as the op's fake (shapes only, for tracing)."""

    def register(fn: Fn) -> Fn:
        torch.library.register_fake(f"{NAMESPACE}::{name}", fn, lib=LIB)
        return fn

    return register
