"""Declarative slice rules: which parent rows/columns of each tensor a budget keeps.

A family declares, for every Hugging Face tensor name, one rule per dimension:

* ``Keep(size)``: the whole dimension (``size`` reads the parent config);
* ``Units(axis, width)``: the budget's kept components on an elastic axis, ``width``
  consecutive entries each (a head's ``head_dim`` rows, one MLP channel, one expert);
* ``Cat(*parts)``: a packed dimension, the parts one after another (Mamba's ``in_proj``
  rows are ``Cat(z, x, B, C, dt)``).

Everything that needs a budget's geometry reads these declarations: slicing a checkpoint,
tensor shapes and (total and active) parameter counts, random checkpoints, the elastic
models' weight layouts, the benchmarks' cost model and the tests' oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vllm_elastic.spec.axes import AXES
from vllm_elastic.spec.budgets import Budget, ParentShape

SizeOf = Callable[[Any], int]  # parent config -> a size


@dataclass(frozen=True)
class Ctx:
    """Where a rule is evaluated: a budget of a parent, in one parent layer (or none)."""

    budget: Budget
    parent: ParentShape
    config: Any
    layer: int | None = None


def _width(width: int | SizeOf, config: Any) -> int:
    return width if isinstance(width, int) else width(config)


@dataclass(frozen=True)
class Keep:
    """The whole dimension."""

    size: int | SizeOf

    def parent_size(self, config: Any) -> int:
        return _width(self.size, config)

    def indices(self, ctx: Ctx) -> list[int]:
        return list(range(self.parent_size(ctx.config)))

    def count(self, ctx: Ctx) -> int:
        return self.parent_size(ctx.config)

    def padded(self, ctx: Ctx) -> int:
        return self.parent_size(ctx.config)


@dataclass(frozen=True)
class Units:
    """The kept components of ``axis`` (a budget field), ``width`` entries each."""

    axis: str
    width: int | SizeOf = 1

    def parent_size(self, config: Any) -> int:
        return getattr(config, self.axis) * _width(self.width, config)

    def indices(self, ctx: Ctx) -> list[int]:
        w = _width(self.width, ctx.config)
        kept = ctx.budget.kept(self.axis, ctx.parent, ctx.layer)
        return [u * w + j for u in kept for j in range(w)]

    def count(self, ctx: Ctx) -> int:
        return len(ctx.budget.kept(self.axis, ctx.parent, ctx.layer)) * _width(
            self.width, ctx.config
        )

    def padded(self, ctx: Ctx) -> int:
        """The size in a standalone checkpoint, whose config holds one size per axis:
        a per-layer axis is padded to its widest kept layer."""
        if not AXES[self.axis].per_layer:
            return self.count(ctx)
        sizes = [
            ctx.budget.size(self.axis, layer)
            for layer in ctx.budget.layers
            if ctx.parent.has(AXES[self.axis], layer)
        ]
        return max(sizes, default=ctx.budget.size(self.axis, ctx.layer)) * _width(
            self.width, ctx.config
        )


@dataclass(frozen=True)
class Cat:
    """A packed dimension: the parts one after another (none of them padded)."""

    parts: tuple[Keep | Units, ...]

    def parent_size(self, config: Any) -> int:
        return sum(p.parent_size(config) for p in self.parts)

    def indices(self, ctx: Ctx) -> list[int]:
        out, offset = [], 0
        for part in self.parts:
            out += [offset + i for i in part.indices(ctx)]
            offset += part.parent_size(ctx.config)
        return out

    def count(self, ctx: Ctx) -> int:
        return sum(p.count(ctx) for p in self.parts)

    def padded(self, ctx: Ctx) -> int:
        return self.count(ctx)

    def offsets(self, config: Any) -> list[int]:
        """Where each part starts in the parent dimension."""
        out, offset = [], 0
        for part in self.parts:
            out.append(offset)
            offset += part.parent_size(config)
        return out


Rule = Keep | Units | Cat


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor: a rule per dimension.

    ``name`` is relative to the layer prefix for layer tensors and may hold ``{e}`` (one
    tensor per routed expert, kept experts only)."""

    name: str
    dims: tuple[Rule, ...]
    when: Callable[[Any], bool] = _always

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.name

    def parent_shape(self, config: Any) -> tuple[int, ...]:
        return tuple(d.parent_size(config) for d in self.dims)

    def shape(self, ctx: Ctx, padded: bool = False) -> tuple[int, ...]:
        return tuple(d.padded(ctx) if padded else d.count(ctx) for d in self.dims)

    def take(self, tensor: torch.Tensor, ctx: Ctx, padded: bool = False) -> torch.Tensor:
        """The budget's slice of the parent tensor (zero-padded to the standalone size)."""
        out = tensor
        for dim, rule in enumerate(self.dims):
            idx = rule.indices(ctx)
            if len(idx) != out.shape[dim]:
                out = out.index_select(dim, torch.tensor(idx, dtype=torch.long))
            elif idx != list(range(len(idx))):
                out = out.index_select(dim, torch.tensor(idx, dtype=torch.long))
            if padded and rule.padded(ctx) > out.shape[dim]:
                pad_shape = list(out.shape)
                pad_shape[dim] = rule.padded(ctx) - out.shape[dim]
                out = torch.cat([out, out.new_zeros(pad_shape)], dim=dim)
        return out


