"""Named budgets of a nested (elastic) checkpoint: parsing and validation.

A checkpoint's ``config.json`` carries an ``elastic`` section::

    "elastic": {
      "default_budget": "full",
      "budgets": [
        {"name": "full"},
        {"name": "small", "hidden_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": [384, 256, 384, 384],
         "layers": [0, 2, 3]}
      ]
    }

Every field a budget leaves out keeps the parent's size; the fields a family accepts and
how each slices the weights are in ``spec/axes.py`` and ``spec/families/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_elastic.errors import ElasticConfigError, UnknownBudgetError, short
from vllm_elastic.spec.axes import AXES, LAYERS, Axis


@dataclass(frozen=True)
class ParentShape:
    """The parent's size on every elastic axis its family has, and its layer kinds."""

    sizes: Mapping[str, int]
    layer_kinds: tuple[str, ...]
    # fixed group counts of grouped axes (Mamba's n_groups), by field
    groups: Mapping[str, int] = field(default_factory=dict)
    # per field: (smallest allowed value, required multiple, why) beyond the axis rules
    constraints: Mapping[str, tuple[int, int, str]] = field(default_factory=dict)
    # fields sharded over tensor-parallel ranks (None: the family supports no TP)
    tp_sharded: tuple[str, ...] | None = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def fields(self) -> list[str]:
        return list(self.sizes)

    def has(self, axis: Axis, layer: int) -> bool:
        """Whether parent layer ``layer`` has the component of a per-layer axis."""
        return not axis.layer_kinds or self.layer_kinds[layer] in axis.layer_kinds

    def group_count(self, axis: Axis, budget: Budget | None = None) -> int:
        if axis.group_axis is not None:
            source = self.sizes if budget is None else budget.sizes
            return int(source[axis.group_axis])
        return self.groups[axis.group_field] if axis.group_field else 1

    @property
    def group_size(self) -> int:
        """Query heads per KV head (attention families)."""
        return self.sizes["num_attention_heads"] // self.sizes["num_key_value_heads"]


