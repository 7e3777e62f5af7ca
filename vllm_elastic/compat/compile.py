"""torch.compile of one budget's forward the way vLLM compiles a stock model on CPU.

vLLM 0.32 on CPU turns its default compilation mode into ``DYNAMO_TRACE_ONCE`` with the
``inductor`` backend (``CpuPlatform.check_and_update_config``): the model's forward is
traced once with a dynamic token dimension, every guard is dropped, and that one graph
serves every batch size. An elastic forward is one such graph *per budget* (a batch of
one budget has a fixed routing), so this module reads the compilation settings vLLM
chose for the engine and compiles a callable with them:
``fullgraph=True, dynamic=False``, the token dimension of every input marked dynamic,
``guard_filter_fn`` dropping every guard, and vLLM's inductor options (mixed-batch
graphs: torch's default auto-functionalization, see ``compile_budget_forward``).

Dropping guards means a traced graph is reused whatever it was traced with. Two budgets
must therefore never share a code object (dynamo caches compiled code per code object):
``compile_budget_forward`` gives each budget's callable its own.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CompileSettings:
    """What vLLM chose for this engine's compiled forward."""

    backend: str  # "inductor", or "eager" in vLLM's CPU CI mode
    options: dict[str, Any] = field(default_factory=dict)


def compile_settings(vllm_config: Any) -> CompileSettings | None:
    """The engine's compile settings if it compiles the forward, else None (eager).

    None for ``enforce_eager`` / ``-cc.mode=none`` and on any platform but CPU: vLLM's
    GPU modes capture CUDA graphs, which an elastic forward does not support yet (the
    config hook forces eager there, see ``plugin.py``).
    """
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    cc = vllm_config.compilation_config
    if vllm_config.model_config.enforce_eager or cc.mode == CompilationMode.NONE:
        return None
    if not current_platform.is_cpu():
        return None
    if cc.mode != CompilationMode.DYNAMO_TRACE_ONCE:
        raise ValueError(
            f"vllm-elastic compiles elastic models with vLLM's CPU mode DYNAMO_TRACE_ONCE; "
            f"this engine asks for {cc.mode.name}: use the default or enforce_eager=True"
        )
    backend = cc.backend if isinstance(cc.backend, str) and cc.backend else "inductor"
    options = dict(cc.inductor_compile_config) if backend == "inductor" else {}
    return CompileSettings(backend=backend, options=options)


def compile_budget_forward(
    fn: Callable[..., torch.Tensor], name: str, settings: CompileSettings, mixed: bool = False
) -> Callable[..., torch.Tensor]:
    """``fn`` (a plain function) compiled under its own code object named ``name``.

    Call it first with every tensor argument's dimension 0 at a size >= 2 (the trace);
    later calls with any size run that graph. ``mixed``: a graph of several budget
    groups, compiled with torch's default auto-functionalization (v2): vLLM turns it off
    for its own fusion passes, which these graphs do not run, and v1 mis-writes a custom
    op's in-place update of a view at a storage offset (a mixed batch's second group
    through the fused add-RMSNorm: wrong tokens)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    options = {**settings.options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    if mixed:
        options["enable_auto_functionalized_v2"] = True
    compiled = torch.compile(
        own, fullgraph=True, dynamic=False, backend=settings.backend, options=options
    )
    traced = False

    def call(*args: Any) -> torch.Tensor:
        nonlocal traced
        if not traced:
            for a in args:
                if isinstance(a, torch.Tensor):
                    torch._dynamo.mark_dynamic(a, 0)
            traced = True
        return compiled(*args)

    return call


def is_compiling() -> bool:
    """Whether dynamo is tracing the current code (branches must not depend on sizes)."""
    return torch.compiler.is_compiling()
