"""Direct tests of every reach-in into vLLM internals (``vllm_elastic/compat``).

Each test checks the shape of the internal the hook relies on (signature, attribute,
layout) or its behaviour on crafted input, so that a vLLM upgrade that changes it fails
here by name, not as a wrong token somewhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect

import pytest
import torch

from vllm_elastic import compat
from vllm_elastic.compat import patching


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_version_gate(monkeypatch):
    assert compat.supported()  # the installed vLLM is one the hooks were written for
    assert compat.supported("0.32.1") and not compat.supported("0.33.0")
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.0")
    with pytest.raises(
        compat.UnsupportedVLLMError, match="supports vLLM 0.32.x; this is vLLM 0.40"
    ):
        compat.check_supported()
    with pytest.raises(compat.UnsupportedVLLMError):
        compat.install_worker_hooks()


def test_wrap_once_and_unwrap():
    class Base:
        def inherited(self):
            return "base"

    class Owner(Base):
        def method(self, x):
            return x

        @classmethod
        def make(cls, x):
            return x

        @property
        def value(self):
            return 1

    def plus_one(original):
        return lambda *a, **k: original(*a, **k) + 1

    for name in ("method", "make"):
        assert patching.wrap(Owner, name, plus_one)
        assert not patching.wrap(Owner, name, plus_one)  # installed once
    assert patching.wrap(Owner, "value", plus_one)
    assert patching.wrap(Owner, "inherited", lambda o: lambda self: o(self) + "!")
    assert Owner().method(1) == 2 and Owner.make(1) == 2 and Owner().value == 2
    assert Owner().inherited() == "base!"
    for name in ("method", "make", "value", "inherited"):
        patching.unwrap(Owner, name)
    assert Owner().method(1) == 1 and Owner.make(1) == 1 and Owner().value == 1
    assert "inherited" not in Owner.__dict__ and Owner().inherited() == "base"


def test_thinking_budget_fix_clears_an_overwritten_row():
    """vLLM 0.32's sync_batch keeps a departed request's state on a one-way move from a
    row without state; the fix clears it."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.thinking_budget_state import ThinkingBudgetStateHolder

    from vllm_elastic.compat import thinking_budget

    reasoning = SimpleNamespace(reasoning_start_token_ids=[4], reasoning_end_token_ids=[5])
    holder = ThinkingBudgetStateHolder(reasoning, 4, 0, torch.device("cpu"), False)
    holder._state[2] = {"stale": True}  # left by a request condense() replaced
    move = BatchUpdate(batch_size=2, removed=[], added=[],
                       moved=[(0, 2, MoveDirectionality.UNIDIRECTIONAL)])  # fmt: skip
    thinking_budget.install()
    holder.sync_batch(move)
    assert 2 not in holder._state
    holder._state[1] = {"mine": True}
    holder.sync_batch(BatchUpdate(batch_size=3, removed=[], added=[],
                                  moved=[(1, 3, MoveDirectionality.SWAP)]))  # fmt: skip
    assert holder._state == {3: {"mine": True}}


def test_input_processor_shape():
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_elastic.compat.patching import original

    assert _params(original(InputProcessor, "process_inputs"))[:4] == [
        "self", "request_id", "prompt", "params",
    ]  # fmt: skip
    from vllm.v1.engine import EngineCoreRequest  # a msgspec Struct

    fields = set(EngineCoreRequest.__struct_fields__)
    assert {"sampling_params", "cache_salt", "prompt_token_ids", "request_id"} <= fields


def test_output_processor_shape():
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import RequestState

    from vllm_elastic.compat.patching import original

    new = original(RequestState, "from_new_request")
    assert _params(new.__func__ if hasattr(new, "__func__") else new)[:5] == [
        "cls", "tokenizer", "request", "prompt", "parent_req",
    ]  # fmt: skip
    assert _params(original(RequestState, "make_request_output"))[:4] == [
        "self", "new_token_ids", "pooling_output", "finish_reason",
    ]  # fmt: skip
    assert FinishReason.ABORT.name == "ABORT"
    src = inspect.getsource(RequestState.__init__)
    assert "self.request_id = request_id" in src


