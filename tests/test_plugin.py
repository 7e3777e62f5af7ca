"""Installing vllm-elastic never changes how vLLM serves any other model.

The budget logits processor, the scheduler hook and the frontend hooks are attached from
the elastic architectures' config hook only; Model Runner V2 (vLLM's GPU default) would
reject the processor, so its loader and validator are called here directly, as a GPU
engine would call them.
"""

from __future__ import annotations

import importlib.metadata
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import ENGINE_KWARGS, greedy

from vllm_elastic.control.logits_processor import FQCN as LOGITS_PROCESSOR
from vllm_elastic.control.scheduler import FQCN as SCHEDULER


def test_no_logits_processor_entry_point_for_every_model():
    names = [ep.value for ep in importlib.metadata.entry_points(group="vllm.logits_processors")]
    assert not [n for n in names if n.startswith("vllm_elastic")], names


def test_model_runner_v2_loader_and_validator_accept_the_installed_plugin():
    """What a GPU engine (V2 runner) of an ordinary model does at start-up."""
    from vllm.v1.worker.gpu.sample.logits_processor import loader

    loader._cached_load_v2_logitsprocs.cache_clear()
    validate = loader.build_custom_logits_processors_params_validator(())
    from vllm import SamplingParams

    validate(SamplingParams())
    req_states = types.SimpleNamespace(
        device="cpu", max_num_reqs=4, vocab_size=10, all_token_ids=None,
        prompt_len=None, prefill_len=None, total_len=None,
    )  # fmt: skip
    assert loader.build_custom_logits_processors(None, req_states, False) == []


def test_the_v2_loader_would_reject_our_processor():
    """Why it must never reach a non-elastic engine: V2 refuses V1-interface plugins."""
    from vllm.v1.worker.gpu.sample.logits_processor import loader

    loader._cached_load_v2_logitsprocs.cache_clear()
    with pytest.raises(ValueError, match="not a subclass"):
        loader.build_custom_logits_processors_params_validator((LOGITS_PROCESSOR,))
    loader._cached_load_v2_logitsprocs.cache_clear()


def _vllm_config(model: Path) -> Any:
    """vLLM's own ``VllmConfig`` of ``model``, built as an engine builds it (the plugin's
    config hook included); no engine starts."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), **ENGINE_KWARGS).create_engine_config()


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """Triton present, as on a GPU box (V2 is then vLLM's default); the variable under
    the test's control, read afresh."""
    import vllm.config.vllm as vllm_config_module
    import vllm.envs as envs
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first (registers our hooks)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    envs.disable_envs_cache()
    return monkeypatch


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_runner_choice_is_vllms_for_other_models(env, as_on_a_gpu, sliced):
    from vllm.config import VllmConfig

    from vllm_elastic.compat.patching import original

    if env is not None:
        as_on_a_gpu.setenv("VLLM_USE_V2_MODEL_RUNNER", env)
    plain = _vllm_config(sliced("llama_bias", "full"))
    vllms_own = original(VllmConfig, "use_v2_model_runner").fget
    assert plain.use_v2_model_runner == vllms_own(plain) == (env != "0")


def test_elastic_models_get_runner_v1_or_a_start_up_error(as_on_a_gpu, checkpoint):
    """The error is our config hook's, raised while vLLM validates its config (pydantic
    wraps it in a ValidationError, a ValueError)."""
    assert _vllm_config(checkpoint("llama_bias")).use_v2_model_runner is False
    as_on_a_gpu.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="need vLLM's Model Runner V1"):
        _vllm_config(checkpoint("llama_bias"))


def test_stock_engine_with_the_plugin_installed_is_untouched(engines, sliced):
    """A plain Llama engine (the sliced checkpoint) next to the plugin: no budget
    processor, vLLM's own scheduler, no elastic config hook, and it generates."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_elastic.plugin import ElasticModelConfig

    assert MODELS_CONFIG_MAP.get("LlamaForCausalLM") is not ElasticModelConfig
    llm = engines.get(("stock", "llama_bias", "full"), sliced("llama_bias", "full"))
    config = llm.llm_engine.vllm_config
    assert LOGITS_PROCESSOR not in (config.model_config.logits_processors or [])
    assert config.scheduler_config.scheduler_cls != SCHEDULER
    assert "elastic" not in (config.additional_config or {})
    assert len(greedy(llm, [[20, 30, 40]], [None], 4)[0][0]) == 4


def test_elastic_engine_gets_the_processor_once(elastic_llm):
    llm = elastic_llm("llama_bias")
    config = llm.llm_engine.vllm_config
    assert config.model_config.logits_processors.count(LOGITS_PROCESSOR) == 1
    assert config.scheduler_config.scheduler_cls == SCHEDULER
    assert config.use_v2_model_runner is False
