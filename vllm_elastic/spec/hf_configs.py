"""Hugging Face config classes of the elastic architectures.

They must live at module top level: vLLM pickles the ``hf_config`` to the engine-core and
worker processes, where it is unpickled before the plugin's ``register()`` runs.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, Qwen3Config

from vllm_elastic.spec.budgets import ElasticSpec, spec_from_hf_config


def is_elastic_config(hf_config: Any) -> bool:
    """Whether a (loaded) HF config is one of our elastic configs with budgets."""
    return isinstance(hf_config, _ElasticConfigMixin) and hf_config.elastic is not None


class _ElasticConfigMixin:
    """Validates the ``elastic`` section as soon as the config is built."""

    elastic: dict[str, Any]

    def _validate_elastic(self) -> None:
        if getattr(self, "elastic", None) is not None:
            spec_from_hf_config(self)

    @property
    def elastic_spec(self) -> ElasticSpec:
        return spec_from_hf_config(self)


class ElasticLlamaConfig(_ElasticConfigMixin, LlamaConfig):
    """A Llama config with named nested budgets (``model_type: elastic_llama``)."""

    model_type = "elastic_llama"

    def __init__(self, elastic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.elastic = elastic
        self._validate_elastic()


class ElasticQwen3Config(_ElasticConfigMixin, Qwen3Config):
    """A Qwen3 config with named nested budgets (``model_type: elastic_qwen3``)."""

    model_type = "elastic_qwen3"

    def __init__(self, elastic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.elastic = elastic
        self._validate_elastic()


# model_type -> (config class, elastic architecture, plain architecture, plain model_type)
FAMILIES: dict[str, tuple[type, str, str, str]] = {
    "elastic_llama": (ElasticLlamaConfig, "ElasticLlamaForCausalLM", "LlamaForCausalLM", "llama"),
    "elastic_qwen3": (ElasticQwen3Config, "ElasticQwen3ForCausalLM", "Qwen3ForCausalLM", "qwen3"),
}
