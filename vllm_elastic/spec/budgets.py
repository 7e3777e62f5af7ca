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

Every axis a budget leaves out keeps the parent's size. Each budget is a prefix slice of
the parent on each axis:

* ``hidden_size``: the first ``hidden_size`` embedding channels (embedding columns, norm
  weights, every matrix's hidden rows/columns, lm_head columns).
* ``num_key_value_heads`` (KV heads, default: the parent's): KV heads ``0..kv-1``.
* ``num_attention_heads`` (query heads): within each kept KV head ``g``'s group, its first
  ``q/kv`` query heads, i.e. parent query heads ``g*G + i`` for ``i < q/kv`` where
  ``G = parent_q / parent_kv``. With ``q/kv == G`` this is the plain prefix ``0..q-1``.
* ``intermediate_size``: one value or one per (parent) layer; the first channels of
  gate/up (rows) and down (columns).
* ``layers``: the parent layer indices that run (importance-ranked depth, not a prefix);
  a skipped layer passes the residual stream through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_elastic.errors import ElasticConfigError


@dataclass(frozen=True)
class ParentShape:
    """The sizes of the full (parent) model on every elastic axis."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_hidden_layers: int

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> ParentShape:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        inter = config.intermediate_size
        if not isinstance(inter, int):
            raise ElasticConfigError(
                f"intermediate_size: the parent must have one int, got {inter!r}"
            )
        if heads % kv:
            raise ElasticConfigError(
                f"num_attention_heads: the parent's {heads} query heads are not a multiple "
                f"of its {kv} KV heads"
            )
        return cls(config.hidden_size, heads, kv, head_dim, inter, config.num_hidden_layers)


@dataclass(frozen=True)
class Budget:
    """One named submodel: its size on every elastic axis (resolved, parent-indexed)."""

    name: str
    index: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_sizes: tuple[int, ...]  # one per parent layer (skipped layers included)
    layers: tuple[int, ...]  # kept parent layer indices, ascending

    @property
    def group_size(self) -> int:
        """Query heads kept per kept KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def keeps_layer(self, layer: int) -> bool:
        return layer in self.layers

    def kept_query_heads(self, parent: ParentShape) -> list[int]:
        """Parent query-head indices this budget keeps, in the sliced model's order."""
        g_parent = parent.group_size
        return [
            g * g_parent + i
            for g in range(self.num_key_value_heads)
            for i in range(self.group_size)
        ]

    def is_full(self, parent: ParentShape) -> bool:
        return (
            self.hidden_size == parent.hidden_size
            and self.num_attention_heads == parent.num_attention_heads
            and self.num_key_value_heads == parent.num_key_value_heads
            and all(i == parent.intermediate_size for i in self.intermediate_sizes)
            and len(self.layers) == parent.num_hidden_layers
        )

    def to_dict(self) -> dict[str, Any]:
        inter: int | list[int] = list(self.intermediate_sizes)
        if len(set(self.intermediate_sizes)) == 1:
            inter = self.intermediate_sizes[0]
        return {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": inter,
            "layers": list(self.layers),
        }


_KNOWN_FIELDS = {
    "name",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "layers",
}


def _positive_int(where: str, field: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ElasticConfigError(f"{where}.{field}: expected an int, got {value!r}")
    if value <= 0:
        raise ElasticConfigError(f"{where}.{field}: must be positive, got {value}")
    if value > limit:
        raise ElasticConfigError(f"{where}.{field}: {value} exceeds the parent's {limit}")
    return value


def parse_budget(raw: Mapping[str, Any], index: int, parent: ParentShape) -> Budget:
    """Resolve one raw budget entry against the parent shape, or raise ElasticConfigError."""
    where = f"elastic.budgets[{index}]"
    if not isinstance(raw, Mapping):
        raise ElasticConfigError(f"{where}: expected an object, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ElasticConfigError(f"{where}.name: expected a non-empty string, got {name!r}")
    where = f"{where} ({name!r})"
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise ElasticConfigError(
            f"{where}: unknown field(s) {unknown}; known: {sorted(_KNOWN_FIELDS)}"
        )
    hidden = _positive_int(
        where, "hidden_size", raw.get("hidden_size", parent.hidden_size), parent.hidden_size
    )
    kv = _positive_int(
        where,
        "num_key_value_heads",
        raw.get("num_key_value_heads", parent.num_key_value_heads),
        parent.num_key_value_heads,
    )
    default_q = kv * parent.group_size
    q = _positive_int(
        where,
        "num_attention_heads",
        raw.get("num_attention_heads", default_q),
        parent.num_attention_heads,
    )
    if q % kv:
        raise ElasticConfigError(
            f"{where}.num_attention_heads: {q} query heads is not a multiple of "
            f"num_key_value_heads={kv}, so GQA groups would be uneven"
        )
    if q // kv > parent.group_size:
        raise ElasticConfigError(
            f"{where}.num_attention_heads: {q} query heads over {kv} KV heads is "
            f"{q // kv} per group, more than the parent's {parent.group_size} per group"
        )
    n_layers = parent.num_hidden_layers
    raw_inter = raw.get("intermediate_size", parent.intermediate_size)
    if isinstance(raw_inter, Sequence) and not isinstance(raw_inter, str):
        if len(raw_inter) != n_layers:
            raise ElasticConfigError(
                f"{where}.intermediate_size: a per-layer list needs {n_layers} entries "
                f"(one per parent layer), got {len(raw_inter)}"
            )
        inter = tuple(
            _positive_int(where, f"intermediate_size[{i}]", v, parent.intermediate_size)
            for i, v in enumerate(raw_inter)
        )
    else:
        one = _positive_int(where, "intermediate_size", raw_inter, parent.intermediate_size)
        inter = (one,) * n_layers
    raw_layers = raw.get("layers", list(range(n_layers)))
    if isinstance(raw_layers, str) or not isinstance(raw_layers, Sequence) or not raw_layers:
        raise ElasticConfigError(
            f"{where}.layers: expected a non-empty list of layer indices, got {raw_layers!r}"
        )
    for layer in raw_layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ElasticConfigError(f"{where}.layers: {layer!r} is not an int")
        if not 0 <= layer < n_layers:
            raise ElasticConfigError(
                f"{where}.layers: unknown layer index {layer}; the parent has layers "
                f"0..{n_layers - 1}"
            )
    if len(set(raw_layers)) != len(raw_layers):
        raise ElasticConfigError(f"{where}.layers: duplicate layer indices in {raw_layers}")
    return Budget(
        name=name,
        index=index,
        hidden_size=hidden,
        num_attention_heads=q,
        num_key_value_heads=kv,
        intermediate_sizes=inter,
        layers=tuple(sorted(raw_layers)),
    )


@dataclass(frozen=True)
class ElasticSpec:
    """All budgets of a checkpoint, resolved against its parent shape."""

    parent: ParentShape
    budgets: tuple[Budget, ...]
    default_budget: str

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.budgets]

    def get(self, name: str) -> Budget:
        for budget in self.budgets:
            if budget.name == name:
                return budget
        raise KeyError(name)

    @property
    def full(self) -> Budget:
        return next(b for b in self.budgets if b.is_full(self.parent))

    @property
    def default(self) -> Budget:
        return self.get(self.default_budget)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Every sharded axis must split evenly into per-rank prefixes (see layout.py)."""
        if tp_size == 1:
            return
        p = self.parent
        if p.num_key_value_heads % tp_size:
            raise ElasticConfigError(
                f"num_key_value_heads: the parent's {p.num_key_value_heads} KV heads do not "
                f"split over tensor_parallel_size={tp_size}"
            )
        for b in self.budgets:
            where = f"elastic budget {b.name!r}"
            if b.num_key_value_heads % tp_size:
                raise ElasticConfigError(
                    f"{where}.num_key_value_heads: {b.num_key_value_heads} is not a multiple "
                    f"of tensor_parallel_size={tp_size}"
                )
            for layer, inter in enumerate(b.intermediate_sizes):
                if inter % tp_size:
                    raise ElasticConfigError(
                        f"{where}.intermediate_size[{layer}]: {inter} is not a multiple of "
                        f"tensor_parallel_size={tp_size}"
                    )


def parse_elastic_spec(section: Any, parent: ParentShape) -> ElasticSpec:
    """Parse and validate a config's ``elastic`` section; raise ElasticConfigError."""
    if not isinstance(section, Mapping):
        raise ElasticConfigError(f"elastic: expected an object, got {section!r}")
    raw_budgets = section.get("budgets")
    if not isinstance(raw_budgets, Sequence) or isinstance(raw_budgets, str) or not raw_budgets:
        raise ElasticConfigError(
            f"elastic.budgets: expected a non-empty list of budget objects, got {raw_budgets!r}"
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
            f"elastic.default_budget: {default!r} is not a budget; budgets: {sorted(seen)}"
        )
    return ElasticSpec(parent=parent, budgets=budgets, default_budget=default)


def spec_from_hf_config(config: Any) -> ElasticSpec:
    """The validated ElasticSpec of an HF config object (or raise ElasticConfigError)."""
    section = getattr(config, "elastic", None)
    if section is None:
        raise ElasticConfigError("elastic: the config has no 'elastic' section")
    return parse_elastic_spec(section, ParentShape.from_hf_config(config))
