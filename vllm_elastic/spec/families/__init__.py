"""Elastic model families: one declaration per family, read by every other module.

A :class:`Family` names its config class and architectures, the axes its budgets may cut
(its :class:`ParentShape`), the slice rules of every tensor (``SliceSpec``), how a
budget's standalone config is written, how random weights are drawn and which module
holds its vLLM model classes. ``FAMILIES`` maps elastic ``model_type`` to family.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_elastic.errors import ElasticConfigError, short
from vllm_elastic.spec.budgets import (
    Budget,
    ElasticSpec,
    ParentShape,
    parse_elastic_spec,
    served_section,
)
from vllm_elastic.spec.slicing import SliceSpec

# a spec per live config object (configs are unhashable: keyed by id, checked by a weak
# reference), re-parsed only when its ``elastic`` section changes
_SPECS: dict[int, tuple[weakref.ref, str, ElasticSpec]] = {}


class ElasticConfigMixin:
    """A Hugging Face config with an ``elastic`` section, validated when built.

    Config classes must live at module top level: vLLM pickles the ``hf_config`` to the
    engine-core and worker processes, where it is unpickled before ``register()`` runs.
    """

    elastic: dict[str, Any] | None
    family_name: str

    def _set_elastic(self, elastic: dict[str, Any] | None) -> None:
        """Called by each config class's own ``__init__`` (transformers generates one for a
        config subclass that does not define it, so a mixin ``__init__`` would be lost)."""
        self.elastic = elastic
        if elastic is not None:
            _ = self.elastic_spec  # validates the budgets

    @property
    def family(self) -> Family:
        return family_named(self.family_name)

    @property
    def elastic_spec(self) -> ElasticSpec:
        if getattr(self, "elastic", None) is None:
            raise ElasticConfigError("elastic: the config has no 'elastic' section")
        key = json.dumps(self.elastic, sort_keys=True, default=str)
        cached = _SPECS.get(id(self))
        if cached is None or cached[0]() is not self or cached[1] != key:
            spec = parse_elastic_spec(self.elastic, self.family.parent_shape(self))
            for k in [k for k, v in _SPECS.items() if v[0]() is None]:
                del _SPECS[k]
            _SPECS[id(self)] = cached = (weakref.ref(self), key, spec)
        return cached[2]

    def serve_only(self, names: list[str] | tuple[str, ...]) -> None:
        """Declare only the budgets ``names`` from now on (an engine's ``serve_budgets``;
        ``spec.budgets.served_section``)."""
        self.elastic = served_section(self.elastic, names, self.family.parent_shape(self))


def is_elastic_config(hf_config: Any) -> bool:
    """Whether a (loaded) HF config is one of our elastic configs with budgets."""
    return isinstance(hf_config, ElasticConfigMixin) and hf_config.elastic is not None


@dataclass(frozen=True)
class Family:
    """Everything that differs between elastic families."""

    name: str  # "llama"
    model_type: str  # "elastic_llama"
    config_cls: type
    elastic_arch: str
    plain_arch: str
    plain_model_type: str
    parent_shape: Callable[[Any], ParentShape]
    slices: SliceSpec
    # standalone config fields of a budget (over the parent's)
    plain_fields: Callable[[Any, Budget], dict[str, Any]]
    # random checkpoints: config keyword defaults, and tensor draws by name suffix
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    init: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    lm_head: str = "lm_head.weight"
    embedding: str = "model.embed_tokens.weight"
    model_module: str = ""

    def tied(self, config: Any) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False)) and self.name != "nemotron_h"


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def _load_all() -> None:
    from vllm_elastic.spec.families import llama, nemotron_h  # noqa: F401


def family_named(name: str) -> Family:
    """The family called ``name`` (``llama``, ``qwen3``, ``nemotron_h``)."""
    _load_all()
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ElasticConfigError(
        f"family: {short(name)} is not one of {sorted(f.name for f in FAMILIES.values())}"
    )


def family_of(model_type: str) -> Family:
    """The family of an elastic ``model_type``."""
    _load_all()
    if model_type not in FAMILIES:
        raise ElasticConfigError(
            f"model_type: {short(model_type)} is not an elastic architecture "
            f"(expected one of {sorted(FAMILIES)})"
        )
    return FAMILIES[model_type]


def all_families() -> list[Family]:
    _load_all()
    return list(FAMILIES.values())
