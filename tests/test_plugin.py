"""Installing vllm-elastic never changes how vLLM serves any other model.

The budget logits processor, the scheduler hook and the frontend hooks are attached from
the elastic architectures' config hook only; Model Runner V2 (vLLM's GPU default) would
reject the processor, so its loader and validator are called here directly, as a GPU
engine would call them.
"""

from __future__ import annotations

import importlib.metadata
import types

import pytest
from conftest import greedy

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


def _runner_config(elastic: bool, **extra):
    """A stand-in with what ``VllmConfig.use_v2_model_runner`` reads."""
    from vllm_elastic.spec.families.llama import ElasticLlamaConfig

    hf = ElasticLlamaConfig(elastic={"budgets": [{"name": "full"}]}) if elastic else object()
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=hf),
        attention_config=types.SimpleNamespace(hisparse_config=None),
        watermark_config=None,
        _get_v2_model_runner_unsupported_features=lambda: [],
        **extra,
    )


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_runner_choice_is_vllms_for_other_models(env, monkeypatch):
    import vllm.envs as envs
    from vllm.config import VllmConfig
    from vllm.plugins import load_general_plugins

    from vllm_elastic.compat.patching import original

    load_general_plugins()
    envs.disable_envs_cache()
    if env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", env)
    vllms_own = original(VllmConfig, "use_v2_model_runner").fget
    plain = _runner_config(elastic=False)
    assert VllmConfig.use_v2_model_runner.fget(plain) == vllms_own(plain)


def test_elastic_models_get_runner_v1_or_a_start_up_error(monkeypatch):
    import vllm.config.vllm as vllm_config_module
    from vllm.config import VllmConfig
    from vllm.plugins import load_general_plugins

    from vllm_elastic.compat.runner import check_v1_runner
    from vllm_elastic.errors import ElasticConfigError

    load_general_plugins()  # what every vLLM process does first (registers our hooks)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # as on a GPU box
    assert VllmConfig.use_v2_model_runner.fget(_runner_config(elastic=False)) is True
    elastic = _runner_config(elastic=True)
    assert VllmConfig.use_v2_model_runner.fget(elastic) is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with_v2 = types.SimpleNamespace(
        use_v2_model_runner=VllmConfig.use_v2_model_runner.fget(elastic)
    )
    assert with_v2.use_v2_model_runner is True
    with pytest.raises(ElasticConfigError, match="need vLLM's Model Runner V1"):
        check_v1_runner(with_v2)


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
