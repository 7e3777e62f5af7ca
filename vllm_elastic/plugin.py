"""The ``vllm.general_plugins`` entry point: registers the elastic architectures.

vLLM calls ``register()`` in every process it starts (frontend, engine core, workers),
possibly more than once, so everything here is idempotent. Nothing it installs changes
how vLLM serves any other model: the budget logits processor, the scheduler hook and
the frontend hooks are attached from the elastic architectures' config hook, for
elastic models only.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_elastic import compat
from vllm_elastic.control.logits_processor import FQCN as LOGITS_PROCESSOR
from vllm_elastic.control.scheduler import FQCN as SCHEDULER
from vllm_elastic.log import get_logger
from vllm_elastic.spec.families import all_families

logger = get_logger(__name__)


def _scheduler_qualname(cls: Any) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _serve_only(hf_config: Any, names: tuple[str, ...]) -> None:
    """Restrict the engine's config to the budgets it serves (logged; a checkpoint default
    that is not served gives way to the full budget, with a warning)."""
    before = hf_config.elastic_spec
    hf_config.serve_only(names)
    after = hf_config.elastic_spec
    if not after.not_served:
        return
    logger.info(
        "vllm-elastic: serving budgets %s; not served: %s (elastic.serve_budgets)",
        after.names, list(after.not_served),
    )  # fmt: skip
    if after.default_budget != before.default_budget:
        logger.warning(
            "vllm-elastic: the checkpoint's default budget %r is not served; requests "
            "without a budget run at %r",
            before.default_budget, after.default_budget,
        )  # fmt: skip


def _check_per_budget_kv(vllm_config: Any, spec: Any) -> None:
    """Fail at start-up where ``kv_layout: per-budget`` cannot be honoured."""
    from vllm_elastic.errors import ElasticConfigError
    from vllm_elastic.spec.state import HEADS as MAMBA_HEADS

    if MAMBA_HEADS in spec.parent.sizes:
        raise ElasticConfigError(
            "elastic.kv_layout per-budget: supported for attention-only families (Llama, "
            "Qwen3); this checkpoint has Mamba layers, whose state vLLM allocates per layer"
        )
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise ElasticConfigError(
            "elastic.kv_layout per-budget needs vLLM's hybrid KV cache manager (one KV "
            "cache group per KV-head group): drop --disable-hybrid-kv-cache-manager"
        )
    if vllm_config.kv_transfer_config is not None:
        raise ElasticConfigError(
            "elastic.kv_layout per-budget: KV transfer connectors are not supported"
        )


class ElasticModelConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) for elastic models."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from vllm.platforms import current_platform

        from vllm_elastic.compat.runner import check_v1_runner
        from vllm_elastic.control.policy import resolve_policy
        from vllm_elastic.spec.engine_options import engine_options, raw_section

        compat.check_supported()
        model_config = vllm_config.model_config
        options = engine_options(vllm_config)  # unknown keys or bad values fail here
        if options.serve_budgets is not None:
            _serve_only(model_config.hf_config, options.serve_budgets)
        spec = model_config.hf_config.elastic_spec
        spec.check_tensor_parallel(vllm_config.parallel_config.tensor_parallel_size)
        if options.kv_layout == "per-budget":
            _check_per_budget_kv(vllm_config, spec)
        # Fail at start-up, not per request, on a bad engine-wide default policy.
        resolve_policy(spec, None, options.policy)
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
        if not model_config.enforce_eager and not current_platform.is_cpu():
            # CUDA graphs would freeze one forward's budget routing; on CPU the model
            # compiles one graph per budget itself (models/budget_graphs.py)
            logger.warning(
                "vllm-elastic: elastic models run eager on %s (no CUDA graphs or "
                "torch.compile yet): forcing enforce_eager=True",
                current_platform.device_name,
            )
            model_config.enforce_eager = True
        # the budget tracker, for this model only (a new list: vLLM shares the old one)
        processors = list(model_config.logits_processors or ())
        if LOGITS_PROCESSOR not in processors:
            model_config.logits_processors = [*processors, LOGITS_PROCESSOR]
        # the recompute hook, over vLLM's scheduler or the user's own
        scheduler_config = vllm_config.scheduler_config
        user = scheduler_config.scheduler_cls
        if user is not None and _scheduler_qualname(user) != SCHEDULER:
            logger.info(
                "vllm-elastic: wrapping scheduler %s with the recompute hook",
                _scheduler_qualname(user),
            )
            section = raw_section(vllm_config)
            section["base_scheduler_cls"] = _scheduler_qualname(user)
            vllm_config.additional_config = {
                **(vllm_config.additional_config or {}),
                "elastic": section,
            }
        scheduler_config.scheduler_cls = SCHEDULER
        # vLLM's own hook of the plain architecture (NemotronH: the SSM cache dtype)
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        stock = MODELS_CONFIG_MAP.get(model_config.hf_config.family.plain_arch)
        if stock is not None and stock is not ElasticModelConfig:
            stock.verify_and_update_config(vllm_config)
        check_v1_runner(vllm_config)
        from vllm_elastic.control.hooks import install_frontend_hooks

        install_frontend_hooks()


def register() -> None:
    """Register config classes, model classes and hooks (idempotent, every process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for family in all_families():
        AutoConfig.register(family.model_type, family.config_cls, exist_ok=True)
        arch = family.elastic_arch
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{family.model_module}:{arch}")
        MODELS_CONFIG_MAP[arch] = ElasticModelConfig
    if not compat.supported():
        logger.warning(
            "vllm-elastic: vLLM %s is not a supported version (%s); elastic models will "
            "be refused, other models are unaffected",
            compat.vllm_version(),
            ", ".join(compat.SUPPORTED_VLLM),
        )
    compat.install_process_hooks()