def test_server_hook_targets_exist():
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_elastic.compat import server
    from vllm_elastic.compat.patching import original

    assert inspect.isasyncgenfunction(original(AsyncLLM, "generate"))
    for module, cls_name, method in server.HANDLERS:
        cls = getattr(importlib.import_module(module), cls_name)
        handler = original(cls, method)
        assert inspect.iscoroutinefunction(handler), (cls_name, method)
        assert _params(handler)[:2] == ["self", "request"], (cls_name, method)
        assert hasattr(cls, "create_error_response")
    for module, cls_name in server.USAGE_CLASSES:
        cls = getattr(importlib.import_module(module), cls_name)
        assert cls.model_config.get("extra") == "allow", cls_name  # takes `elastic`


def test_scheduler_internals():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert _params(Scheduler._preempt_request)[:4] == [
        "self", "request", "timestamp", "drop_stale_output",
    ]  # fmt: skip
    init = inspect.getsource(Scheduler.__init__)
    for attr in ("self.running", "self.requests", "self.prev_step_scheduled_req_ids"):
        assert attr in init, attr
    src = inspect.getsource(Request)
    assert "self.block_hashes" in src and "def update_block_hashes" in src
    assert "self.cache_salt" in src


def test_kv_group_spec_and_manager_hooks():
    """``kv_groups``: the registry routes our spec to our manager, specs of different KV
    groups never merge (so vLLM makes one KV-cache group each), and the manager methods
    we override keep the arguments we pass on."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_elastic.compat.kv_groups import KVGroupManager, KVGroupSpec

    specs = [KVGroupSpec(block_size=16, num_kv_heads=1, head_size=32, dtype=torch.float32,
                         kv_group=g) for g in (0, 0, 1)]  # fmt: skip
    assert KVCacheSpecRegistry.get_manager_class(specs[0]) is KVGroupManager
    assert KVGroupSpec.merge(specs[:2]) == specs[0]
    with pytest.raises(AssertionError):
        KVGroupSpec.merge(specs)
    assert not specs[0].is_uniform_with_collection({str(i): s for i, s in enumerate(specs)})
    assert _params(FullAttentionManager.find_longest_cache_hit)[:7] == [
        "block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec",
        "drop_eagle_block", "alignment_tokens",
    ]  # fmt: skip
    for name, first in (
        ("get_num_blocks_to_allocate", ["self", "request_id", "num_tokens"]),
        ("add_local_computed_blocks", ["self", "request_id", "new_computed_blocks"]),
        ("allocate_new_blocks", ["self", "request_id", "num_tokens"]),
        ("cache_blocks", ["self", "request", "num_tokens"]),
        ("pop_blocks_for_free", ["self", "request_id"]),
    ):
        assert _params(getattr(FullAttentionManager, name))[: len(first)] == first, name
    assert _params(KVCacheManager.get_computed_blocks)[:2] == ["self", "request"]


def test_cpu_attention_kernel_and_layout():
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.attention import attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadata
    from vllm.v1.kv_cache_interface import KVCacheLayout

    assert CPUAttentionBackend.get_name() == "CPU_ATTN"
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert not CPUAttentionBackend.forward_includes_kv_cache_update
    fields = {f.name for f in dataclasses.fields(CPUAttentionMetadata)}
    assert {"num_actual_tokens", "query_start_loc", "seq_lens", "block_table", "causal",
            "dynamic_causal"} <= fields  # fmt: skip
    kernel = _params(ops.cpu_attention_with_kv_cache)
    for name in ("query", "key_cache", "value_cache", "output", "scheduler_metadata",
                 "k_scale", "v_scale", "kv_cache_dtype"):  # fmt: skip
        assert name in kernel, name
    assert "kv_cache_dtype" in _params(ops.cpu_attn_get_scheduler_metadata)
    assert callable(attention.get_attention_context)
    assert callable(attention.unified_kv_cache_update)


def test_forward_context_metadata_fields():
    from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata

    fields = {f.name for f in dataclasses.fields(BaseMambaAttentionMetadata)}
    assert {"num_decodes", "query_start_loc_p"} <= fields


def test_mamba_kernels_metadata_and_mixer():
    from vllm.model_executor.layers.mamba import mamba_mixer2
    from vllm.model_executor.layers.mamba.ops import causal_conv1d, ssd_combined, ssu_dispatch
    from vllm.v1.attention.backends.mamba2_attn import Mamba2AttentionMetadata

    fields = {f.name for f in dataclasses.fields(Mamba2AttentionMetadata)}
    assert {"num_decode_tokens", "num_prefill_tokens", "num_prefills", "num_decodes",
            "state_indices_tensor_d", "state_indices_tensor_p", "query_start_loc_d",
            "query_start_loc_p", "has_initial_states_p", "num_accepted_tokens",
            "prep_initial_states", "chunk_size", "seq_idx_p", "cu_chunk_seqlen_p",
            "last_chunk_indices_p"} <= fields  # fmt: skip
    # (kernel, parameters it must name, parameters it may take through **kwargs: the CPU
    # conv kernels accept the GPU kernels' extras that way)
    for fn, names, extras in (
        (causal_conv1d.causal_conv1d_fn, ("conv_states", "has_initial_state", "cache_indices",
                                          "query_start_loc", "activation"), ("metadata",)),
        (causal_conv1d.causal_conv1d_update, ("conv_state_indices", "query_start_loc"),
         ("num_accepted_tokens", "max_query_len")),
        (ssd_combined.mamba_chunk_scan_combined_varlen, ("cu_chunk_seqlens", "seq_idx",
                                                         "last_chunk_indices", "initial_states",
                                                         "dt_limit", "out", "state_dtype"), ()),
        (ssu_dispatch.selective_state_update, ("state_batch_indices", "cu_seqlens",
                                               "dst_state_batch_indices", "out",
                                               "num_accepted_tokens"), ()),
    ):  # fmt: skip
        params = _params(fn)
        for name in names:
            assert name in params, (fn.__name__, name)
        for name in extras:
            assert name in params or "kwargs" in params, (fn.__name__, name)
    # the CPU prefill scan calls the op under vLLM's CPU chunk scan, with its own buffer
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.mamba.ops.cpu import mamba_ssm

    assert "ops.mamba_chunk_scan_fwd_cpu(" in inspect.getsource(mamba_ssm)
    assert callable(ops.mamba_chunk_scan_fwd_cpu)
    src = inspect.getsource(mamba_mixer2.MambaMixer2.__init__)
    for attr in ("self.in_proj", "self.out_proj", "self.norm", "self.conv1d", "self.A",
                 "self.D", "self.dt_bias", "self.activation", "self.prefix"):  # fmt: skip
        assert attr in src, attr
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

    from vllm_elastic.compat import mamba

    for name in mamba.hybrid_classmethods():
        assert callable(getattr(NemotronHForCausalLM, name)), name


def test_logits_processor_privates():
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    src = inspect.getsource(LogitsProcessor.__init__)
    for attr in ("self.scale", "self.org_vocab_size", "self.soft_cap", "self.head_dtype"):
        assert attr in src, attr
    assert hasattr(LogitsProcessor, "_gather_logits")


def test_cpu_kernels_are_built():
    from vllm_elastic.compat import cpu_kernels

    for name in ("onednn_mm", "rms_norm", "fused_add_rms_norm"):
        assert hasattr(torch.ops._C, name), name
    if cpu_kernels.onednn_available():
        w = torch.randn(24, 16)
        x = torch.randn(5, 16)
        packed = cpu_kernels.OneDNNWeight(w, None)
        torch.testing.assert_close(packed(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_cpu_wheel_version_answer_is_scoped():
    from vllm_elastic.compat.cpu_wheel import vllm_version_answered

    before = importlib.metadata.version
    with vllm_version_answered():
        version = importlib.metadata.version("vllm")
        assert version.startswith(compat.vllm_version().split("+")[0])
    assert importlib.metadata.version is before


def test_compile_settings_follow_vllms_cpu_defaults(checkpoint):
    """vLLM turns its default compilation into DYNAMO_TRACE_ONCE + inductor on CPU;
    the per-budget graphs read those settings; enforce_eager means no graphs."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_elastic.compat.compile import compile_settings

    def config(**kw):
        args = EngineArgs(
            model=str(checkpoint("llama_bias")), dtype="float32", max_model_len=256,
            kv_cache_memory_bytes=16 << 20, **kw,
        )  # fmt: skip
        return args.create_engine_config()

    assert callable(torch.compiler.skip_all_guards_unsafe)  # the guard filter used
    settings = compile_settings(config())
    assert settings is not None and settings.backend == "inductor"
    assert settings.options.get("cpp.dynamic_threads") is True  # vLLM's CPU options
    assert compile_settings(config(enforce_eager=True)) is None
