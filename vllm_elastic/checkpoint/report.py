"""Per-budget sizes of an elastic checkpoint: shape, total and active parameters, bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_elastic.checkpoint.io import load_elastic_config
from vllm_elastic.checkpoint.random import _resolve_dtype
from vllm_elastic.spec.axes import AXES


def _checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint's config declares (float32 when it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return _resolve_dtype(dtype) if dtype is not None else torch.float32


def _summary(sizes: Sequence[int]) -> int | str:
    """One int when all equal, else ``"min-max"``."""
    return sizes[0] if len(set(sizes)) == 1 else f"{min(sizes)}-{max(sizes)}"


def budget_rows(config: Any) -> list[dict[str, Any]]:
    """Per budget (checkpoint order): its sizes on every axis of the family, parameters
    (total and active: what one token runs through), bytes and fractions of the full."""
    spec = config.elastic_spec
    slices = config.family.slices
    dtype = _checkpoint_dtype(config)
    total_full = slices.num_parameters(config, spec.parent, spec.full)
    active_full = slices.num_active_parameters(config, spec.parent, spec.full)
    rows = []
    for budget in spec.budgets:
        params = slices.num_parameters(config, spec.parent, budget)
        active = slices.num_active_parameters(config, spec.parent, budget)
        row: dict[str, Any] = {
            "name": budget.name,
            "default": budget.name == spec.default_budget,
            "full": budget.is_full(spec.parent),
        }
        for field in spec.parent.sizes:
            axis = AXES[field]
            if axis.per_layer:
                kept = [budget.size(field, i) for i in budget.layers if spec.parent.has(axis, i)]
                row[field] = _summary(kept) if kept else None
                row[f"{field}s"] = kept
            else:
                row[field] = budget.size(field)
        row.update(
            num_layers=len(budget.layers),
            layers=list(budget.layers),
            parameters=params,
            active_parameters=active,
            bytes=params * dtype.itemsize,
            dtype=str(dtype).removeprefix("torch."),
            fraction=params / total_full,
            active_fraction=active / active_full,
        )
        rows.append(row)
    return rows


def budget_report(ckpt_dir: str | Path) -> list[dict[str, Any]]:
    """``budget_rows`` of a checkpoint folder (weights are not read)."""
    return budget_rows(load_elastic_config(ckpt_dir))


def budget_num_parameters(config: Any, budget: Any) -> int:
    spec = config.elastic_spec
    return config.family.slices.num_parameters(config, spec.parent, budget)
