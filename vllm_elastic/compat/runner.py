"""Model Runner V1 for elastic models, chosen from the config.

vLLM 0.32 picks Model Runner V2 by default on GPU (``VllmConfig.use_v2_model_runner``, a
property read in every process); V2 rejects V1-interface logits processors, which track
our per-row budgets. No config field selects V1 and the ``VLLM_USE_V2_MODEL_RUNNER``
variable is cached after start-up, so the property is wrapped: for a config whose model
is elastic it answers False, unless V2 is asked for explicitly
(``VLLM_USE_V2_MODEL_RUNNER=1``) or required (HiSparse, watermarking). Then it keeps
vLLM's answer and the plugin's config hook fails at start-up (``check_v1_runner``).
Every other model is decided by vLLM exactly as without the plugin.
"""

from __future__ import annotations

import os
from typing import Any

from vllm_elastic.compat.patching import wrap
from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.spec.families import is_elastic_config

ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _v2_required(vllm_config: Any) -> bool:
    if os.environ.get(ENV, "").strip().lower() in ("1", "true"):
        return True
    attention = getattr(vllm_config, "attention_config", None)
    return (
        getattr(attention, "hisparse_config", None) is not None
        or getattr(vllm_config, "watermark_config", None) is not None
    )


def _elastic(vllm_config: Any) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    return model_config is not None and is_elastic_config(model_config.hf_config)


def install() -> None:
    from vllm.config import VllmConfig

    def make(original: Any) -> Any:
        def use_v2_model_runner(self: Any) -> bool:
            if _elastic(self) and not _v2_required(self):
                return False
            return original(self)

        return use_v2_model_runner

    wrap(VllmConfig, "use_v2_model_runner", make)


def check_v1_runner(vllm_config: Any) -> None:
    """Fail loudly when an elastic model would run on Model Runner V2."""
    if vllm_config.use_v2_model_runner:
        raise ElasticConfigError(
            "elastic models need vLLM's Model Runner V1 (their budget tracker is a V1 "
            f"logits processor), but V2 is selected ({ENV}=1, HiSparse or watermarking); "
            f"unset {ENV} or drop the V2-only feature"
        )
