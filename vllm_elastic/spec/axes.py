"""The elastic axes: every way a budget can be smaller than its parent.

Each axis is a budget field (the Hugging Face config field of the parent's size, e.g.
``hidden_size``) whose components are importance-ordered, so a budget keeps a prefix:

* plain axes keep components ``0 .. n-1``;
* grouped axes keep a prefix *within each group*: query heads within each kept KV head's
  group (``num_attention_heads``: parent heads ``g*G + i`` for ``g < kv``, ``i < q/kv``),
  Mamba heads within each of the parent's ``n_groups`` groups (``mamba_num_heads``:
  ``g*Hg + i`` for every group ``g``, ``i < h/n_groups``);
* per-layer axes take one value or one per parent layer (layers without the component
  ignore theirs; ``null`` is allowed there);
* ``layers`` is the set of parent layers that run (importance-ranked depth, not a prefix).

Adding an axis is one entry here plus the families that use it (``spec/families/``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    """One elastic axis (its budget field is also the parent config's field)."""

    field: str
    alias: str  # the short key of a budget SPEC on the command line
    doc: str
    per_layer: bool = False
    # grouped axes: the groups are the kept components of ``group_axis`` (query heads
    # under KV heads) or the parent's ``group_field`` groups, all kept (Mamba heads)
    group_axis: str | None = None
    group_field: str | None = None
    # the layer kinds that have this component (per-layer axes)
    layer_kinds: tuple[str, ...] = ()


HIDDEN = Axis(
    "hidden_size", "hidden", "hidden channels (embedding, every norm and matrix, lm_head)"
)
KV_HEADS = Axis("num_key_value_heads", "kv_heads", "attention KV heads")
Q_HEADS = Axis(
    "num_attention_heads",
    "heads",
    "attention query heads: a prefix within each kept KV head's group",
    group_axis="num_key_value_heads",
)
MLP = Axis(
    "intermediate_size",
    "intermediate",
    "MLP channels",
    per_layer=True,
    layer_kinds=("decoder", "-"),
)
MAMBA_HEADS = Axis(
    "mamba_num_heads",
    "mamba_heads",
    "Mamba-2 heads: the same number kept in every group, a prefix within each group",
    group_field="n_groups",
)
EXPERTS = Axis(
    "n_routed_experts", "experts", "routed MoE experts (routing among the kept ones only)"
)
EXPERT_MLP = Axis(
    "moe_intermediate_size",
    "expert_intermediate",
    "channels of every routed expert",
    per_layer=True,
    layer_kinds=("E",),
)
SHARED_MLP = Axis(
    "moe_shared_expert_intermediate_size",
    "shared_intermediate",
    "channels of the shared expert",
    per_layer=True,
    layer_kinds=("E",),
)
LAYERS = "layers"  # the kept parent layers (not a size)

AXES: dict[str, Axis] = {
    a.field: a
    for a in (HIDDEN, KV_HEADS, Q_HEADS, MLP, MAMBA_HEADS, EXPERTS, EXPERT_MLP, SHARED_MLP)
}
