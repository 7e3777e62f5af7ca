"""vLLM's CPU kernels used directly: the oneDNN GEMM with prepacked weights and the fused
RMSNorms (``_C.onednn_mm``, ``_C.rms_norm``, ``_C.fused_add_rms_norm``)."""

from __future__ import annotations

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