@dataclass(frozen=True)
class SliceSpec:
    """Every tensor of a family: global ones and, per layer kind, the layer's own."""

    layer_prefix: str  # e.g. "model.layers.{i}."
    globals: tuple[TensorSpec, ...]
    layers: Mapping[str, tuple[TensorSpec, ...]]
    experts_axis: str | None = None
    active_experts: SizeOf | None = None  # experts each token runs (num_experts_per_tok)

    def layer_tensors(self, kind: str, config: Any) -> list[TensorSpec]:
        return [t for t in self.layers[kind] if t.when(config)]

    def global_tensors(self, config: Any) -> list[TensorSpec]:
        return [t for t in self.globals if t.when(config)]

    def _experts(self, ctx: Ctx) -> range:
        return range(ctx.budget.size(self.experts_axis)) if self.experts_axis else range(0)

    def entries(
        self, config: Any, parent: ParentShape, budget: Budget, renumber: bool = True
    ) -> Iterable[tuple[str, str, TensorSpec, Ctx]]:
        """``(name in the budget's checkpoint, name in the parent's, spec, ctx)`` of every
        tensor the budget keeps; kept layers are renumbered ``0..n-1`` when ``renumber``."""
        for spec in self.global_tensors(config):
            yield spec.name, spec.name, spec, Ctx(budget, parent, config)
        for new, layer in enumerate(budget.layers):
            ctx = Ctx(budget, parent, config, layer)
            src = self.layer_prefix.format(i=layer)
            dst = self.layer_prefix.format(i=new if renumber else layer)
            for spec in self.layer_tensors(parent.layer_kinds[layer], config):
                experts = self._experts(ctx) if spec.per_expert else [None]
                for e in experts:
                    rel = spec.name if e is None else spec.name.format(e=e)
                    yield dst + rel, src + rel, spec, ctx

    def shapes(
        self, config: Any, parent: ParentShape, budget: Budget, padded: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of the budget's standalone checkpoint (layers renumbered;
        ``padded``: per-layer sizes padded as a standalone config needs)."""
        return {
            name: spec.shape(ctx, padded)
            for name, _, spec, ctx in self.entries(config, parent, budget)
        }

    def _counts(
        self, config: Any, parent: ParentShape, budget: Budget
    ) -> Iterable[tuple[int, bool]]:
        """(elements, per routed expert) of every tensor the budget keeps, each routed
        expert tensor once (multiply by the kept experts)."""
        for spec in self.global_tensors(config):
            yield math.prod(spec.shape(Ctx(budget, parent, config))), False
        for layer in budget.layers:
            ctx = Ctx(budget, parent, config, layer)
            for spec in self.layer_tensors(parent.layer_kinds[layer], config):
                yield math.prod(spec.shape(ctx)), spec.per_expert

    def num_parameters(self, config: Any, parent: ParentShape, budget: Budget) -> int:
        experts = budget.size(self.experts_axis) if self.experts_axis else 0
        return sum(n * (experts if e else 1) for n, e in self._counts(config, parent, budget))

    def num_active_parameters(self, config: Any, parent: ParentShape, budget: Budget) -> int:
        """Parameters one token runs through: routed experts count ``active_experts`` of
        the kept ones (embedding and lm_head included)."""
        experts = budget.size(self.experts_axis) if self.experts_axis else 0
        active = min(self.active_experts(config), experts) if self.experts_axis else 0
        return sum(n * (active if e else 1) for n, e in self._counts(config, parent, budget))
