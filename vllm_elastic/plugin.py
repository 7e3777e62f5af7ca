"""The ``vllm.general_plugins`` entry point: registers the elastic architectures.

vLLM calls ``register()`` in every process it starts (frontend, engine core, workers),
possibly more than once, so everything here is idempotent.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from vllm_elastic.config import FAMILIES
from vllm_elastic.log import get_logger

logger = get_logger(__name__)

MODEL_MODULE = "vllm_elastic.models.elastic"
# Loaded in an OpenAI API-server process by the time vLLM loads plugins there.
SERVER_MODULES = (
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.launchers.api_server",
    "vllm.entrypoints.openai.api_server",
)


class ElasticModelConfig:
    """vLLM per-architecture config hook (``MODELS_CONFIG_MAP``) for elastic models."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from vllm_elastic.models.nested_linear import requested_packing
        from vllm_elastic.policy import engine_section, resolve_policy

        model_config = vllm_config.model_config
        spec = model_config.hf_config.elastic_spec
        spec.check_tensor_parallel(vllm_config.parallel_config.tensor_parallel_size)
        # Fail at start-up, not per request, on a bad server-wide default policy.
        resolve_policy(spec, None, engine_section(vllm_config))
        requested_packing(vllm_config)  # raises on an unknown weight_packing
        if model_config.model_impl == "transformers":
            raise ValueError(
                "elastic checkpoints run only with vllm_elastic's model classes; "
                "drop --model-impl transformers"
            )
        # Never fall back silently to the Transformers backend in a process where this
        # plugin is not loaded (e.g. excluded by VLLM_PLUGINS): fail loudly instead.
        model_config.model_impl = "vllm"
        if vllm_config.speculative_config is not None:
            raise ValueError("elastic models do not support speculative decoding")
        if not model_config.enforce_eager:
            # Routing tokens to budgets is data-dependent Python work per forward; CUDA
            # graphs and torch.compile would freeze one routing.
            logger.info("vllm-elastic: forcing enforce_eager=True (per-forward budget routing)")
            model_config.enforce_eager = True
        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls is None:
            # preempts `elastic_kv_mode: recompute` requests at the switch (scheduler.py)
            scheduler_config.scheduler_cls = "vllm_elastic.scheduler.ElasticScheduler"
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
            # Model Runner V2 rejects V1 logits processors, which track budgets per row.
            logger.info("vllm-elastic: selecting the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def register() -> None:
    """Register config classes, model classes and hooks (idempotent, every process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_elastic.frontend import install_frontend_hook
    from vllm_elastic.usage import install_output_hook, install_server_hooks
    from vllm_elastic.vllm_fixes import fix_thinking_budget_moves

    for model_type, (config_cls, arch, _, _) in FAMILIES.items():
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{MODEL_MODULE}:{arch}")
        MODELS_CONFIG_MAP[arch] = ElasticModelConfig
    install_frontend_hook()
    install_output_hook()
    fix_thinking_budget_moves()
    if any(m in sys.modules for m in SERVER_MODULES):
        install_server_hooks()
