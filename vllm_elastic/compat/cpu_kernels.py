"""vLLM's CPU kernels used directly: the oneDNN GEMM with prepacked weights, the fused
RMSNorms and RoPE (``_C.onednn_mm``, ``_C.rms_norm``, ``_C.fused_add_rms_norm``,
``_C.rotary_embedding``)."""

from __future__ import annotations

from typing import Any

import torch


def onednn_available() -> bool:
    """Whether vLLM's CPU oneDNN GEMM is built into this vLLM."""
    try:
        import vllm._custom_ops as ops
    except ImportError:  # pragma: no cover - vLLM always ships it
        return False
    return bool(getattr(ops, "_supports_onednn", False))


class OneDNNWeight:
    """One weight block ``[n, k]`` prepacked for oneDNN (and its bias), as vLLM's CPU
    linears pack theirs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        import vllm._custom_ops as ops

        self.n = weight.shape[0]
        self.handler = ops.create_onednn_mm(weight.t(), 32)
        self.bias = None if bias is None else bias.detach().clone()
        self.bytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``; into ``out`` (contiguous ``[rows, n]``) when given."""
        import vllm._custom_ops as ops

        if out is None:
            return ops.onednn_mm(self.handler, x, self.bias)
        torch.ops._C.onednn_mm(out, x, self.bias, self.handler.handler_tensor)
        return out


def has_norm_kernel(x: torch.Tensor, fused: bool) -> bool:
    """Whether the fused CPU RMSNorm kernel serves ``x`` (CPU, width a multiple of 8)."""
    name = "fused_add_rms_norm" if fused else "rms_norm"
    return x.device.type == "cpu" and x.shape[-1] % 8 == 0 and hasattr(torch.ops._C, name)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    torch.ops._C.rms_norm(out, x, weight, eps)


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: ``residual += x``; ``x = rms_norm(residual) * weight``."""
    torch.ops._C.fused_add_rms_norm(x, residual, weight, eps)


def rotary_(rope: Any, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """vLLM's fused CPU RoPE on ``q`` and ``k`` in place (``RotaryEmbedding.forward_cpu``,
    what a layer runs with vLLM's custom ops on); False, untouched, where it does not
    apply: not on CPU, a rope class with a CPU path of its own, no kernel in this build.

    Outside a compiled graph vLLM's dispatch picks the PyTorch-native rope (about 20
    tensor ops per call) whenever the engine compiles, which the graph would fuse; an
    eager elastic forward (a mixed batch) calls the kernel instead."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if (
        q.device.type != "cpu"
        or type(rope).forward_cpu is not RotaryEmbedding.forward_cpu
        or not hasattr(torch.ops._C, "rotary_embedding")
    ):
        return False
    rope.forward_cpu(positions, q, k)
    return True