@dataclass(frozen=True)
class Budget:
    """One named submodel: its size on every elastic axis (resolved, parent-indexed)."""

    name: str
    index: int
    sizes: Mapping[str, Any]  # int, or a tuple with one entry per parent layer
    layers: tuple[int, ...]  # kept parent layer indices, ascending

    def size(self, name: str, layer: int | None = None) -> int:
        value = self.sizes[name]
        if isinstance(value, tuple):
            if layer is None:
                raise ValueError(f"{name} is per layer: give the layer")
            return value[layer]
        return value

    def per_layer(self, name: str) -> tuple[int, ...]:
        value = self.sizes[name]
        return value if isinstance(value, tuple) else (value,) * len(self.layers)

    def keeps_layer(self, layer: int) -> bool:
        return layer in self.layers

    def kept(self, name: str, parent: ParentShape, layer: int | None = None) -> list[int]:
        """Parent component indices this budget keeps on axis ``name``, in order."""
        axis = AXES[name]
        n = self.size(name, layer)
        if axis.group_axis is None and axis.group_field is None:
            return list(range(n))
        groups = parent.group_count(axis, self)
        per_parent_group = parent.sizes[name] // parent.group_count(axis)
        return [g * per_parent_group + i for g in range(groups) for i in range(n // groups)]

    # conveniences of the attention + MLP families
    @property
    def hidden_size(self) -> int:
        return self.sizes["hidden_size"]

    @property
    def num_attention_heads(self) -> int:
        return self.sizes["num_attention_heads"]

    @property
    def num_key_value_heads(self) -> int:
        return self.sizes["num_key_value_heads"]

    @property
    def group_size(self) -> int:
        """Query heads kept per kept KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def intermediate_sizes(self) -> tuple[int, ...]:
        return self.per_layer("intermediate_size")

    def kept_query_heads(self, parent: ParentShape) -> list[int]:
        return self.kept("num_attention_heads", parent)

    def is_full(self, parent: ParentShape) -> bool:
        if len(self.layers) != parent.num_layers:
            return False
        for name, parent_size in parent.sizes.items():
            value = self.sizes[name]
            values = value if isinstance(value, tuple) else (value,)
            if any(v is not None and v != parent_size for v in values):
                return False
        return True

    def order_key(self, parent: ParentShape) -> tuple[int, ...]:
        """Sort key: larger budgets (wider, more components and layers) sort later."""
        key = [self.hidden_size]
        for name in parent.sizes:
            value = self.sizes[name]
            key.append(sum(v or 0 for v in value) if isinstance(value, tuple) else value)
        return (*key, len(self.layers))


def _positive_int(where: str, name: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ElasticConfigError(f"{where}.{name}: expected an int, got {short(value)}")
    if value <= 0:
        raise ElasticConfigError(f"{where}.{name}: must be positive, got {value}")
    if value > limit:
        raise ElasticConfigError(f"{where}.{name}: {value} exceeds the parent's {limit}")
    return value


def _per_layer(where: str, axis: Axis, raw: Any, parent: ParentShape) -> Any:
    limit = parent.sizes[axis.field]
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        n = parent.num_layers
        if len(raw) != n:
            raise ElasticConfigError(
                f"{where}.{axis.field}: a per-layer list needs {n} entries (one per parent "
                f"layer), got {len(raw)}"
            )
        values = []
        for i, v in enumerate(raw):
            if v is None and not parent.has(axis, i):
                values.append(None)
            else:
                values.append(_positive_int(where, f"{axis.field}[{i}]", v, limit))
        return tuple(values)
    return _positive_int(where, axis.field, raw, limit)


def _check_grouping(where: str, axis: Axis, value: int, parent: ParentShape, groups: int) -> None:
    per_group = parent.sizes[axis.field] // parent.group_count(axis)
    what = axis.group_axis or axis.group_field
    if value % groups:
        raise ElasticConfigError(
            f"{where}.{axis.field}: {value} is not a multiple of {what}={groups}, so the "
            "groups would keep different numbers"
        )
    if value // groups > per_group:
        raise ElasticConfigError(
            f"{where}.{axis.field}: {value} over {groups} groups is {value // groups} per "
            f"group, more than the parent's {per_group} per group"
        )


def parse_budget(raw: Mapping[str, Any], index: int, parent: ParentShape) -> Budget:
    """Resolve one raw budget entry against the parent shape, or raise ElasticConfigError."""
    where = f"elastic.budgets[{index}]"
    if not isinstance(raw, Mapping):
        raise ElasticConfigError(f"{where}: expected an object, got {short(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ElasticConfigError(f"{where}.name: expected a non-empty string, got {short(name)}")
    where = f"{where} ({short(name)})"
    known = {"name", LAYERS, *parent.sizes}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ElasticConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    sizes: dict[str, Any] = {}
    for field_name in parent.sizes:  # ordered so group axes come before grouped ones
        axis = AXES[field_name]
        if field_name in raw:
            value = raw[field_name]
        elif axis.group_axis is not None:  # default: keep the parent's heads per group
            value = sizes[axis.group_axis] * (
                parent.sizes[field_name] // parent.sizes[axis.group_axis]
            )
        else:
            value = parent.sizes[field_name]
        if axis.per_layer:
            sizes[field_name] = _per_layer(where, axis, value, parent)
        else:
            sizes[field_name] = _positive_int(where, field_name, value, parent.sizes[field_name])
        if axis.group_axis or axis.group_field:
            groups = sizes[axis.group_axis] if axis.group_axis else parent.group_count(axis)
            _check_grouping(where, axis, sizes[field_name], parent, groups)
        if field_name in parent.constraints:
            low, multiple, why = parent.constraints[field_name]
            v = sizes[field_name]
            if v < low or v % multiple:
                raise ElasticConfigError(f"{where}.{field_name}: {v} {why}")
    n_layers = parent.num_layers
    raw_layers = raw.get(LAYERS, list(range(n_layers)))
    if isinstance(raw_layers, str) or not isinstance(raw_layers, Sequence) or not raw_layers:
        raise ElasticConfigError(
            f"{where}.layers: expected a non-empty list of layer indices, got {short(raw_layers)}"
        )
    for layer in raw_layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ElasticConfigError(f"{where}.layers: {short(layer)} is not an int")
        if not 0 <= layer < n_layers:
            raise ElasticConfigError(
                f"{where}.layers: unknown layer index {layer}; the parent has layers "
                f"0..{n_layers - 1}"
            )
    if len(set(raw_layers)) != len(raw_layers):
        raise ElasticConfigError(f"{where}.layers: duplicate layer indices in {short(raw_layers)}")
    return Budget(name=name, index=index, sizes=sizes, layers=tuple(sorted(raw_layers)))


NOT_SERVED = "not_served"  # written by an engine serving some budgets (``served_section``)


@dataclass(frozen=True)
class ElasticSpec:
    """All budgets of a checkpoint, resolved against its parent shape."""

    parent: ParentShape
    budgets: tuple[Budget, ...]
    default_budget: str
    # the checkpoint's budgets an engine does not serve (engine option serve_budgets)
    not_served: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.budgets]

    def get(self, name: str) -> Budget:
        """The budget named ``name`` (UnknownBudgetError, listing the budgets, if none)."""
        for budget in self.budgets:
            if budget.name == name:
                return budget
        raise UnknownBudgetError(
            f"budget: {short(name)} is not a budget of this checkpoint; budgets: {self.names}"
        )

    @property
    def full(self) -> Budget:
        return next(b for b in self.budgets if b.is_full(self.parent))

    @property
    def default(self) -> Budget:
        return self.get(self.default_budget)

    def by_size(self) -> list[Budget]:
        """Budgets from the smallest to the full one."""
        return sorted(self.budgets, key=lambda b: b.order_key(self.parent))

    @property
    def smallest(self) -> Budget:
        return self.by_size()[0]

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Every sharded axis must split evenly into per-rank prefixes (see layout.py)."""
        if tp_size == 1:
            return
        sharded = self.parent.tp_sharded
        if sharded is None:
            raise ElasticConfigError(
                f"tensor_parallel_size={tp_size}: this elastic family runs on one rank only"
            )
        for name in sharded:
            if self.parent.sizes[name] % tp_size:
                raise ElasticConfigError(
                    f"{name}: the parent's {self.parent.sizes[name]} do not split over "
                    f"tensor_parallel_size={tp_size}"
                )
        for b in self.budgets:
            for name in sharded:
                value = b.sizes[name]
                for layer, v in enumerate(value if isinstance(value, tuple) else (value,)):
                    if v is not None and v % tp_size:
                        at = f"[{layer}]" if isinstance(value, tuple) else ""
                        raise ElasticConfigError(
                            f"elastic budget {b.name!r}.{name}{at}: {v} is not a multiple of "
                            f"tensor_parallel_size={tp_size}"
                        )


def parse_elastic_spec(section: Any, parent: ParentShape) -> ElasticSpec:
    """Parse and validate a config's ``elastic`` section; raise ElasticConfigError."""
    if not isinstance(section, Mapping):
        raise ElasticConfigError(f"elastic: expected an object, got {short(section)}")
    known = {"budgets", "default_budget", "think_start", "think_end", NOT_SERVED}
    unknown = sorted(str(k) for k in set(section) - known)
    if unknown:
        raise ElasticConfigError(
            f"elastic: unknown key(s) {unknown}; known: {', '.join(sorted(known))}"
        )
    raw_budgets = section.get("budgets")
    if not isinstance(raw_budgets, Sequence) or isinstance(raw_budgets, str) or not raw_budgets:
        raise ElasticConfigError(
            "elastic.budgets: expected a non-empty list of budget objects, got "
            f"{short(raw_budgets)}"
        )
    budgets = tuple(parse_budget(raw, i, parent) for i, raw in enumerate(raw_budgets))
    seen: set[str] = set()
    for b in budgets:
        if b.name in seen:
            raise ElasticConfigError(f"elastic.budgets: duplicate budget name {b.name!r}")
        seen.add(b.name)
    if not any(b.is_full(parent) for b in budgets):
        raise ElasticConfigError(
            "elastic.budgets: no full budget; one budget must keep the parent's size on every "
            'axis (e.g. {"name": "full"})'
        )
    default = section.get("default_budget")
    if default is None:
        default = next(b.name for b in budgets if b.is_full(parent))
    if default not in seen:
        raise ElasticConfigError(
            f"elastic.default_budget: {short(default)} is not a budget; budgets: {sorted(seen)}"
        )
    not_served = section.get(NOT_SERVED, [])
    if isinstance(not_served, str) or not isinstance(not_served, Sequence):
        raise ElasticConfigError(f"elastic.{NOT_SERVED}: expected a list, got {short(not_served)}")
    return ElasticSpec(
        parent=parent,
        budgets=budgets,
        default_budget=default,
        not_served=tuple(str(n) for n in not_served),
    )


def served_section(
    section: Mapping[str, Any], names: Sequence[str], parent: ParentShape
) -> dict[str, Any]:
    """The ``elastic`` section of an engine serving only the budgets ``names`` (engine
    option ``serve_budgets``): the others leave ``budgets`` (checkpoint order kept) for
    ``not_served``, so every module reading the spec (model, policy, usage) sees only the
    served ones. The full budget must be served: the engine's layers are the parent's. A
    checkpoint default that is not served gives way to the full budget. Idempotent."""
    spec = parse_elastic_spec(section, parent)
    unknown = [n for n in names if n not in spec.names]
    if unknown:
        raise ElasticConfigError(
            f"elastic.serve_budgets: unknown budget(s) {short(unknown)}; this checkpoint's "
            f"budgets are {spec.names}"
        )
    if spec.full.name not in names:
        raise ElasticConfigError(
            f"elastic.serve_budgets: {short(list(names))} must include the full budget "
            f"{spec.full.name!r} (an elastic engine holds the parent's layers)"
        )
    out = dict(section)
    out["budgets"] = [raw for raw in section["budgets"] if raw["name"] in names]
    dropped = [n for n in spec.names if n not in names]
    out[NOT_SERVED] = [*spec.not_served, *dropped]
    if out.get("default_budget") not in (None, *names):
        del out["default_budget"]
    return out
